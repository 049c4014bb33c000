"""The shared fault suite (cascade_bus.testing.faults) on the shared Redis server."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis.asyncio
from cascade_bus_redis import RedisTransport

from cascade_bus import Bus
from cascade_bus.testing.brokers import BrokerProcess
from cascade_bus.testing.conformance import with_query
from cascade_bus.testing.faults import FaultSuite, Outage, Restartable

pytestmark = [pytest.mark.redis, pytest.mark.fault]


class TestRedisFaults(FaultSuite):
    """On a key prefix of its own, so its junk never reaches other buses on the server."""

    async def send_internal_junk(self, bus: Bus, transport_url: str, topic: str) -> None:
        """Junk on the control channel and this bus's barrier channel (under the suite's prefix)."""
        transport = bus.transport
        assert isinstance(transport, RedisTransport)
        prefix = transport._prefix
        client = redis.asyncio.Redis.from_url(transport_url.partition("?")[0])
        try:
            for body in (b"rJUNK", b"r", b"e", b"x" * 300, b"\xff\x00"):
                await client.publish(prefix + b"ctl", body)
                await client.publish(transport._barrier_channel, body)
            await client.publish(prefix + b"ctl", b"r1")  # a marker with no message after it
        finally:
            await client.aclose()

    @pytest.fixture
    def restartable_broker(self, private_redis: Callable[..., BrokerProcess]) -> Restartable:
        return private_redis(extra_args=("--appendonly", "yes", "--appendfsync", "always"))

    @pytest.fixture
    def transport_url(self, redis_url: str) -> str:
        return with_query(redis_url, prefix="cbfaults:")


class TestRedisClusterFaults(FaultSuite):
    @pytest.fixture
    def transport_url(self, redis_cluster: Any) -> str:
        return str(redis_cluster.url)

    @pytest.fixture
    def outage(self, transport_url: str) -> AsyncIterator[Outage]:
        pytest.skip(
            "a TCP proxy cannot front a Redis Cluster for some clients only: its nodes "
            "announce one address to every client (a controller bus would be cut too); "
            "test_cluster_redis.py cuts the cluster's links instead"
        )
