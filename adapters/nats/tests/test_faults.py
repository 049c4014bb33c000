"""Fault tests on a private nats-server: restarts, outages, a lost JetStream store, cut links.

Each test starts its own server on a free port (never the shared 4222), with JetStream storing
into the broker's work directory, which survives ``arestart()``. Waits are bounded and
event-driven: a handler call, a transport state change (`NatsTransport.wait_connected`,
`wait_disconnected`, `wait_jetstream`) or a server process that finished starting.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from typing import Any

import pytest

import cascade_bus
from cascade_bus import ConnectionLost, DropReason

pytestmark = [pytest.mark.fault, pytest.mark.nats]


async def test_qos0_messages_held_while_down_and_overflow_counted(
    private_nats, tcp_proxy, unique_topic, kit, buses, api
):
    """While its link is down QoS 0 is held up to ``offline_buffer``; the rest is counted.

    The publisher reaches the server through a proxy that is cut; the subscriber stays
    connected, so what the publisher sends after its reconnect is sure to find it.
    """
    broker = private_nats()
    proxy = await tcp_proxy(broker.url)
    sub = await cascade_bus.connect(broker.url)
    buses.append(sub)
    pub = await cascade_bus.connect(proxy.url_for("nats"), offline_buffer=5, **kit.FAST_RECONNECT)
    buses.append(pub)
    inbox = kit.Inbox()
    await sub.subscribe(f"{unique_topic}/#", inbox)
    await pub.publish(f"{unique_topic}/before", 0)
    await inbox.wait_for(1)

    proxy.pause()
    await proxy.cut()
    await kit.wait_disconnected(pub)
    for i in range(1, 21):
        await pub.publish(f"{unique_topic}/down", i)  # never raises at QoS 0
    held = pub.stats()
    assert held.buffered == 5, held
    assert held.dropped == {DropReason.OFFLINE_OVERFLOW: 15}, held
    assert held.published == 21, held  # all accepted by the transport; 15 dropped, counted

    proxy.resume()
    await kit.wait_connected(pub, reconnects=1)
    await pub.publish(f"{unique_topic}/after", "end")
    await inbox.wait_until(lambda: "end" in inbox.payloads, "the message sent after the outage")
    # The five held went out first, in order; then the one published after the reconnect.
    assert inbox.payloads == [0, 1, 2, 3, 4, 5, "end"]
    assert pub.stats().buffered == 0
    assert sub.stats().dropped_total == 0


async def test_reconnect_off_fails_fast_and_counts(private_nats, unique_topic, kit, buses):
    """With ``reconnect=false`` a lost server ends the connection: publishes raise, counted."""
    broker = private_nats()
    bus = await cascade_bus.connect(broker.url, reconnect=False)
    buses.append(bus)
    await bus.publish(f"{unique_topic}/x", 1)
    await broker.astop()
    await kit.wait_disconnected(bus)
    with pytest.raises(ConnectionLost):
        await bus.publish(f"{unique_topic}/x", 2)
    with pytest.raises(ConnectionLost):
        await bus.publish(f"{unique_topic}/x", 3, qos=1)
    assert bus.stats().dropped == {DropReason.DISCONNECTED: 2}


async def test_subscriptions_and_consumers_recovered_after_the_store_is_lost(
    private_nats, unique_topic, kit, buses
):
    """The server comes back without its JetStream store: stream, bucket, consumers re-made.

    Core subscriptions are replayed by nats-py; the QoS-1 consumer and the stream are
    re-created by the adapter, and both kinds of subscription receive again.
    """
    broker = private_nats()
    sub = await cascade_bus.connect(broker.url, **kit.FAST_RECONNECT)
    buses.append(sub)
    pub = await cascade_bus.connect(broker.url, **kit.FAST_RECONNECT)
    buses.append(pub)
    durable, plain = kit.Inbox(), kit.Inbox()
    await sub.subscribe(f"{unique_topic}/q1", durable, qos=1)
    await sub.subscribe(f"{unique_topic}/q0", plain)
    await pub.publish(f"{unique_topic}/q1", "first", qos=1)
    await pub.publish(f"{unique_topic}/q0", "first")
    await durable.wait_for(1)
    await plain.wait_for(1)

    await broker.astop()
    assert broker.workdir is not None
    shutil.rmtree(broker.workdir / "jetstream")  # the server forgets every stream and consumer
    await broker.astart()
    await kit.wait_connected(sub, reconnects=1)
    await kit.wait_connected(pub, reconnects=1)
    async with asyncio.timeout(kit.WAIT):
        await kit.nats(sub).wait_jetstream()
        await kit.nats(pub).wait_jetstream()

    await pub.publish(f"{unique_topic}/q1", "second", qos=1)
    await pub.publish(f"{unique_topic}/q0", "second")
    assert await durable.wait_for(2) == ["first", "second"]
    assert await plain.wait_for(2) == ["first", "second"]
    # Retained messages work again too (the bucket was re-created).
    await pub.publish(f"{unique_topic}/r", {"kept": True}, retain=True)
    late = kit.Inbox()
    await sub.subscribe(f"{unique_topic}/r", late)
    assert late.payloads == [{"kept": True}]
    await pub.publish(f"{unique_topic}/r", b"", retain=True)


async def test_qos1_publish_while_cut_returns_once_buffered(
    private_nats, tcp_proxy, unique_topic, kit, buses, api
):
    """A QoS-1 publish made while the link is cut returns once held; it arrives after.

    The publish-while-down policy shared by every transport: the message waits in the offline
    buffer, and `flush` after the reconnect returns once the stream acknowledged it.
    """
    broker = private_nats()
    proxy = await tcp_proxy(broker.url)
    sub = await cascade_bus.connect(broker.url)
    buses.append(sub)
    inbox = kit.Inbox()
    await sub.subscribe(f"{unique_topic}/cut", inbox, qos=1)
    pub = await cascade_bus.connect(proxy.url_for("nats"), **kit.FAST_RECONNECT)
    buses.append(pub)
    await pub.publish(f"{unique_topic}/cut", 1, qos=1)

    proxy.pause()
    await proxy.cut()
    await kit.wait_disconnected(pub)
    async with asyncio.timeout(1.0):  # held, not acknowledged: no round trip to wait for
        await pub.publish(f"{unique_topic}/cut", 2, qos=1)
    assert pub.stats().buffered == 1
    proxy.resume()
    await kit.wait_connected(pub, reconnects=1)
    await pub.flush(timeout=kit.WAIT)
    assert pub.stats().buffered == 0
    assert await inbox.wait_for(2) == [1, 2]
    assert pub.stats().reconnects == 1
    assert pub.stats().dropped_total == 0


async def test_slow_handler_applies_flow_control_on_qos1(
    private_nats, unique_topic, kit, buses, api
):
    """A handler slower than the publisher: nothing dropped, JetStream holds the rest.

    The subscription buffer is tiny (``buffer_size=4``); the receive path waits for room
    instead of overflowing, and ``max_ack_pending`` keeps the server from pushing more.
    """
    broker = private_nats()
    sub = await cascade_bus.connect(broker.url, buffer_size=4, max_ack_pending=8)
    buses.append(sub)
    pub = await cascade_bus.connect(broker.url)
    buses.append(pub)
    got: list[int] = []
    done = asyncio.Event()

    async def slow(env: cascade_bus.Envelope[Any]) -> None:
        await asyncio.sleep(0)  # yields: lets the publisher run ahead
        got.append(env.payload)
        if len(got) == 200:
            done.set()

    await sub.subscribe(f"{unique_topic}/slow", slow, qos=1)
    for i in range(200):
        await pub.publish(f"{unique_topic}/slow", i, qos=1)
    async with asyncio.timeout(kit.WAIT):
        await done.wait()
    assert got == list(range(200))
    assert sub.stats().dropped_total == 0, sub.stats()


async def test_unique_consumer_per_subscription_removed_on_unsubscribe(
    private_nats, unique_topic, buses
):
    """A QoS-1 subscription's durable consumer is deleted when it unsubscribes."""
    import nats

    broker = private_nats()
    bus = await cascade_bus.connect(broker.url)
    buses.append(bus)
    nc = await nats.connect(broker.url)
    try:
        jsm = nc.jsm()
        sub = await bus.subscribe(f"{unique_topic}/a/#", qos=1)  # two filters: a, a.>
        names = [c.name for c in await jsm.consumers_info("CASCADE_BUS")]
        assert len(names) == 2, names
        await sub.unsubscribe()
        assert await jsm.consumers_info("CASCADE_BUS") == []
    finally:
        await nc.close()


async def test_flush_whose_ping_is_lost_waits_for_the_next_connection(
    private_nats, unique_topic, kit, buses, api
):
    """A flush whose PING dies with its connection completes after the reconnect.

    The server is frozen (SIGSTOP) so the PING gets no PONG, then killed and started again:
    the flush must do its round trip on the new connection instead of waiting out its timeout.
    """
    broker = private_nats()
    bus = await cascade_bus.connect(broker.url, **kit.FAST_RECONNECT)
    buses.append(bus)
    await bus.publish(f"{unique_topic}/x", 1)
    await bus.flush()
    pid = broker.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    await asyncio.to_thread(kit.wait_stopped, pid)  # a PING sent now cannot be answered
    flushing = asyncio.create_task(bus.flush(timeout=kit.WAIT))
    client = kit.nats(bus).client
    async with asyncio.timeout(kit.WAIT):
        while True:  # until the PING is out and its PONG outstanding
            if client._pongs:
                break
            await asyncio.sleep(0)
    os.kill(pid, signal.SIGKILL)
    await broker.arestart()
    async with asyncio.timeout(kit.WAIT / 2):
        await flushing
    assert bus.stats().reconnects == 1
