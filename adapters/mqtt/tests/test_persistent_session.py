"""A new process resuming a persistent session: its backlog reaches ``subscribe()`` (issue 3, S1).

With a fixed ``client_id`` and ``clean_start=false`` the broker keeps the session's
subscriptions and queues QoS 1 messages for it while nobody is connected. A new bus with that
``client_id`` (a restarted process) receives that backlog right after CONNACK, before it could
call ``subscribe()``; the transport holds it (bounded) and ``subscribe()`` claims it.

"The process goes away" is a bus closed cleanly (the session outlives a DISCONNECT: MQTT 5
session expiry), or one whose connection is cut (a crash: unacknowledged messages are resent).
Each test uses a private Mosquitto (``max_queued_messages 0``, ``set_tcp_nodelay true``; the
in-flight window as the test says) and a unique client id. Waits are event-driven and bounded:
``MqttTransport.wait_unclaimed``, a handler call, ``subscribe()`` returning.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterable
from typing import Any

import pytest
from cascade_bus_mqtt import MqttOptions

import cascade_bus
from cascade_bus import InvalidURL
from cascade_bus.spi import BusURL

pytestmark = [pytest.mark.mqtt, pytest.mark.fault]


def _session() -> dict[str, Any]:
    """Options of a persistent session with a client id unique to the test."""
    return {"client_id": f"s1-{uuid.uuid4().hex[:12]}", "clean_start": False}


async def _leave_session(url: str, session: dict[str, Any], *filters: tuple[str, str | None]):
    """Subscribe the session to ``filters`` (pattern, queue) at QoS 1, then disconnect cleanly.

    The broker keeps the session (and its subscriptions) after the DISCONNECT.
    """
    async with cascade_bus.connect(url, **session) as bus:
        for pattern, queue in filters:
            await bus.subscribe(pattern, lambda env: None, qos=1, queue=queue)


async def _publish(url: str, *batches: tuple[str, Iterable[int]]) -> None:
    """Publish ``{"seq": n}`` at QoS 1 (each acknowledged: queued for the session)."""
    async with cascade_bus.connect(url) as pub:
        for topic, seqs in batches:
            for seq in seqs:
                await pub.publish(topic, {"seq": seq}, qos=1)


def _seqs(inbox: Any) -> list[int]:
    return [p["seq"] for p in inbox.payloads]


@pytest.mark.parametrize(
    ("version", "queue"),
    [("5", None), ("5", "workers"), ("3.1.1", None)],
    ids=["v5", "v5-queue", "v311"],
)
async def test_backlog_is_handled_before_subscribe_returns(
    private_mosquitto, unique_topic, kit, buses, version, queue
):
    """200 QoS 1 messages queued while the session's process was gone: all handled, in order,
    before the new bus's ``subscribe()`` returns; nothing dropped, then live traffic flows."""
    broker = private_mosquitto()
    session = {**_session(), "version": version}
    jobs = f"{unique_topic}/jobs"
    await _leave_session(broker.url, session, (jobs, queue))
    await _publish(broker.url, (jobs, range(200)))

    bus = await cascade_bus.connect(broker.url, **session)
    buses.append(bus)
    transport = kit.mqtt(bus)
    async with asyncio.timeout(kit.WAIT):
        await transport.wait_unclaimed(200)  # all arrived before subscribe() was called
    inbox = kit.Inbox()
    async with asyncio.timeout(kit.WAIT):
        await bus.subscribe(jobs, inbox, qos=1, queue=queue)
    assert _seqs(inbox) == list(range(200))
    assert transport.unclaimed == 0

    await _publish(broker.url, (jobs, [200]))
    await inbox.wait_for(201, timeout=kit.WAIT)
    await bus.close()
    stats = bus.stats()
    assert _seqs(inbox) == list(range(201))
    assert stats.dropped == {}
    assert stats.delivered == 201
    assert stats.duplicates == 0


@pytest.mark.parametrize(
    ("broker_config", "options", "window"),
    [
        # No Receive Maximum announced: the broker's own window.
        ("max_inflight_messages 20", {"receive_maximum": 0}, 20),
        # Ours (Mosquitto 2.0.11 lets it override max_inflight_messages).
        ("", {"receive_maximum": 64}, 64),
    ],
    ids=["broker-window-20", "receive-maximum-64"],
)
async def test_backlog_larger_than_the_window_is_handled_without_deadlock(
    private_mosquitto, unique_topic, kit, buses, broker_config, options, window
):
    """500 queued messages, a window of 20 or 64: only a window's worth arrives (unacked) before
    ``subscribe()``, the rest waits at the broker; ``subscribe()`` returns with all 500."""
    broker = private_mosquitto(extra_config=broker_config)
    session = {**_session(), **options}
    jobs = f"{unique_topic}/jobs"
    await _leave_session(broker.url, session, (jobs, None))
    await _publish(broker.url, (jobs, range(500)))

    bus = await cascade_bus.connect(broker.url, **session)
    buses.append(bus)
    transport = kit.mqtt(bus)
    async with asyncio.timeout(kit.WAIT):
        await transport.wait_unclaimed(window)
    # Unacknowledged, so the broker sends no more: the rest is still safe in the session.
    assert transport.unclaimed == window
    inbox = kit.Inbox()
    async with asyncio.timeout(kit.WAIT):
        await bus.subscribe(jobs, inbox, qos=1)
    assert _seqs(inbox) == list(range(500))
    await bus.close()
    assert bus.stats().dropped == {}
    assert bus.stats().duplicates == 0


async def test_a_window_full_of_another_filters_backlog_does_not_block_subscribe(
    private_mosquitto, unique_topic, kit, buses
):
    """Two filters, 300 queued messages each, interleaved; a window of 20.

    The first ``subscribe()`` claims its own messages and acknowledges the others (held for
    later), so the window never stays full and its QoS 1 barrier gets through (holding them
    all unacknowledged deadlocked here). The second ``subscribe()`` claims the rest.
    """
    broker = private_mosquitto()
    session = {**_session(), "receive_maximum": 20}
    a, b = f"{unique_topic}/a", f"{unique_topic}/b"
    await _leave_session(broker.url, session, (a, None), (b, None))
    async with cascade_bus.connect(broker.url) as pub:
        for seq in range(300):
            await pub.publish(b, {"seq": seq}, qos=1)
            await pub.publish(a, {"seq": seq}, qos=1)

    bus = await cascade_bus.connect(broker.url, **session)
    buses.append(bus)
    transport = kit.mqtt(bus)
    async with asyncio.timeout(kit.WAIT):
        await transport.wait_unclaimed(20)
    got_a, got_b = kit.Inbox(), kit.Inbox()
    async with asyncio.timeout(kit.WAIT):
        await bus.subscribe(a, got_a, qos=1)
    assert _seqs(got_a) == list(range(300))
    # The barrier came after everything the broker had queued: all of b is here, held.
    assert transport.unclaimed == 300
    assert len(got_b) == 0
    async with asyncio.timeout(kit.WAIT):
        await bus.subscribe(b, got_b, qos=1)
    assert _seqs(got_b) == list(range(300))
    assert transport.unclaimed == 0
    await bus.close()
    assert bus.stats().dropped == {}


async def test_unclaimed_buffer_overflow_is_counted_exactly(
    private_mosquitto, unique_topic, kit, buses
):
    """``unclaimed_buffer=50``: 300 queued for a filter subscribed second; 50 are kept (the
    first 50), the other 250 are counted as ``overflow`` -- every message accounted for."""
    broker = private_mosquitto()  # no window of its own: ours (= unclaimed_buffer) bounds it
    session = {**_session(), "unclaimed_buffer": 50}
    a, b = f"{unique_topic}/a", f"{unique_topic}/b"
    await _leave_session(broker.url, session, (a, None), (b, None))
    await _publish(broker.url, (b, range(300)))

    bus = await cascade_bus.connect(broker.url, **session)
    buses.append(bus)
    transport = kit.mqtt(bus)
    async with asyncio.timeout(kit.WAIT):
        await transport.wait_unclaimed(50)
    assert transport.unclaimed == 50  # Receive Maximum 50: the rest waits at the broker
    assert bus.stats().dropped == {}
    got_a, got_b = kit.Inbox(), kit.Inbox()
    async with asyncio.timeout(kit.WAIT):
        await bus.subscribe(a, got_a, qos=1)
    # The rest of b's backlog came in before a's barrier, with no room left for it.
    assert bus.stats().dropped == {"overflow": 250}
    assert bus.stats().buffered == 50
    async with asyncio.timeout(kit.WAIT):
        await bus.subscribe(b, got_b, qos=1)
    assert _seqs(got_b) == list(range(50))
    assert len(got_a) == 0
    await bus.close()
    assert bus.stats().dropped == {"overflow": 250}
    assert bus.stats().delivered == 50


@pytest.mark.parametrize("subscribe_other", [True, False], ids=["other-filter", "no-subscribe"])
async def test_never_claimed_messages_are_counted_no_subscriber_at_close(
    private_mosquitto, unique_topic, kit, buses, subscribe_other
):
    """30 queued messages nobody subscribes to again: counted ``no_subscriber`` exactly once,
    at close, and acknowledged (the next process with the session does not get them again)."""
    broker = private_mosquitto()
    session = _session()
    a, b = f"{unique_topic}/a", f"{unique_topic}/b"
    await _leave_session(broker.url, session, (a, None), (b, None))
    await _publish(broker.url, (b, range(30)))

    bus = await cascade_bus.connect(broker.url, **session)
    buses.append(bus)
    async with asyncio.timeout(kit.WAIT):
        await kit.mqtt(bus).wait_unclaimed(30)
    if subscribe_other:
        async with asyncio.timeout(kit.WAIT):
            await bus.subscribe(a, kit.Inbox(), qos=1)
    assert bus.stats().dropped == {}
    await bus.close()
    assert bus.stats().dropped == {"no_subscriber": 30}
    assert kit.mqtt(bus).unclaimed == 0

    again = await cascade_bus.connect(broker.url, **session)
    buses.append(again)
    inbox = kit.Inbox()
    async with asyncio.timeout(kit.WAIT):
        await again.subscribe(b, inbox, qos=1)
    assert len(inbox) == 0  # the barrier came back after anything still queued: nothing was
    await again.close()
    assert again.stats().dropped == {}


async def test_crashed_process_unacknowledged_messages_reach_the_next_one(
    private_mosquitto, tcp_proxy, unique_topic, kit, buses
):
    """A process dies with 10 messages received and not handled (no PUBACK sent); 10 more are
    queued while it is gone. The next process handles all 20 once, in order, before its
    ``subscribe()`` returns; the 10 resent ones are counted as duplicates (DUP)."""
    broker = private_mosquitto()
    session = _session()
    jobs = f"{unique_topic}/jobs"
    proxy = await tcp_proxy(broker.url)
    crashed = await cascade_bus.connect(proxy.url_for("mqtt"), **session, reconnect=False)
    buses.append(crashed)
    gate = asyncio.Event()
    first = kit.Inbox()

    async def stuck(env: Any) -> None:
        first(env)
        await gate.wait()

    await crashed.subscribe(jobs, stuck, qos=1)
    await _publish(broker.url, (jobs, range(10)))
    await first.wait_for(1, timeout=kit.WAIT)  # handling seq 0; 1..9 queued; none acknowledged
    assert await proxy.cut() == 1
    await kit.wait_disconnected(crashed)
    await _publish(broker.url, (jobs, range(10, 20)))

    bus = await cascade_bus.connect(broker.url, **session)
    buses.append(bus)
    inbox = kit.Inbox()
    try:
        async with asyncio.timeout(kit.WAIT):
            await bus.subscribe(jobs, inbox, qos=1)
    finally:
        gate.set()  # the dead process's handler may end (its ack goes nowhere)
    assert _seqs(inbox) == list(range(20))
    await bus.close()
    assert bus.stats().duplicates == 10
    assert bus.stats().dropped == {}


def test_receive_maximum_defaults() -> None:
    """Persistent MQTT 5 sessions announce ``unclaimed_buffer`` as Receive Maximum; clean
    sessions and 3.1.1 announce none (the broker's window, as before); bounds are checked."""

    def parse(**options: Any) -> MqttOptions:
        return MqttOptions.parse(BusURL("mqtt://127.0.0.1"), options)

    assert parse().receive_maximum == 0
    assert parse().unclaimed_buffer == 1024
    assert parse(clean_start="false").receive_maximum == 1024
    assert parse(clean_start="false", unclaimed_buffer=50).receive_maximum == 50
    assert parse(clean_start="false", unclaimed_buffer=100_000).receive_maximum == 65_535
    assert parse(clean_start="false", unclaimed_buffer=0).receive_maximum == 0
    assert parse(clean_start="false", version="3.1.1").receive_maximum == 0
    assert parse(clean_start="false", receive_maximum=10).receive_maximum == 10
    assert parse(receive_maximum=64).receive_maximum == 64
    with pytest.raises(InvalidURL, match="receive_maximum"):
        parse(receive_maximum=70_000)
