"""Tests that run on memory:// and on every broker this machine has (pytest example)."""

from collections.abc import AsyncIterator

import pytest

import cascade_bus


@pytest.fixture(params=["memory", "mqtt", "nats", "redis"])
def bus_url(request: pytest.FixtureRequest) -> str:
    """A URL per transport: memory:// always, brokers from the cascade_bus pytest plugin."""
    scheme: str = request.param
    if scheme == "memory":
        return "memory://fixtures"
    if scheme not in cascade_bus.available_transports():
        pytest.skip(f"the {scheme}:// transport is not installed")
    url: str = request.getfixturevalue(f"{scheme}_url")  # env var, local port or private broker
    return url


@pytest.fixture
async def bus(bus_url: str) -> AsyncIterator[cascade_bus.Bus]:
    """An open bus, closed after the test."""
    async with cascade_bus.connect(bus_url) as bus:
        yield bus


async def test_round_trip(bus: cascade_bus.Bus, unique_topic: str) -> None:
    """unique_topic keeps concurrent runs on a shared broker apart."""
    async with bus.subscribe(f"{unique_topic}/#") as sub:
        await bus.publish(f"{unique_topic}/hello", {"n": 1})
        env = await sub.get(timeout=5.0)
    assert env.topic == f"{unique_topic}/hello"
    assert env.payload == {"n": 1}
