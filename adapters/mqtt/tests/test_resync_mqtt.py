"""Retained resync after a reconnect: a subscriber converges to the broker's retained state.

A subscriber on ``<base>/#`` holds retained ``a``, ``b`` and ``c``. Its connection is cut (the
TCP proxy refuses it for a while); meanwhile another client clears ``a``, changes ``b`` and
creates ``d``. After the reconnect the subscriber gets exactly a clear for ``a``, the new ``b``
and ``d``, each once, and nothing for ``c`` (unchanged: no duplicate replay).

The transport ends the resync before it reports itself connected again, so a live marker
published after ``wait_connected`` arrives behind everything the resync delivered: the tests
wait for the marker (bounded), never for time to pass. Retained topics are cleared at the end.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

import cascade_bus

pytestmark = [pytest.mark.fault, pytest.mark.mqtt]

VERSIONS = pytest.mark.parametrize("version", ["5", "3.1.1"])
MARKER = "marker"


@pytest.fixture
async def retained(mqtt_url: str) -> AsyncIterator[list[str]]:
    """A list of retained topics to clear on the shared broker after the test."""
    topics: list[str] = []
    yield topics
    async with asyncio.timeout(10.0), cascade_bus.connect(mqtt_url) as bus:
        for topic in topics:
            await bus.publish(topic, b"", qos=1, retain=True)


def _summary(envs: list[cascade_bus.Envelope[Any]]) -> list[tuple[str, Any]]:
    """(last topic level, payload or "clear"), sorted: the replay order is the broker's."""
    return sorted(
        ((env.topic.rsplit("/", 1)[1], "clear" if env.is_clear else env.payload) for env in envs),
        key=repr,
    )


async def _change_while_away(writer: cascade_bus.Bus, base: str) -> None:
    """Clear ``a``, change ``b``, create ``d`` (each acknowledged by the broker)."""
    await writer.publish(f"{base}/a", b"", qos=1, retain=True)
    await writer.publish(f"{base}/b", {"v": 2}, qos=1, retain=True)
    await writer.publish(f"{base}/d", {"v": 1}, qos=1, retain=True)


@VERSIONS
@pytest.mark.parametrize("qos", [0, 1])
async def test_reconnect_reports_changes_once_and_clears(
    mqtt_url, tcp_proxy, unique_topic, kit, buses, retained, version, qos
):
    """Through a proxy to the shared broker: after the outage, a clear for ``a`` (an empty
    body), ``b=2`` and ``d=1``, each once, nothing for ``c``, and no duplicates counted."""
    base = unique_topic
    retained.extend(f"{base}/{name}" for name in "abcd")
    proxy = await tcp_proxy(mqtt_url)
    writer = await cascade_bus.connect(mqtt_url)
    buses.append(writer)
    for name in "abc":
        await writer.publish(f"{base}/{name}", {"v": 1}, qos=1, retain=True)

    sub = await cascade_bus.connect(proxy.url_for("mqtt"), version=version, **kit.FAST_RECONNECT)
    buses.append(sub)
    inbox = kit.Inbox()
    await sub.subscribe(f"{base}/#", inbox, qos=qos)
    assert _summary(inbox.envelopes) == [("a", {"v": 1}), ("b", {"v": 1}), ("c", {"v": 1})]

    proxy.pause()
    assert await proxy.cut() == 1
    await kit.wait_disconnected(sub)
    await _change_while_away(writer, base)
    proxy.resume()
    await kit.wait_connected(sub, reconnects=1)

    await writer.publish(f"{base}/{MARKER}", {"end": True}, qos=1)
    await inbox.wait_until(
        lambda: any(env.topic.endswith(MARKER) for env in inbox.envelopes), "the marker"
    )
    after = inbox.envelopes[3:]
    assert after[-1].topic == f"{base}/{MARKER}", _summary(after)
    assert _summary(after[:-1]) == [("a", "clear"), ("b", {"v": 2}), ("d", {"v": 1})]
    clear = next(env for env in after if env.topic == f"{base}/a")
    assert clear.payload == b""
    stats = sub.stats()
    assert stats.duplicates == 0
    assert stats.dropped == {}
    assert stats.reconnects == 1


@VERSIONS
async def test_connector_gets_the_clear_as_an_empty_dict(
    mqtt_url, tcp_proxy, unique_topic, kit, buses, retained, version
):
    """The same through Cascade's `Connector`: the clear reaches the callback as ``{}``."""
    base = unique_topic
    retained.extend(f"{base}/{name}" for name in "abcd")
    proxy = await tcp_proxy(mqtt_url)
    writer = await cascade_bus.connect(mqtt_url, format="raw")
    buses.append(writer)
    for name in "abc":
        await writer.publish(f"{base}/{name}", {"v": 1}, qos=1, retain=True)

    connector = cascade_bus.Connector(proxy.url_for("mqtt"), version=version, **kit.FAST_RECONNECT)
    got: list[tuple[str, dict[str, Any]]] = []
    changed = asyncio.Event()

    async def callback(topic: str, payload: dict[str, Any]) -> None:
        got.append((topic.rsplit("/", 1)[1], payload))
        changed.set()

    async def wait_for_marker() -> None:
        async with asyncio.timeout(kit.WAIT):
            while not any(name == MARKER for name, _ in got):
                changed.clear()
                await changed.wait()

    await connector.connect()
    try:
        await connector.subscribe(f"{base}/#", callback)
        assert sorted(got) == [("a", {"v": 1}), ("b", {"v": 1}), ("c", {"v": 1})]
        bus = connector.bus
        assert bus is not None

        proxy.pause()
        assert await proxy.cut() == 1
        await kit.wait_disconnected(bus)
        await _change_while_away(writer, base)
        proxy.resume()
        await kit.wait_connected(bus, reconnects=1)

        await writer.publish(f"{base}/{MARKER}", {"end": True}, qos=1)
        await wait_for_marker()
        after = got[3:]
        assert after[-1] == (MARKER, {"end": True}), after
        assert sorted(after[:-1]) == [("a", {}), ("b", {"v": 2}), ("d", {"v": 1})]
        assert bus.stats().duplicates == 0
        assert connector.publish_failures == 0
    finally:
        await connector.disconnect()


@VERSIONS
async def test_lost_again_mid_resync_begins_again(
    private_mosquitto, tcp_proxy, unique_topic, kit, buses, version
):
    """The connection drops again while the replay is still arriving: no resync end for that
    incomplete replay (``c``, not replayed yet, must not be reported cleared), and the next
    reconnect's resync still delivers each change once.

    The broker sends one QoS 1 message at a time (``max_inflight_messages 1``) and the handler
    holds the first change of the resync unacknowledged while it cuts the connection: the rest
    of the replay and the barrier behind it cannot have arrived yet.
    """
    broker = private_mosquitto(extra_config="max_inflight_messages 1")
    base = unique_topic
    proxy = await tcp_proxy(broker.url)
    writer = await cascade_bus.connect(broker.url)
    buses.append(writer)
    for name in "abc":
        await writer.publish(f"{base}/{name}", {"v": 1}, qos=1, retain=True)

    sub = await cascade_bus.connect(proxy.url_for("mqtt"), version=version, **kit.FAST_RECONNECT)
    buses.append(sub)
    inbox = kit.Inbox()
    away = asyncio.Event()
    cut_once: list[int] = []

    async def handler(env: cascade_bus.Envelope[Any]) -> None:
        inbox(env)
        if away.is_set() and not cut_once:
            cut_once.append(await proxy.cut())  # mid-replay: this message is not acked yet

    await sub.subscribe(f"{base}/#", handler, qos=1)
    assert _summary(inbox.envelopes) == [("a", {"v": 1}), ("b", {"v": 1}), ("c", {"v": 1})]

    proxy.pause()
    assert await proxy.cut() == 1
    await kit.wait_disconnected(sub)
    await _change_while_away(writer, base)
    away.set()
    proxy.resume()
    await kit.wait_connected(sub, reconnects=1)  # the attempt cut mid-resync did not count
    assert cut_once == [1]
    assert proxy.accepted == 3

    await writer.publish(f"{base}/{MARKER}", {"end": True}, qos=1)
    await inbox.wait_until(
        lambda: any(env.topic.endswith(MARKER) for env in inbox.envelopes), "the marker"
    )
    after = inbox.envelopes[3:]
    assert after[-1].topic == f"{base}/{MARKER}", _summary(after)
    assert _summary(after[:-1]) == [("a", "clear"), ("b", {"v": 2}), ("d", {"v": 1})]
    assert sub.stats().duplicates == 0
    assert sub.stats().reconnects == 1


@VERSIONS
@pytest.mark.parametrize(
    "qos",
    [
        0,
        pytest.param(
            1,
            marks=pytest.mark.xfail(
                strict=True,
                reason="known limit: the resumed session's queue brings d=1 live (retain flag "
                "off) before the resubscribe; the ledger does not record live messages on "
                "topics it does not know, so the replay of d=1 is handed over a second time",
            ),
        ),
    ],
)
async def test_persistent_session_resync(
    private_mosquitto, tcp_proxy, unique_topic, kit, buses, version, qos
):
    """``clean_start=false``: the broker keeps the session across the cut. With QoS 0 nothing
    is queued for it while away and the resync alone reports the changes; with QoS 1 the
    session's queue brings them live first (the clear as an empty body) and the replay must
    add nothing."""
    broker = private_mosquitto()
    base = unique_topic
    proxy = await tcp_proxy(broker.url)
    writer = await cascade_bus.connect(broker.url)
    buses.append(writer)
    for name in "abc":
        await writer.publish(f"{base}/{name}", {"v": 1}, qos=1, retain=True)
    sub = await cascade_bus.connect(
        proxy.url_for("mqtt"),
        version=version,
        client_id=f"resync-{uuid.uuid4().hex[:12]}",
        clean_start=False,
        **kit.FAST_RECONNECT,
    )
    buses.append(sub)
    inbox = kit.Inbox()
    await sub.subscribe(f"{base}/#", inbox, qos=qos)
    assert _summary(inbox.envelopes) == [("a", {"v": 1}), ("b", {"v": 1}), ("c", {"v": 1})]

    proxy.pause()
    assert await proxy.cut() == 1
    await kit.wait_disconnected(sub)
    await _change_while_away(writer, base)
    proxy.resume()
    await kit.wait_connected(sub, reconnects=1)

    await writer.publish(f"{base}/{MARKER}", {"end": True}, qos=1)
    await inbox.wait_until(
        lambda: any(env.topic.endswith(MARKER) for env in inbox.envelopes), "the marker"
    )
    after = inbox.envelopes[3:]
    assert after[-1].topic == f"{base}/{MARKER}", _summary(after)
    assert _summary(after[:-1]) == [("a", "clear"), ("b", {"v": 2}), ("d", {"v": 1})]
    assert sub.stats().duplicates == 0


@VERSIONS
async def test_resync_replay_is_flow_controlled(
    private_mosquitto, tcp_proxy, unique_topic, kit, buses, version
):
    """200 retained topics changed while away, a QoS 0 subscription with room for 4 and a slow
    handler: reading pauses while the replay arrives (the QoS 1 barrier in flight does not turn
    flow control off), so every change is handled once and nothing overflows."""
    count = 200
    broker = private_mosquitto()
    base = unique_topic
    proxy = await tcp_proxy(broker.url)
    writer = await cascade_bus.connect(broker.url)
    buses.append(writer)
    for n in range(count):
        await writer.publish(f"{base}/{n}", {"v": 1}, qos=1, retain=True)
    sub = await cascade_bus.connect(proxy.url_for("mqtt"), version=version, **kit.FAST_RECONNECT)
    buses.append(sub)
    inbox = kit.Inbox()

    async def slow(env: cascade_bus.Envelope[Any]) -> None:
        inbox(env)
        await asyncio.sleep(0.001)  # a slow consumer (not a wait for anything)

    await sub.subscribe(f"{base}/#", slow, buffer_size=4)
    assert len(inbox) == count

    proxy.pause()
    assert await proxy.cut() == 1
    await kit.wait_disconnected(sub)
    for n in range(count):
        await writer.publish(f"{base}/{n}", {"v": 2}, qos=1, retain=True)
    proxy.resume()
    await kit.wait_connected(sub, reconnects=1)

    await writer.publish(f"{base}/{MARKER}", {"end": True}, qos=1)
    await inbox.wait_until(
        lambda: any(env.topic.endswith(MARKER) for env in inbox.envelopes), "the marker"
    )
    after = inbox.envelopes[count:-1]
    assert sorted(int(env.topic.rsplit("/", 1)[1]) for env in after) == list(range(count))
    assert all(env.payload == {"v": 2} for env in after)
    assert sub.stats().dropped == {}


@VERSIONS
async def test_overlapping_and_shared_filters_each_resync_once(
    mqtt_url, tcp_proxy, unique_topic, kit, buses, retained, version
):
    """Two subscriptions on one filter (one broker subscription, two sinks), an overlapping
    ``+`` filter and an exact one: each converges on its own, once. With MQTT 3.1.1 (no
    subscription identifiers) a replay reaches every matching filter, so every sink resyncs
    together."""
    base = unique_topic
    retained.extend(f"{base}/{name}" for name in "abcd")
    proxy = await tcp_proxy(mqtt_url)
    writer = await cascade_bus.connect(mqtt_url)
    buses.append(writer)
    for name in "abc":
        await writer.publish(f"{base}/{name}", {"v": 1}, qos=1, retain=True)
    sub = await cascade_bus.connect(proxy.url_for("mqtt"), version=version, **kit.FAST_RECONNECT)
    buses.append(sub)
    inboxes = {
        "#1": (f"{base}/#", kit.Inbox()),
        "#2": (f"{base}/#", kit.Inbox()),
        "+": (f"{base}/+", kit.Inbox()),
        "b": (f"{base}/b", kit.Inbox()),
    }
    for pattern, inbox in inboxes.values():
        await sub.subscribe(pattern, inbox, qos=1)
    before = {key: len(inbox) for key, (_, inbox) in inboxes.items()}
    assert before == {"#1": 3, "#2": 3, "+": 3, "b": 1}

    proxy.pause()
    assert await proxy.cut() == 1
    await kit.wait_disconnected(sub)
    await _change_while_away(writer, base)
    proxy.resume()
    await kit.wait_connected(sub, reconnects=1)

    await writer.publish(f"{base}/b", {"end": True}, qos=1)  # live, not retained: every one
    changes = [("a", "clear"), ("b", {"end": True}), ("b", {"v": 2}), ("d", {"v": 1})]
    expected = {
        "#1": changes,
        "#2": changes,
        "+": changes,
        "b": [("b", {"end": True}), ("b", {"v": 2})],
    }
    for key, (_, inbox) in inboxes.items():
        await inbox.wait_until(
            lambda inbox=inbox: any(env.payload == {"end": True} for env in inbox.envelopes),
            f"the marker ({key})",
        )
        after = inbox.envelopes[before[key] :]
        assert after[-1].payload == {"end": True}, (key, _summary(after))
        assert _summary(after) == expected[key], key
    assert sub.stats().duplicates == 0
    assert sub.stats().dropped == {}
