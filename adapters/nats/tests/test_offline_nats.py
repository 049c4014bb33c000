"""Publishing while disconnected, and the reconnect backoff: the policy every transport shares.

While a publisher is cut off, ``publish()`` at any QoS returns once the message is in the
bounded offline buffer (``offline_buffer``); QoS-1 and retained messages are sent and confirmed
after the reconnect (`Bus.flush` waits for that), and one that fails then is counted and
logged. A full buffer drops (and counts) QoS 0 and refuses QoS 1 with `PublishError`.

The publisher reaches a private nats-server through a `TcpProxy` that is cut and paused; the
subscribers connect directly, so they are sure to be there when the publisher comes back.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
from typing import Any

import nats
import pytest
from cascade_bus_nats._options import NatsOptions

import cascade_bus
from cascade_bus import DropReason, PublishError
from cascade_bus.spi import BusURL

pytestmark = [pytest.mark.nats, pytest.mark.fault]

#: A publish that is only buffered needs no round trip: it returns well within this.
HELD = 1.0


async def _cut(proxy: Any, bus: cascade_bus.Bus, kit: Any) -> None:
    proxy.pause()
    await proxy.cut()
    await kit.wait_disconnected(bus)


async def test_qos1_and_retained_publishes_return_while_down_and_arrive_after(
    private_nats, tcp_proxy, unique_topic, kit, buses, api
):
    """20 QoS-1 messages and a retained value published while cut off: all arrive, in order."""
    broker = private_nats()
    proxy = await tcp_proxy(broker.url)
    sub = await cascade_bus.connect(broker.url)
    buses.append(sub)
    inbox, live = kit.Inbox(), kit.Inbox()
    await sub.subscribe(f"{unique_topic}/q", inbox, qos=1)
    await sub.subscribe(f"{unique_topic}/r", live)
    pub = await cascade_bus.connect(proxy.url_for("nats"), **kit.FAST_RECONNECT)
    buses.append(pub)

    await _cut(proxy, pub, kit)
    async with asyncio.timeout(HELD):
        for i in range(20):
            await pub.publish(f"{unique_topic}/q", {"i": i}, qos=1)
        await pub.publish(f"{unique_topic}/r", {"v": 1}, retain=True)
    assert pub.stats().buffered == 21
    assert not inbox.envelopes

    proxy.resume()
    await kit.wait_connected(pub, reconnects=1)
    await pub.flush(timeout=kit.WAIT)  # returns once the stream acknowledged every one
    stats = pub.stats()
    assert stats.buffered == 0, stats
    assert stats.dropped_total == 0, stats
    assert await inbox.wait_for(20) == [{"i": i} for i in range(20)]
    assert await live.wait_for(1) == [{"v": 1}]
    late = kit.Inbox()
    await sub.subscribe(f"{unique_topic}/r", late)  # the KV write was made too
    assert late.payloads == [{"v": 1}]
    await pub.publish(f"{unique_topic}/r", b"", retain=True)


async def test_full_offline_buffer_refuses_qos1_and_retained_and_counts_qos0(
    private_nats, tcp_proxy, unique_topic, kit, buses
):
    broker = private_nats()
    proxy = await tcp_proxy(broker.url)
    sub = await cascade_bus.connect(broker.url)
    buses.append(sub)
    inbox = kit.Inbox()
    await sub.subscribe(f"{unique_topic}/#", inbox, qos=1)
    pub = await cascade_bus.connect(proxy.url_for("nats"), offline_buffer=3, **kit.FAST_RECONNECT)
    buses.append(pub)

    await _cut(proxy, pub, kit)
    async with asyncio.timeout(HELD):
        for i in range(3):
            await pub.publish(f"{unique_topic}/full", i, qos=1)
        with pytest.raises(PublishError) as refused:
            await pub.publish(f"{unique_topic}/full", 3, qos=1)
        assert refused.value.topic == f"{unique_topic}/full"
        with pytest.raises(PublishError):
            await pub.publish(f"{unique_topic}/kept", {"v": 1}, retain=True)
        await pub.publish(f"{unique_topic}/full", "qos0")  # never raises: dropped, counted
    stats = pub.stats()
    assert stats.buffered == 3, stats
    assert stats.dropped.get(DropReason.OFFLINE_OVERFLOW) == 3, stats

    proxy.resume()
    await kit.wait_connected(pub, reconnects=1)
    await pub.flush(timeout=kit.WAIT)
    await pub.publish(f"{unique_topic}/end", "end", qos=1)
    await inbox.wait_until(lambda: "end" in inbox.payloads, "the message after the outage")
    assert inbox.payloads == [0, 1, 2, "end"]


async def test_qos1_waiting_for_its_ack_when_the_link_drops_returns_and_is_resent(
    private_nats, tcp_proxy, unique_topic, kit, buses, api
):
    """A publish sent but not acknowledged when the link drops: held, accepted, sent again.

    The server is frozen (SIGSTOP) so the stream cannot acknowledge; the cut puts the
    message back in the offline buffer, and the publisher returns. After the reconnect it is
    sent again: the stream's duplicate window keeps it from arriving twice.
    """
    broker = private_nats()
    proxy = await tcp_proxy(broker.url)
    sub = await cascade_bus.connect(broker.url)
    buses.append(sub)
    inbox = kit.Inbox()
    await sub.subscribe(f"{unique_topic}/f", inbox, qos=1)
    pub = await cascade_bus.connect(proxy.url_for("nats"), **kit.FAST_RECONNECT)
    buses.append(pub)
    await pub.publish(f"{unique_topic}/f", 0, qos=1)

    pid = broker.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        await asyncio.to_thread(kit.wait_stopped, pid)
        pending = asyncio.create_task(pub.publish(f"{unique_topic}/f", 1, qos=1))
        await asyncio.sleep(0)  # one loop turn: the task sends it, then waits for the ack
        assert kit.nats(pub)._inflight
        assert not pending.done()
        await _cut(proxy, pub, kit)
        async with asyncio.timeout(HELD):
            await pending
        assert pub.stats().buffered == 1
    finally:
        os.kill(pid, signal.SIGCONT)
    proxy.resume()
    await kit.wait_connected(pub, reconnects=1)
    await pub.flush(timeout=kit.WAIT)
    await pub.publish(f"{unique_topic}/f", 2, qos=1)
    assert await inbox.wait_for(3) == [0, 1, 2]
    stats = pub.stats()
    assert stats.buffered == 0, stats
    assert stats.dropped_total == 0, stats


async def test_held_message_refused_after_the_reconnect_is_counted_and_logged(
    private_nats, tcp_proxy, unique_topic, kit, buses, caplog
):
    """The publish returned when it was buffered: a refusal later is counted, not lost silently.

    While the publisher is away, the stream gets a maximum message size its message exceeds.
    """
    broker = private_nats()
    proxy = await tcp_proxy(broker.url)
    pub = await cascade_bus.connect(proxy.url_for("nats"), **kit.FAST_RECONNECT)
    buses.append(pub)
    await pub.publish(f"{unique_topic}/big", "fits", qos=1)

    await _cut(proxy, pub, kit)
    async with asyncio.timeout(HELD):
        await pub.publish(f"{unique_topic}/big", "x" * 2_000, qos=1)
    nc = await nats.connect(broker.url)
    try:
        jsm = nc.jsm()
        info = await jsm.stream_info("CASCADE_BUS")
        info.config.max_msg_size = 1_000
        await jsm.update_stream(info.config)
    finally:
        await nc.close()

    caplog.set_level(logging.WARNING, logger="cascade_bus.nats")
    proxy.resume()
    await kit.wait_connected(pub, reconnects=1)
    await pub.flush(timeout=kit.WAIT)
    stats = pub.stats()
    assert stats.dropped == {DropReason.PUBLISH_FAILED: 1}, stats
    assert stats.buffered == 0, stats
    assert any(
        "accepted while disconnected" in r.getMessage() and f"{unique_topic}/big" in r.getMessage()
        for r in caplog.records
    ), caplog.text


def test_reconnect_options_shared_names_and_the_deprecated_alias():
    def parse(query: str, **options: Any) -> NatsOptions:
        url = BusURL(f"nats://127.0.0.1:4222{query}")
        return NatsOptions.parse(url, url.merged_options(options))

    default = parse("")
    assert (default.reconnect_min, default.reconnect_max) == (0.05, 5.0)
    shared = parse("?reconnect_min=0.1&reconnect_max=2")
    assert (shared.reconnect_min, shared.reconnect_max) == (0.1, 2.0)
    # reconnect_wait (deprecated) keeps its meaning: the same fixed wait between attempts.
    alias = parse("?reconnect_wait=0.3")
    assert (alias.reconnect_min, alias.reconnect_max) == (0.3, 0.3)
    assert parse("?reconnect_wait=0.3", reconnect_max=4).reconnect_max == 4.0
    with pytest.raises(cascade_bus.InvalidURL):
        parse("?reconnect_min=-1")


class _Attempts(logging.Handler):
    """Collects the wait announced after each failed reconnect attempt (event-driven)."""

    pattern = re.compile(r"next attempt in ([0-9.]+)s")

    def __init__(self, wanted: int) -> None:
        super().__init__(logging.INFO)
        self.waits: list[float] = []
        self.wanted = wanted
        self.enough = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        found = self.pattern.search(record.getMessage())
        if found:
            self.waits.append(float(found.group(1)))
            if len(self.waits) >= self.wanted:
                self.enough.set()


async def test_reconnect_waits_grow_with_jitter_up_to_reconnect_max(
    private_nats, tcp_proxy, kit, buses
):
    broker = private_nats()
    proxy = await tcp_proxy(broker.url)
    bus = await cascade_bus.connect(
        proxy.url_for("nats"), reconnect_min=0.01, reconnect_max=0.08, connect_attempt_timeout=1.0
    )
    buses.append(bus)
    attempts = _Attempts(wanted=8)
    logger = logging.getLogger("cascade_bus.nats")
    level = logger.level
    logger.addHandler(attempts)
    logger.setLevel(logging.INFO)
    try:
        await _cut(proxy, bus, kit)
        async with asyncio.timeout(kit.WAIT):
            await attempts.enough.wait()
    finally:
        logger.removeHandler(attempts)
        logger.setLevel(level)
    waits = attempts.waits
    assert all(0.0 < w <= 0.08 for w in waits), waits
    # Doubling from 0.01 with up to half of each wait jittered away: 0.02, 0.04, then 0.08.
    assert waits[0] <= 0.02 + 0.005, waits
    assert min(waits[4:]) >= 0.04 - 0.005, waits
    proxy.resume()
    await kit.wait_connected(bus, reconnects=1)
    client = kit.nats(bus).client
    assert client is not None
    assert client.options["reconnect_time_wait"] <= 0.01  # back to reconnect_min
