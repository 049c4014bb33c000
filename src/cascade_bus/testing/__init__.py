"""Testing helpers for cascade-bus and its transports.

- ``conformance``: `ConformanceSuite`, the cases every transport must pass (subclass it).
- ``pytest_plugin``: broker fixtures (``mqtt_url``, ...), loaded through ``pytest11``.
- ``brokers``: finding and starting brokers for tests.

The suite needs pytest and pytest-asyncio (the ``test`` extra) and is imported on first use.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

#: The modules whose asserts pytest rewrites for readable failures (the suites and their cases).
_REWRITTEN = (
    "_base",
    "_cases_cascade",
    "_cases_delivery",
    "_cases_hostile",
    "_cases_lifecycle",
    "_cases_messaging",
    "_cases_outage",
    "_cases_queues_requests",
    "_cases_retained",
    "_fault_base",
    "conformance",
    "faults",
)

if "pytest" in sys.modules:
    sys.modules["pytest"].register_assert_rewrite(*(f"{__name__}.{m}" for m in _REWRITTEN))

if TYPE_CHECKING:
    from .conformance import Collector, ConformanceSuite, with_query

__all__ = ["Collector", "ConformanceSuite", "with_query"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import conformance

        return getattr(conformance, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
