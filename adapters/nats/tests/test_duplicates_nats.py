"""JetStream redeliveries are counted in ``stats().duplicates``, as MQTT counts DUP redeliveries.

A QoS-1 message whose delivery count (in its ``$JS.ACK`` reply subject) is above 1 was seen
before: by a handler that did not acknowledge it within ``ack_wait``, or by a bus that went
away before acknowledging it. Both receive paths (the fast path into nats-py and its public
API, fixture ``api``) count it.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import cascade_bus

pytestmark = pytest.mark.nats


async def test_redelivery_after_ack_wait_is_counted(nats_url, unique_topic, kit, buses, api):
    """The first handler call holds the message past ``ack_wait``: JetStream sends it again."""
    subscriber = await cascade_bus.connect(nats_url, ack_wait=0.3)
    publisher = await cascade_bus.connect(nats_url)
    buses.extend([subscriber, publisher])
    calls: list[Any] = []
    redelivered = asyncio.Event()

    async def handler(env: cascade_bus.Envelope[Any]) -> None:
        calls.append(env.payload)
        if len(calls) == 1:
            async with asyncio.timeout(kit.WAIT):  # not acked until the copy arrived
                await redelivered.wait()
        else:
            redelivered.set()

    await subscriber.subscribe(f"{unique_topic}/d", handler, qos=1, max_concurrency=2)
    await publisher.publish(f"{unique_topic}/d", {"n": 1}, qos=1)
    async with asyncio.timeout(kit.WAIT):
        await redelivered.wait()
    assert calls[:2] == [{"n": 1}, {"n": 1}]
    stats = subscriber.stats()
    assert stats.duplicates >= 1, stats
    assert publisher.stats().duplicates == 0


async def test_redelivery_to_the_next_bus_with_the_client_id_is_counted(
    nats_url, tcp_proxy, unique_topic, kit, buses
):
    """A bus cut off before it acked (as if killed): the next bus with its ``client_id`` gets
    the message again, and counts it.

    (A bus that *closes* acknowledges what it drops, counted as ``closed``: no redelivery.)
    """
    client_id = f"dup-{unique_topic.rsplit('/', 1)[-1]}"
    pattern = f"{unique_topic}/job"
    proxy = await tcp_proxy(nats_url)
    first = await cascade_bus.connect(
        proxy.url_for("nats"), client_id=client_id, ack_wait=0.3, close_timeout=0.5,
        **kit.FAST_RECONNECT,
    )  # fmt: skip
    buses.append(first)
    publisher = await cascade_bus.connect(nats_url)
    buses.append(publisher)
    started = asyncio.Event()

    async def never_done(env: cascade_bus.Envelope[Any]) -> None:
        started.set()
        async with asyncio.timeout(kit.WAIT):  # cancelled when the bus closes: never acked
            await asyncio.Event().wait()

    await first.subscribe(pattern, never_done, qos=1)
    await publisher.publish(pattern, {"job": 1}, qos=1)
    async with asyncio.timeout(kit.WAIT):
        await started.wait()
    proxy.pause()
    await proxy.cut()
    await kit.wait_disconnected(first)  # gone for good, its message unacknowledged

    second = await cascade_bus.connect(nats_url, client_id=client_id, ack_wait=0.3)
    buses.append(second)
    inbox = kit.Inbox()
    sub = await second.subscribe(pattern, inbox, qos=1)
    try:
        assert await inbox.wait_for(1) == [{"job": 1}]
        stats = second.stats()
        assert stats.duplicates >= 1, stats
    finally:
        await sub.unsubscribe()  # removes the client_id's consumer from the shared server
