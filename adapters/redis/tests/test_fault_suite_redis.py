"""The shared fault suite (cascade_bus.testing.faults) on the shared Redis server."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import pytest_asyncio
import redis.asyncio
from cascade_bus_redis import RedisTransport
from cascade_bus_redis._cluster import ClusterLinks
from redis.asyncio.cluster import ClusterNode, RedisCluster

from cascade_bus import Bus
from cascade_bus.testing.brokers import BrokerProcess, TcpProxy
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
    """On the module's private cluster; the outage cuts per-master proxies (``address_map``)."""

    @pytest.fixture
    def transport_url(self, redis_cluster: Any) -> str:
        return str(redis_cluster.url)

    async def send_internal_junk(self, bus: Bus, transport_url: str, topic: str) -> None:
        """Junk frames on the subscriber's shard and classic channels and its barrier channel."""
        links = bus.transport._links  # type: ignore[attr-defined]
        assert isinstance(links, ClusterLinks)
        seeds = transport_url.partition("://")[2].partition("?")[0].split(",")
        client = RedisCluster(
            startup_nodes=[
                ClusterNode(h, int(p)) for h, _, p in (s.rpartition(":") for s in seeds)
            ],
            protocol=2,
        )
        try:
            await client.initialize()
            for name in [*links._chans, *links._classic, links._barrier_channel]:
                verb = "SPUBLISH" if name in links._chans else "PUBLISH"
                node = client.get_node_from_key(name)
                for body in (b"no frame", b"x\x00a/b\x00body", b"\x00\xff\x00b", b"r1"):
                    await client.execute_command(verb, name, body, target_nodes=node)
        finally:
            await client.aclose()

    @pytest_asyncio.fixture
    async def outage(self, redis_cluster: Any) -> AsyncIterator[Outage]:
        """A proxy per master; buses behind them reach every node through its proxy only.

        ``address_map`` maps each node's announced address to its proxy, so the bus under test
        reaches the cluster only through the proxies (commands, pub/sub links, stream readers),
        while the cluster bus between the nodes and every other client stay untouched.
        """
        proxies = [TcpProxy("127.0.0.1", port) for port in redis_cluster.ports]
        outage: Outage | None = None
        try:
            for proxy in proxies:
                await proxy.start()  # its port is known from here on
            address_map = ",".join(
                f"127.0.0.1:{port}={proxy.host}:{proxy.port}"
                for port, proxy in zip(redis_cluster.ports, proxies, strict=True)
            )
            seeds = ",".join(f"{proxy.host}:{proxy.port}" for proxy in proxies)
            url = with_query(f"redis+cluster://{seeds}", address_map=address_map)
            outage = Outage(proxies, url, self.wait_timeout)
            yield outage
        finally:
            if outage is not None:
                await outage.aclose()
            else:
                for proxy in proxies:
                    await proxy.aclose()
