"""Running the conformance and fault suites against a network transport (pytest example).

The toy ``RespToyTransport`` from ``network_transport.py`` (Redis pub/sub on the adapter kit)
stands in for yours: the fault suite puts a TCP proxy between it and the server, cuts and
refuses connections, and checks what arrives, what is held and what is counted.
"""

from collections.abc import Iterator

import pytest
from network_transport import RespToyTransport

import cascade_bus
from cascade_bus.testing import ConformanceSuite
from cascade_bus.testing.brokers import host_port
from cascade_bus.testing.faults import FaultSuite


@pytest.fixture(autouse=True, scope="module")
def resptoy_scheme() -> Iterator[None]:
    """Register resptoy:// for this module (an installed entry point makes this unneeded)."""
    cascade_bus.register_transport("resptoy", RespToyTransport)
    yield
    cascade_bus.unregister_transport("resptoy")


@pytest.fixture
def toy_url(redis_url: str) -> str:
    """resptoy:// on the Redis server the test session found or started."""
    host, port = host_port(redis_url, 6379)
    return f"resptoy://{host}:{port}"


class TestToyConformance(ConformanceSuite):
    """Every conformance case on resptoy://; unsupported features are skipped by name."""

    @pytest.fixture
    def transport_url(self, toy_url: str) -> str:
        """The URL under test."""
        return toy_url


class TestToyFaults(FaultSuite):
    """Every fault case on resptoy://; those needing QoS 1 or retain are skipped by name."""

    @pytest.fixture
    def transport_url(self, toy_url: str) -> str:
        """The URL under test."""
        return toy_url
