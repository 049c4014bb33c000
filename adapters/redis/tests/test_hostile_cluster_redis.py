"""Junk from plain clients on a Redis Cluster bus's channels and pattern leases.

Streams, the retained hash and the route leases are read by the same code as standalone
(`test_hostile_redis.py`); what the cluster adds is its framed live channels
(``<seq>\\0<topic>\\0<body>``), the classic barrier channel, and the pattern leases its
publish script reads (``patterns`` per shard key, ``broad`` per slot).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from redis.asyncio.cluster import ClusterNode, RedisCluster

pytestmark = pytest.mark.redis


def frame_junk(foreign: str) -> list[bytes]:
    """Bodies that are no frame the publish script writes (``foreign``: a topic not matched)."""
    return [b"no frame", b"x\x00a/b\x00body", f"\x00{foreign}\x00body".encode(), b"\x00\xff\x00b"]


async def test_junk_frames_barrier_tokens_and_leases(redis_cluster, open_bus, prefix, kit):
    bus = await open_bus(redis_cluster.url)
    exact, pattern, broad = kit.Inbox(), kit.Inbox(), kit.Inbox()
    await bus.subscribe(f"{prefix}/x", exact)  # a topic's shard channel
    await bus.subscribe(f"{prefix}/+", pattern)  # a pattern's shard channel
    tail = prefix.rsplit("/", 1)[1]
    await bus.subscribe(f"+/{tail}", broad)  # a broad pattern: a classic channel
    transport: Any = bus.transport
    links = transport._links
    channels = [*links._chans, *links._classic]
    assert len(channels) == 3
    client = RedisCluster(
        startup_nodes=[ClusterNode("127.0.0.1", port) for port in redis_cluster.ports],
        protocol=2,
    )
    await client.initialize()
    try:
        for name in channels:
            verb = "SPUBLISH" if name in links._chans else "PUBLISH"
            node = client.get_node_from_key(name)
            for junk in frame_junk("other/topic"):
                await client.execute_command(verb, name, junk, target_nodes=node)
        # Classic PUBLISHes reach the link's master over the cluster bus, in order per source
        # node: junk and a last valid frame through one node, so the frame's arrival proves
        # the junk's.
        (classic,) = links._classic
        via = client.get_node_from_key(classic)
        await client.execute_command(
            "PUBLISH", transport._barrier_channel, b"forged", target_nodes=via
        )
        frame = b"\x00rt/" + tail.encode() + b"\x00" + json.dumps(3).encode()
        await client.execute_command("PUBLISH", classic, frame, target_nodes=via)
        publisher = await open_bus(redis_cluster.url)
        # Leases whose expiry is no number: the publish script deletes them instead of failing.
        _, broad_key, ns, _ = publisher.transport._publisher._publish_keys(f"{prefix}/x")
        await client.hset(ns + b"patterns", "junk", f"soon {prefix}/+")
        await client.hset(broad_key, "junk", f"soon +/{tail}")
        await publisher.publish(f"{prefix}/x", 1)
        await publisher.publish(f"rt/{tail}", 2)
        assert await exact.wait_for(1) == [1]
        assert await pattern.wait_for(1) == [1]
        assert sorted(await broad.wait_for(2)) == [2, 3]
        assert not await client.hexists(ns + b"patterns", "junk")
        assert not await client.hexists(broad_key, "junk")
    finally:
        await client.aclose()
    assert publisher.stats().dropped == {}
    assert bus.stats().reconnects == 0
    assert bus.stats().dropped == {"decode_error": 3 * 4 + 1}
