"""Retained resync after an outage: the subscriber converges to the bucket as if never away.

A subscriber reaches the shared nats-server through a `TcpProxy` (cutting it disturbs nobody
else); a controller connected directly clears, changes and creates retained topics while the
subscriber is cut off. After the reconnect the subscriber must see each change exactly once —
the clear as an empty body (``{}`` through `cascade_bus.Connector`) — and nothing for the
values that did not change.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import cascade_bus

pytestmark = [pytest.mark.nats, pytest.mark.fault]

SENTINEL = {"sentinel": True}


def changes(envelopes: list[cascade_bus.Envelope[Any]]) -> list[tuple[str, Any]]:
    """(topic, payload or "clear") of each envelope, sorted."""
    return sorted(
        ((env.topic, "clear" if env.is_clear else env.payload) for env in envelopes),
        key=str,
    )


async def outage(proxy: Any, bus: cascade_bus.Bus, kit: Any) -> None:
    """Cut the bus's link and refuse new ones until `proxy.resume()`; wait until it noticed."""
    proxy.pause()
    await proxy.cut()
    await kit.wait_disconnected(bus)


async def until_sentinel(
    controller: cascade_bus.Bus, inbox: Any, topic: str
) -> list[cascade_bus.Envelope[Any]]:
    """Publish a live sentinel after everything else and wait for it; return what came before."""
    await controller.publish(topic, SENTINEL)
    await inbox.wait_until(lambda: SENTINEL in inbox.payloads, "the sentinel")
    envelopes = list(inbox.envelopes)
    return envelopes[: inbox.payloads.index(SENTINEL)]


@pytest.mark.parametrize("qos", [0, 1])
async def test_cleared_changed_and_created_during_an_outage_arrive_once(
    nats_url, tcp_proxy, unique_topic, kit, buses, api, qos
):
    base = f"{unique_topic}/state"
    controller = await cascade_bus.connect(nats_url)
    buses.append(controller)
    for name in "abc":
        await controller.publish(f"{base}/{name}", {"v": 1}, retain=True)
    proxy = await tcp_proxy(nats_url)
    subscriber = await cascade_bus.connect(proxy.url_for("nats"), **kit.FAST_RECONNECT)
    buses.append(subscriber)
    inbox = kit.Inbox()
    await subscriber.subscribe(f"{base}/#", inbox, qos=qos)
    assert changes(inbox.envelopes) == [(f"{base}/{n}", {"v": 1}) for n in "abc"]
    before = len(inbox)
    try:
        await outage(proxy, subscriber, kit)
        await controller.publish(f"{base}/a", b"", retain=True)
        await controller.publish(f"{base}/b", {"v": 2}, retain=True)
        await controller.publish(f"{base}/d", {"v": 1}, retain=True)
        await controller.flush(timeout=kit.WAIT)
        proxy.resume()
        await kit.wait_connected(subscriber, reconnects=1)

        got = await until_sentinel(controller, inbox, f"{base}/z")
        assert changes(got[before:]) == [
            (f"{base}/a", "clear"),
            (f"{base}/b", {"v": 2}),
            (f"{base}/d", {"v": 1}),
        ], [(e.topic, e.payload) for e in inbox.envelopes]
        assert kit.nats(subscriber).resync_failures == 0
        assert subscriber.stats().dropped_total == 0, subscriber.stats()
    finally:
        for name in "abcd":
            await controller.publish(f"{base}/{name}", b"", retain=True)


@pytest.mark.parametrize(("publish_qos", "qos"), [(0, 0), (1, 0), (1, 1)])
async def test_retained_values_first_seen_live_resync_too(
    nats_url, tcp_proxy, unique_topic, kit, buses, api, publish_qos, qos
):
    """Retained values set after subscribing arrive live; a resync still diffs against them.

    The live copy of a retained publish (it carries the revision header) is handed on with
    ``Message.retain`` set, on the fast path and on nats-py's public API alike, on each route:
    core plain (QoS-0 publish), core prefixed (QoS-1 publish, QoS-0 subscription) and the
    JetStream consumer (QoS 1 both). A value cleared live before the outage is forgotten: no
    second clear for it after the reconnect.
    """
    base = f"{unique_topic}/live"
    controller = await cascade_bus.connect(nats_url)
    buses.append(controller)
    proxy = await tcp_proxy(nats_url)
    subscriber = await cascade_bus.connect(proxy.url_for("nats"), **kit.FAST_RECONNECT)
    buses.append(subscriber)
    assert (kit.nats(subscriber)._router is None) == (api == "public")
    inbox = kit.Inbox()
    await subscriber.subscribe(f"{base}/#", inbox, qos=qos)
    assert len(inbox) == 0
    try:
        for name in "abcd":
            await controller.publish(f"{base}/{name}", {"v": 1}, retain=True, qos=publish_qos)
        await controller.publish(f"{base}/d", b"", retain=True, qos=publish_qos)
        await inbox.wait_for(5, kit.WAIT)
        assert [(e.topic, "clear" if e.is_clear else e.payload) for e in inbox.envelopes] == [
            *((f"{base}/{n}", {"v": 1}) for n in "abcd"),
            (f"{base}/d", "clear"),
        ]
        before = len(inbox)

        await outage(proxy, subscriber, kit)
        await controller.publish(f"{base}/a", b"", retain=True, qos=publish_qos)
        await controller.publish(f"{base}/b", {"v": 2}, retain=True, qos=publish_qos)
        await controller.publish(f"{base}/e", {"v": 1}, retain=True, qos=publish_qos)
        await controller.flush(timeout=kit.WAIT)
        proxy.resume()
        await kit.wait_connected(subscriber, reconnects=1)

        got = await until_sentinel(controller, inbox, f"{base}/z")
        assert changes(got[before:]) == [
            (f"{base}/a", "clear"),
            (f"{base}/b", {"v": 2}),
            (f"{base}/e", {"v": 1}),
        ], [(e.topic, e.payload) for e in inbox.envelopes]
        assert kit.nats(subscriber).resync_failures == 0
        assert subscriber.stats().dropped_total == 0, subscriber.stats()
    finally:
        for name in "abcde":
            await controller.publish(f"{base}/{name}", b"", retain=True)


async def test_exact_topic_subscriptions_resync_too(nats_url, tcp_proxy, unique_topic, kit, buses):
    """Without a wildcard: a cleared topic gets its clear, a changed one its value, once."""
    controller = await cascade_bus.connect(nats_url)
    buses.append(controller)
    topics = {name: f"{unique_topic}/{name}" for name in ("cleared", "changed", "same")}
    for topic in topics.values():
        await controller.publish(topic, {"v": 1}, retain=True)
    proxy = await tcp_proxy(nats_url)
    subscriber = await cascade_bus.connect(proxy.url_for("nats"), **kit.FAST_RECONNECT)
    buses.append(subscriber)
    inboxes = {name: kit.Inbox() for name in topics}
    for name, topic in topics.items():
        await subscriber.subscribe(topic, inboxes[name])
        assert inboxes[name].payloads == [{"v": 1}]
    try:
        await outage(proxy, subscriber, kit)
        await controller.publish(topics["cleared"], b"", retain=True)
        await controller.publish(topics["changed"], {"v": 2}, retain=True)
        await controller.flush(timeout=kit.WAIT)
        proxy.resume()
        await kit.wait_connected(subscriber, reconnects=1)

        for name, topic in topics.items():
            await until_sentinel(controller, inboxes[name], topic)
        assert [e.is_clear for e in inboxes["cleared"].envelopes] == [False, True, False]
        assert inboxes["changed"].payloads == [{"v": 1}, {"v": 2}, SENTINEL]
        assert inboxes["same"].payloads == [{"v": 1}, SENTINEL]
    finally:
        for topic in topics.values():
            await controller.publish(topic, b"", retain=True)


async def test_a_run_resumed_during_the_outage_resumes_through_the_connector(
    nats_url, tcp_proxy, unique_topic, kit
):
    """Cascade's engine: a constraint cleared while it was cut off arrives as ``{}``."""
    base = f"cascade/constraints/{unique_topic.replace('/', '-')}"
    controller = cascade_bus.Connector(nats_url, presence=False)
    await controller.connect()
    proxy = await tcp_proxy(nats_url)
    engine = cascade_bus.Connector(proxy.url_for("nats"), presence=False, **kit.FAST_RECONNECT)
    calls: list[tuple[str, dict[str, Any]]] = []
    changed = asyncio.Event()

    async def callback(topic: str, payload: dict[str, Any]) -> None:
        calls.append((topic, payload))
        changed.set()

    async def wait_for(predicate: Any, what: str) -> None:
        try:
            async with asyncio.timeout(kit.WAIT):
                while not predicate():
                    changed.clear()
                    await changed.wait()
        except TimeoutError:
            raise AssertionError(f"waited for {what}; calls: {calls}") from None

    try:
        await controller.publish(f"{base}/run-1", {"paused": True}, retain=True)
        await controller.publish(f"{base}/run-2", {"paused": True}, retain=True)
        assert controller.bus is not None
        await controller.bus.flush(timeout=kit.WAIT)
        await engine.connect()
        assert engine.bus is not None
        await engine.subscribe(f"{base}/#", callback)
        assert sorted(calls, key=str) == [
            (f"{base}/run-1", {"paused": True}),
            (f"{base}/run-2", {"paused": True}),
        ]
        before = len(calls)

        await outage(proxy, engine.bus, kit)
        await controller.publish(f"{base}/run-1", {}, retain=True)  # resumed
        await controller.publish(f"{base}/run-3", {"paused": True}, retain=True)
        await controller.bus.flush(timeout=kit.WAIT)
        proxy.resume()
        await kit.wait_connected(engine.bus, reconnects=1)

        await wait_for(lambda: len(calls) >= before + 2, "two changes")
        await controller.publish(f"{base}/zz", {"end": True})
        await wait_for(lambda: (f"{base}/zz", {"end": True}) in calls, "the end")
        assert sorted(calls[before:-1], key=str) == [
            (f"{base}/run-1", {}),
            (f"{base}/run-3", {"paused": True}),
        ], calls
        assert controller.publish_failures == engine.publish_failures == 0
    finally:
        for run in ("run-1", "run-2", "run-3"):
            await controller.publish(f"{base}/{run}", {}, retain=True)
        await engine.disconnect()
        await controller.disconnect()


async def test_two_outages_in_a_row_converge(nats_url, tcp_proxy, unique_topic, kit, buses):
    """Lost again right after a reconnect (possibly mid-resync): the next resync completes.

    Whatever the first resync managed, the subscriber ends with each topic's final state,
    hears each clear once and never the same value twice in a row.
    """
    base = f"{unique_topic}/twice"
    controller = await cascade_bus.connect(nats_url)
    buses.append(controller)
    for name in "abc":
        await controller.publish(f"{base}/{name}", {"v": 1}, retain=True)
    proxy = await tcp_proxy(nats_url)
    subscriber = await cascade_bus.connect(proxy.url_for("nats"), **kit.FAST_RECONNECT)
    buses.append(subscriber)
    inbox = kit.Inbox()
    await subscriber.subscribe(f"{base}/#", inbox)
    before = len(inbox)
    try:
        await outage(proxy, subscriber, kit)
        await controller.publish(f"{base}/a", b"", retain=True)
        await controller.publish(f"{base}/b", {"v": 2}, retain=True)
        await controller.publish(f"{base}/d", {"v": 1}, retain=True)
        await controller.flush(timeout=kit.WAIT)
        proxy.resume()
        await kit.wait_connected(subscriber, reconnects=1)
        await outage(proxy, subscriber, kit)  # at once: the resync may be under way
        await controller.publish(f"{base}/b", {"v": 3}, retain=True)
        await controller.publish(f"{base}/c", b"", retain=True)
        await controller.flush(timeout=kit.WAIT)
        proxy.resume()
        await kit.wait_connected(subscriber, reconnects=2)

        got = (await until_sentinel(controller, inbox, f"{base}/z"))[before:]
        per_topic: dict[str, list[Any]] = {}
        for env in got:
            per_topic.setdefault(env.topic, []).append("clear" if env.is_clear else env.payload)
        assert per_topic.pop(f"{base}/a") == ["clear"], got
        assert per_topic.pop(f"{base}/c") == ["clear"], got
        assert per_topic.pop(f"{base}/d") == [{"v": 1}], got
        b_values = per_topic.pop(f"{base}/b")
        assert b_values in ([{"v": 2}, {"v": 3}], [{"v": 3}]), got
        assert not per_topic, got
    finally:
        for name in "abcd":
            await controller.publish(f"{base}/{name}", b"", retain=True)


async def test_retained_storm_across_outages_stays_in_order_without_repeats(
    nats_url, tcp_proxy, unique_topic, kit, buses
):
    """A topic overwritten 1..N while the subscriber's link drops twice: no value twice, no
    value out of order, and the last one arrives (values written while away may be skipped:
    a retained topic converges to its newest value)."""
    topic = f"{unique_topic}/storm"
    total = 400
    publisher = await cascade_bus.connect(nats_url)
    buses.append(publisher)
    await publisher.publish(topic, 0, retain=True)
    proxy = await tcp_proxy(nats_url)
    subscriber = await cascade_bus.connect(proxy.url_for("nats"), **kit.FAST_RECONNECT)
    buses.append(subscriber)
    inbox = kit.Inbox()
    await subscriber.subscribe(topic, inbox)
    marks = {100: asyncio.Event(), 250: asyncio.Event()}

    async def publish() -> None:
        for value in range(1, total + 1):
            await publisher.publish(topic, value, retain=True)
            mark = marks.get(value)
            if mark is not None:
                mark.set()

    try:
        async with asyncio.timeout(kit.WAIT * 3):
            task = asyncio.create_task(publish())
            for count, mark in enumerate(marks.values(), start=1):
                await mark.wait()
                await outage(proxy, subscriber, kit)
                proxy.resume()
                await kit.wait_connected(subscriber, reconnects=count)
            await task
        await inbox.wait_until(lambda: total in inbox.payloads, "the last value")
        values = inbox.payloads
        assert values == sorted(set(values)), values
        assert values[0] == 0
        assert values[-1] == total
        assert kit.nats(subscriber).resync_failures == 0
    finally:
        await publisher.publish(topic, b"", retain=True)
