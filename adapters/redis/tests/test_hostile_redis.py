"""Junk from plain clients on the adapter's own channels, streams and keys.

Any client of the server can write where the adapter keeps its internals. Each test writes junk
with redis-py, then a normal message, and checks that the junk cost one counted drop each
(``decode_error``), no reconnect, and never the message behind it. The buses use a private key
prefix, so the junk on their control channel never reaches other tests' buses on the server.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest
import redis.asyncio as aredis

pytestmark = pytest.mark.redis

DECODE = "decode_error"


@pytest.fixture
async def key_prefix(redis_url: str) -> AsyncIterator[str]:
    """A private ``prefix`` option; every key under it is deleted after the test."""
    prefix = f"cbh{uuid.uuid4().hex[:12]}:"
    yield prefix
    client = aredis.Redis.from_url(redis_url, protocol=2)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*", count=1000)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@pytest.fixture
async def plain(redis_url: str) -> AsyncIterator[aredis.Redis]:
    """A plain redis-py client: the hostile neighbour."""
    client = aredis.Redis.from_url(redis_url, protocol=2)
    yield client
    await client.aclose()


async def publish_all(client: aredis.Redis, messages: list[tuple[str | bytes, bytes]]) -> None:
    """PUBLISH in one pipeline: the junk and the message behind it share one socket read."""
    pipe = client.pipeline(transaction=False)
    for channel, data in messages:
        pipe.publish(channel, data)
    await pipe.execute()


def dropped(bus: Any) -> int:
    return int(bus.stats().dropped.get(DECODE, 0))


# -- pub/sub: the control and barrier channels, channel names --------------------------------------

CTL_JUNK = [b"rJUNK", b"r", b"r-1", b"r1.5", b"r 7", b"r" + b"9" * 40, b"x", b"", b"\xff\xfe"]


async def test_junk_on_the_control_channel(redis_url, open_bus, prefix, key_prefix, plain, kit):
    """Malformed ``r<seq>`` / ``e`` markers: counted, the next message and retained still work."""
    bus = await open_bus(redis_url, prefix=key_prefix)
    inbox = kit.Inbox()
    await bus.subscribe(f"{prefix}/x", inbox)
    ctl = f"{key_prefix}ctl"
    await publish_all(plain, [*((ctl, junk) for junk in CTL_JUNK), (f"{prefix}/x", b'{"n":1}')])
    assert await inbox.wait_for(1) == [{"n": 1}]
    # Retained numbering still works after the junk: a new subscriber gets the value once.
    await bus.publish(f"{prefix}/x", {"n": 2}, retain=True)
    await inbox.wait_for(2)
    late = kit.Inbox()
    await bus.subscribe(f"{prefix}/+", late)  # returns once the retained one was handed over
    assert late.payloads == [{"n": 2}]
    await bus.publish(f"{prefix}/x", {"n": 3})
    assert await late.wait_for(2) == [{"n": 2}, {"n": 3}]
    assert bus.stats().reconnects == 0
    assert dropped(bus) == len(CTL_JUNK)


async def test_junk_on_the_barrier_channel(redis_url, open_bus, prefix, key_prefix, plain, kit):
    """Tokens the bus never issued: counted; subscribing (which waits on a barrier) still works."""
    bus = await open_bus(redis_url, prefix=key_prefix)
    inbox = kit.Inbox()
    await bus.subscribe(f"{prefix}/x", inbox)
    barrier = kit.redis_transport(bus)._barrier_channel
    junk = [b"junk", b"99999999", b"", b"1" * 40]
    await publish_all(plain, [*((barrier, token) for token in junk), (f"{prefix}/x", b"1")])
    assert await inbox.wait_for(1) == [1]
    other = kit.Inbox()
    await bus.subscribe(f"{prefix}/+", other)  # a snapshot and a barrier: still answered
    await bus.publish(f"{prefix}/y", 2)
    assert await other.wait_for(1) == [2]
    assert bus.stats().reconnects == 0
    assert dropped(bus) == len(junk)


async def test_channel_names_that_are_no_topic(redis_url, open_bus, prefix, plain, kit):
    """A name that is not UTF-8 matched by a wildcard subscription: counted, not delivered."""
    bus = await open_bus(redis_url)
    inbox = kit.Inbox()
    await bus.subscribe(f"{prefix}/#", inbox)
    bad = f"{prefix}/".encode() + b"\xff\xfe"
    await publish_all(plain, [(bad, b"1"), (f"{prefix}/ok", b"2")])
    assert await inbox.wait_for(1) == [2]
    assert bus.stats().reconnects == 0
    assert dropped(bus) == 1


class Job(msgspec.Struct):
    n: int


async def test_junk_bodies_on_a_typed_user_topic(redis_url, open_bus, prefix, plain, kit):
    """Bodies that do not fit the subscription's type: counted, the next one delivered."""
    bus = await open_bus(redis_url)
    inbox = kit.Inbox()
    await bus.subscribe(f"{prefix}/jobs", inbox, type=Job)
    junk = [b"not json \xff", b'{"n": "x"}', b'{"specversion": "1.0", "data": [', b"[]"]
    await publish_all(
        plain, [*((f"{prefix}/jobs", j) for j in junk), (f"{prefix}/jobs", b'{"n":1}')]
    )
    assert await inbox.wait_for(1) == [Job(1)]
    assert bus.stats().reconnects == 0
    assert dropped(bus) == len(junk)


# -- streams: QoS 1 subscriptions and queue groups -------------------------------------------------


def stream_junk(prefix: str) -> list[dict[bytes, bytes]]:
    """Entries the publish script would never write to a stream for ``<prefix>/jobs``."""
    topic = f"{prefix}/jobs".encode()
    return [
        {b"x": b"y"},  # no topic, no body
        {b"t": topic},  # no body
        {b"t": f"{prefix}/other".encode(), b"d": b"1"},  # a topic the pattern does not match
        {b"t": topic, b"d": b"1", b"s": b"abc"},  # a sequence that is no number
        {b"t": b"\xff\xfe", b"d": b"1"},  # a topic that is no UTF-8
        {b"t": b"", b"d": b"1"},  # no topic
        {b"b": b"forged-token"},  # a barrier nobody wrote
        {b"b": b"x", b"c": b"y"},  # a barrier with extra fields
    ]


@pytest.mark.parametrize(
    ("qos", "queue"), [(1, None), (0, "g"), (1, "g")], ids=["qos1", "queue-qos0", "queue-qos1"]
)
async def test_junk_entries_in_a_stream(
    redis_url, open_bus, prefix, key_prefix, plain, kit, qos, queue
):
    """XADDs by another client to a subscription's stream: each counted once, the reader lives."""
    bus = await open_bus(redis_url, prefix=key_prefix)
    publisher = await open_bus(redis_url, prefix=key_prefix)
    inbox = kit.Inbox()
    await bus.subscribe(f"{prefix}/jobs", inbox, qos=qos, queue=queue)
    (sub,) = kit.redis_transport(bus)._subs
    junk = stream_junk(prefix)
    pipe = plain.pipeline(transaction=False)
    for fields in junk:
        pipe.xadd(sub.stream.key, fields)
    junk_ids = set(await pipe.execute())
    await publisher.publish(f"{prefix}/jobs", 1, qos=1)
    await publisher.publish(f"{prefix}/jobs", 2, qos=1)
    assert await inbox.wait_for(2) == [1, 2]
    assert bus.stats().reconnects == 0
    assert dropped(bus) == len(junk)
    if qos:  # the junk was acknowledged when read (before 1 arrived): none of it is pending
        await bus.flush()
        pending = await plain.xpending_range(sub.stream.key, "cascade_bus", "-", "+", 100)
        assert junk_ids.isdisjoint(entry["message_id"] for entry in pending)


# -- keys: the retained hash and the route leases --------------------------------------------------


async def test_junk_in_the_retained_hash(redis_url, open_bus, prefix, key_prefix, plain, kit):
    """A field that is no topic, a sequence that is no number: counted and skipped."""
    bus = await open_bus(redis_url, prefix=key_prefix)
    await bus.publish(f"{prefix}/good", 1, retain=True)
    await bus.flush()
    await plain.hset(f"{key_prefix}retained", f"{prefix}/".encode() + b"\xff", b"1")
    await plain.hset(f"{key_prefix}retained", f"{prefix}/bad", b"2")
    await plain.hset(f"{key_prefix}retained:seq", f"{prefix}/bad", b"abc")
    pattern, exact = kit.Inbox(), kit.Inbox()
    await bus.subscribe(f"{prefix}/#", pattern)  # HSCAN pages
    await bus.subscribe(f"{prefix}/bad", exact)  # one HGET
    assert pattern.payloads == [1]
    assert exact.payloads == []
    assert dropped(bus) == 3
    await bus.publish(f"{prefix}/bad", 3)
    assert await exact.wait_for(1) == [3]
    assert bus.stats().reconnects == 0


@pytest.mark.parametrize("batched", [False, True], ids=["one-per-call", "one-call"])
async def test_junk_route_leases(redis_url, open_bus, prefix, key_prefix, plain, kit, batched):
    """Junk in the routes hash never fails a subscribe or a publish; the script removes it."""
    routes = f"{key_prefix}routes"
    not_a_stream = f"{key_prefix}not-a-stream"
    await plain.set(not_a_stream, b"x")
    await plain.hset(routes, f"{key_prefix}junk1", f"soon {prefix}/jobs")
    await plain.hset(routes, f"{key_prefix}junk2", "no-space")
    bus = await open_bus(redis_url, prefix=key_prefix)
    inbox = kit.Inbox()
    await bus.subscribe(f"{prefix}/jobs", inbox, qos=1)  # leases the route: junk swept
    await plain.hset(routes, f"{key_prefix}junk3", f"later {prefix}/jobs")
    await plain.hset(routes, not_a_stream, f"99999999999999 {prefix}/jobs")
    publisher = await open_bus(redis_url, prefix=key_prefix)
    if batched:
        await asyncio.gather(*(publisher.publish(f"{prefix}/jobs", n, qos=1) for n in (1, 2)))
    else:
        for n in (1, 2):
            await publisher.publish(f"{prefix}/jobs", n, qos=1)
    assert await inbox.wait_for(2) == [1, 2]
    left = await plain.hkeys(routes)
    assert [key for key in left if b"junk" in key or key == not_a_stream.encode()] == []
    assert publisher.stats().dropped == {}
