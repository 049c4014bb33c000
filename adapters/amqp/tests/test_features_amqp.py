"""AMQP specifics on the shared RabbitMQ: credentials, escaping, ``$`` topics, durable QoS 1."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from cascade_bus import Bus, ConnectError, connect
from cascade_bus.testing.inbox import Inbox
from cascade_bus.testing.pytest_plugin import ProxyFactory
from cascade_bus.testing.waits import FAST_RECONNECT, WAIT, wait_connected, wait_disconnected

pytestmark = pytest.mark.amqp


async def _open(buses: list[Bus], url: str, **options: Any) -> Bus:
    bus = connect(url, **options)
    buses.append(bus)
    async with asyncio.timeout(WAIT):
        await bus.open()
    return bus


async def test_refused_credentials_are_a_connect_error_without_the_password(
    amqp_base_url: str,
) -> None:
    url = amqp_base_url.replace("guest:guest@", "guest:not-the-pw-7@")
    bus = connect(url, reconnect=False)
    with pytest.raises(ConnectError) as info:
        async with asyncio.timeout(WAIT):
            await bus.open()
    assert "not-the-pw-7" not in str(info.value)
    assert "not-the-pw-7" not in repr(bus)


async def test_escaped_levels_and_dollar_topics(
    amqp_url: str, buses: list[Bus], unique_topic: str
) -> None:
    """Levels holding ``.``, ``*``, ``#`` match exactly; a leading wildcard skips ``$`` topics."""
    bus = await _open(buses, amqp_url)
    exact, wild, top = Inbox(), Inbox(), Inbox()
    await bus.subscribe(f"{unique_topic}/a.b/*", exact)
    await bus.subscribe(f"{unique_topic}/+/+", wild)
    await bus.subscribe("#", top)
    for topic in (f"{unique_topic}/a.b/*", f"{unique_topic}/a/b", f"{unique_topic}/a.b/x"):
        await bus.publish(topic, topic)
    await bus.publish(f"$cb/{unique_topic}", "dollar")
    await bus.publish(f"{unique_topic}/end/end", "end")
    await wild.wait_until(lambda: "end" in wild.payloads, "the end")
    await top.wait_until(lambda: "end" in top.payloads, "the end")
    assert exact.payloads == [f"{unique_topic}/a.b/*"]
    assert len(wild.payloads) == 4
    assert "dollar" not in top.payloads


async def test_durable_qos1_queue_keeps_what_arrives_during_an_outage(
    amqp_url: str, tcp_proxy: ProxyFactory, buses: list[Bus], unique_topic: str
) -> None:
    """With ``client_id`` a QoS 1 queue outlives the connection: nothing is lost, nothing twice."""
    proxy = await tcp_proxy(amqp_url)
    subscriber = await _open(
        buses, proxy.rewrite(amqp_url), client_id="durable-t", **FAST_RECONNECT
    )
    publisher = await _open(buses, amqp_url)
    inbox = Inbox()
    sub = await subscriber.subscribe(f"{unique_topic}/q", inbox, qos=1)
    await publisher.publish(f"{unique_topic}/q", 0, qos=1)
    await inbox.wait_until(lambda: inbox.payloads == [0], "the first")
    proxy.pause()
    await proxy.cut()
    await wait_disconnected(subscriber)
    for i in range(1, 11):
        await publisher.publish(f"{unique_topic}/q", i, qos=1)
    proxy.resume()
    await wait_connected(subscriber, reconnects=1)
    await inbox.wait_until(lambda: set(inbox.payloads) == set(range(11)), "11 messages")
    await publisher.publish(f"{unique_topic}/q", "end", qos=1)
    await inbox.wait_until(lambda: inbox.payloads[-1] == "end", "the end")
    # The first message's ack may not have left before the cut: then it comes again, counted
    # (as is any message the broker had pushed to the old consumer: it is marked redelivered).
    assert list(dict.fromkeys(inbox.payloads)) == [*range(11), "end"]
    stats = subscriber.stats()
    assert len(inbox) <= 12 + stats.duplicates, (inbox.payloads, stats)
    assert stats.dropped_total == 0
    await sub.unsubscribe()  # deletes the durable queue (close() would keep it)


async def test_unacknowledged_delivery_comes_back_counted_as_duplicate(
    amqp_url: str, tcp_proxy: ProxyFactory, buses: list[Bus], unique_topic: str
) -> None:
    """A QoS 1 message whose handler had not finished when the link dropped is redelivered."""
    proxy = await tcp_proxy(amqp_url)
    subscriber = await _open(buses, proxy.rewrite(amqp_url), client_id="dup-t", **FAST_RECONNECT)
    publisher = await _open(buses, amqp_url)
    started, release = asyncio.Event(), asyncio.Event()
    handled: list[int] = []

    async def slow(env: Any) -> None:
        started.set()
        if not handled:
            await release.wait()  # the first run is still going when the link drops
        handled.append(env.payload)

    sub = await subscriber.subscribe(f"{unique_topic}/d", slow, qos=1)
    await publisher.publish(f"{unique_topic}/d", 7, qos=1)
    async with asyncio.timeout(WAIT):
        await started.wait()
    await proxy.cut()
    await wait_connected(subscriber, reconnects=1)
    release.set()
    async with asyncio.timeout(WAIT):
        while len(handled) < 2:
            started.clear()
            await started.wait()
    assert handled[:2] == [7, 7]
    assert subscriber.stats().duplicates >= 1
    await sub.unsubscribe()  # deletes the durable queue


async def test_retained_replay_from_a_snapshot(
    amqp_url: str,
    amqp_exchange: str,
    pika: Any,
    buses: list[Bus],
    unique_topic: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A replay that read many log entries stores a snapshot; later replays start from it."""
    monkeypatch.setattr("cascade_bus_amqp._retained.COMPACT_AFTER", 5)
    base = f"{unique_topic}/snap"
    publisher = await _open(buses, amqp_url)
    for i in range(8):
        await publisher.publish(f"{base}/{i % 4}", {"v": i}, retain=True)
    await publisher.flush(WAIT)
    first = Inbox()
    await publisher.subscribe(f"{base}/+", first)  # reads > 5 entries: stores a snapshot
    assert sorted(e.payload["v"] for e in first.envelopes) == [4, 5, 6, 7]
    await publisher.flush(WAIT)  # the snapshot is confirmed
    head = await pika.declare_queue(f"{amqp_exchange}.retained.head", passive=True)
    assert head.declaration_result.message_count == 1
    await publisher.publish(f"{base}/0", b"", retain=True)  # after the snapshot
    await publisher.publish(f"{base}/1", {"v": 10}, retain=True)
    await publisher.publish(f"{base}/9", {"v": 9}, retain=True)
    await publisher.flush(WAIT)
    later = await _open(buses, amqp_url)
    second = Inbox()
    await later.subscribe(f"{base}/+", second)
    assert sorted((e.topic, e.payload["v"]) for e in second.envelopes) == [
        (f"{base}/1", 10),
        (f"{base}/2", 6),
        (f"{base}/3", 7),
        (f"{base}/9", 9),
    ]
    for name in ("1", "2", "3", "9"):
        await publisher.publish(f"{base}/{name}", b"", retain=True)
