"""Testing helpers for cascade-bus and its transports.

- `ConformanceSuite` (``cascade_bus.testing.conformance``): the cases every transport must pass;
  subclass it in a test module.
- ``cascade_bus.testing.pytest_plugin``: broker fixtures (``mqtt_url``, ...), loaded by pytest
  through the ``pytest11`` entry point.
- ``cascade_bus.testing.brokers``: finding and starting brokers for tests.

The conformance module needs pytest and pytest-asyncio (the ``test`` extra); it is imported on
first use, so importing this package does not require them.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

if "pytest" in sys.modules:  # rewrite the suite's asserts for readable failures
    sys.modules["pytest"].register_assert_rewrite(
        "cascade_bus.testing.conformance", "cascade_bus.testing.faults"
    )

if TYPE_CHECKING:
    from .conformance import Collector, ConformanceSuite, with_query

__all__ = ["Collector", "ConformanceSuite", "with_query"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import conformance

        return getattr(conformance, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
