"""Running the conformance suite against a transport (pytest example).

The toy ``LoopbackTransport`` from ``custom_transport.py`` stands in for yours; in a real
adapter the class comes from your package and its entry point registers it.
"""

from collections.abc import Iterator

import pytest
from custom_transport import LoopbackTransport

import cascade_bus
from cascade_bus.testing import ConformanceSuite


@pytest.fixture(autouse=True, scope="module")
def loopback_scheme() -> Iterator[None]:
    """Register loopback:// for this module (an installed entry point makes this unneeded)."""
    cascade_bus.register_transport("loopback", LoopbackTransport)
    yield
    cascade_bus.unregister_transport("loopback")


class TestLoopbackConformance(ConformanceSuite):
    """Every case of the suite, on loopback://; unsupported features are skipped by name."""

    url = "loopback://"
