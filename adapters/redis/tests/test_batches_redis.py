"""Publish batching: many publishes in one script call, failures per message, NOSCRIPT, windows."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
import redis.asyncio as aredis

from cascade_bus import PublishError

pytestmark = pytest.mark.redis


def spy_batches(transport: Any) -> list[int]:
    """Record the number of messages of every publish script call the transport sends."""
    sizes: list[int] = []
    publisher = transport._publisher
    build = publisher._batch_command

    def recording(batch: Any) -> bytes:
        sizes.append(batch.n)
        return build(batch)

    publisher._batch_command = recording
    return sizes


async def test_a_refused_message_fails_alone(redis_url, open_bus, prefix, kit):
    """One call carries QoS 0 and QoS 1 publishes; the one Redis refuses (its stream route
    points at a stream whose last possible ID is taken: XADD fails) fails, with its error; the
    others go through. (A route to a key that is no stream is junk: removed, see
    `test_hostile_redis.py`.)"""
    keys = f"cbt{uuid.uuid4().hex}:"
    full = f"{keys}full-stream"
    client = aredis.Redis.from_url(redis_url, protocol=2)
    try:
        await client.xadd(full, {"f": "v"}, id="18446744073709551615-18446744073709551615")
        await client.hset(f"{keys}routes", full, f"99999999999999 {prefix}/bad")
        publisher = await open_bus(redis_url, prefix=keys)
        listener = await open_bus(redis_url, prefix=keys)
        inbox = kit.Inbox()
        await listener.subscribe(f"{prefix}/#", inbox)
        sizes = spy_batches(kit.redis_transport(publisher))
        results = await asyncio.gather(
            publisher.publish(f"{prefix}/ok", 0, qos=1),
            publisher.publish(f"{prefix}/bad", 1, qos=1),
            publisher.publish(f"{prefix}/bad", 2),  # QoS 0: counted
            publisher.publish(f"{prefix}/ok", 3, qos=1),
            return_exceptions=True,
        )
        assert sizes == [4]  # one script call
        assert [results[0], results[2], results[3]] == [None, None, None]
        assert isinstance(results[1], PublishError)
        assert "exhausted the last possible ID" in str(results[1])
        assert results[1].topic == f"{prefix}/bad"
        assert publisher.stats().dropped == {"publish_failed": 2}  # QoS 1 raised, QoS 0 counted
        # PUBLISH runs before the XADD that failed: pub/sub subscribers saw every message.
        assert await inbox.wait_for(4) == [0, 1, 2, 3]
    finally:
        await client.delete(full, f"{keys}routes")
        await client.aclose()


async def test_script_flush_mid_stream_loses_and_reorders_nothing(
    private_redis, open_bus, prefix, kit
):
    """Calls refused with NOSCRIPT (SCRIPT FLUSH while publishing) are sent again after the
    reload, ahead of every call issued meanwhile: all messages arrive, in order."""
    broker = private_redis()
    publisher = await open_bus(broker.url)
    subscriber = await open_bus(broker.url)
    plain, durable = kit.Inbox(), kit.Inbox()
    await subscriber.subscribe(f"{prefix}/x", plain)
    await subscriber.subscribe(f"{prefix}/x", durable, qos=1)
    admin = aredis.Redis.from_url(broker.url, protocol=2)
    flushing: asyncio.Future[Any] | None = None
    confirmed: list[asyncio.Future[None]] = []
    try:
        for i in range(3000):
            if i == 500:  # runs on the server somewhere among the publishes in flight
                flushing = asyncio.ensure_future(admin.script_flush())
            if i % 3 == 0:
                # A QoS 1 publish, not awaited here (it waits for its reply), then a yield
                # (which runs it first): calls keep leaving while NOSCRIPT replies come back.
                confirmed.append(asyncio.ensure_future(publisher.publish(f"{prefix}/x", i, qos=1)))
                await asyncio.sleep(0)
            else:
                await publisher.publish(f"{prefix}/x", i)
        assert flushing is not None
        await flushing
        async with asyncio.timeout(kit.WAIT):
            await asyncio.gather(*confirmed)
        errors: Any = await admin.info("errorstats")
        assert int(errors["errorstat_NOSCRIPT"]["count"]) >= 1  # the path under test ran
    finally:
        await admin.aclose()
    assert await plain.wait_for(3000) == list(range(3000))
    assert await durable.wait_for(3000) == list(range(3000))
    assert publisher.stats().dropped == {}


async def test_tiny_inflight_window_still_delivers_everything_in_order(
    redis_url, open_bus, prefix, kit
):
    """max_inflight=2: one message per call and a wait for capacity after nearly every one."""
    publisher = await open_bus(redis_url, max_inflight=2)
    subscriber = await open_bus(redis_url)
    inbox = kit.Inbox()
    await subscriber.subscribe(f"{prefix}/x", inbox)
    sizes = spy_batches(kit.redis_transport(publisher))
    for i in range(500):
        await publisher.publish(f"{prefix}/x", i)
    assert await inbox.wait_for(500) == list(range(500))
    assert set(sizes) == {1}
    assert publisher.stats().dropped == {}


async def test_a_busy_loop_is_batched(redis_url, open_bus, prefix, kit):
    """An awaited QoS 0 loop goes out in calls of a quarter of max_inflight (not 1 each)."""
    publisher = await open_bus(redis_url, max_inflight=64)
    subscriber = await open_bus(redis_url)
    inbox = kit.Inbox()
    await subscriber.subscribe(f"{prefix}/x", inbox)
    sizes = spy_batches(kit.redis_transport(publisher))
    for i in range(1000):
        await publisher.publish(f"{prefix}/x", i)
    assert await inbox.wait_for(1000) == list(range(1000))
    assert sum(sizes) == 1000
    assert max(sizes) == 16
    assert len(sizes) < 100
