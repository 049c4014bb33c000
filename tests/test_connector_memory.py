"""The Connector's in-process path on memory:// keeps every delivery guarantee it skips work for.

A dict published through the `Connector` reaches Connector subscribers as ``(topic, dict)``
without an envelope (`PayloadHandler`, `Bus._publish_payload`); these tests pin what must not
change: copies per subscriber, FIFO, isolation of failing callbacks, the same envelope for
`Bus` subscribers on the same broker, counters, and the typed refusal of bad payloads.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

import cascade_bus
from cascade_bus import Connector, DropReason
from cascade_bus._worker import _LOCAL_HIGH_WATER

WAIT = 5.0


@pytest.fixture
def url() -> str:
    return f"memory://connector-{uuid.uuid4().hex}"


@pytest.fixture
async def connector(url: str) -> AsyncIterator[Connector]:
    conn = Connector(url, presence=False)
    await conn.connect()
    yield conn
    await conn.disconnect()


class Received:
    """Records ``(topic, payload)`` calls; `wait` returns once ``n`` arrived (bounded)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self._changed = asyncio.Event()

    async def __call__(self, topic: str, payload: dict[str, Any]) -> None:
        self.calls.append((topic, payload))
        self._changed.set()

    async def wait(self, n: int) -> list[tuple[str, dict[str, Any]]]:
        async with asyncio.timeout(WAIT):
            while len(self.calls) < n:
                self._changed.clear()
                await self._changed.wait()
        return self.calls


async def test_each_subscriber_gets_its_own_copy(connector: Connector) -> None:
    first, second = Received(), Received()

    async def mutating(topic: str, payload: dict[str, Any]) -> None:
        payload["seen_by"] = "first"
        payload["nested"]["x"] = 99
        await first(topic, payload)

    await connector.subscribe("cascade/telemetry/#", mutating)
    await connector.subscribe("cascade/telemetry/#", second)
    sent = {"state": "RUNNING", "nested": {"x": 1}}
    await connector.publish("cascade/telemetry/r/t/1/events", sent)
    await first.wait(1)
    ((topic, got),) = await second.wait(1)
    assert topic == "cascade/telemetry/r/t/1/events"
    assert got == {"state": "RUNNING", "nested": {"x": 1}}  # not the first one's changes
    assert sent == {"state": "RUNNING", "nested": {"x": 1}}  # nor the publisher's dict
    assert got is not sent


async def test_a_lone_subscriber_gets_a_copy_too(connector: Connector) -> None:
    received = Received()
    await connector.subscribe("lone/x", received)  # the one-subscription path
    sent = {"state": "RUNNING", "n": 1}
    await connector.publish("lone/x", sent)
    sent["state"] = "CHANGED BY THE PUBLISHER"  # before the callback ran
    ((_, got),) = await received.wait(1)
    assert got == {"state": "RUNNING", "n": 1}
    assert got is not sent


async def test_the_lone_subscriber_path_follows_subscriptions_as_they_change(
    connector: Connector,
) -> None:
    # From the second publish on, the bus pushes into a topic's only subscription itself (the
    # transport's cached route); a subscription that comes or goes must be seen at once.
    first, second = Received(), Received()
    handle = await connector.subscribe("route/x", first)
    for i in range(3):
        sent = {"seq": i}
        await connector.publish("route/x", sent)
        sent["seq"] = -1  # each copy was taken at publish
    assert [p for _, p in await first.wait(3)] == [{"seq": 0}, {"seq": 1}, {"seq": 2}]
    await connector.subscribe("route/+", second)  # no longer the only one
    await connector.publish("route/x", {"seq": 3})
    await first.wait(4)
    assert [p for _, p in await second.wait(1)] == [{"seq": 3}]
    await handle.unsubscribe()  # the second is the only one now
    await connector.publish("route/x", {"seq": 4})
    await connector.publish("route/x", {"seq": 5})
    assert [p["seq"] for _, p in await second.wait(3)] == [3, 4, 5]
    assert [p["seq"] for _, p in first.calls] == [0, 1, 2, 3]  # nothing after it left
    assert connector.bus is not None
    assert connector.bus.stats().published == 6


@pytest.mark.parametrize("bad", [["a", "b"], {"a": 1}, None, 7])
async def test_a_topic_that_is_not_a_str_is_refused_by_type(url: str, bad: Any) -> None:
    async with cascade_bus.connect(url) as bus:
        with pytest.raises(cascade_bus.InvalidTopic):
            await bus.publish(bad, {"a": 1})
    conn = Connector(url, presence=False)
    await conn.connect()
    try:
        await conn.publish(bad, {"a": 1})  # the Connector logs and counts, never raises
        assert conn.publish_failures == 1
    finally:
        await conn.disconnect()


async def test_a_slow_callback_holds_the_publisher_back(connector: Connector) -> None:
    gate = asyncio.Event()
    seen: list[int] = []
    all_seen = asyncio.Event()

    async def slow(_topic: str, payload: dict[str, Any]) -> None:
        await gate.wait()  # a callback that really waits, unlike the benchmark's
        seen.append(payload["seq"])
        if len(seen) == 1000:
            all_seen.set()

    await connector.subscribe("slow/x", slow)
    bus = connector.bus
    assert bus is not None

    async def publish_all() -> None:
        for i in range(1000):
            await connector.publish("slow/x", {"seq": i})

    publisher = asyncio.create_task(publish_all())
    for _ in range(2000):  # turns enough to publish all 1,000 if nothing held it back
        await asyncio.sleep(0)
    assert not publisher.done()
    # the queue filled up to its in-process high-water mark, and no further
    assert _LOCAL_HIGH_WATER <= bus.stats().buffered <= 2 * _LOCAL_HIGH_WATER
    gate.set()
    async with asyncio.timeout(WAIT):
        await publisher
        await all_seen.wait()
    assert seen == list(range(1000))
    assert connector.publish_failures == 0


async def test_fifo_and_counters(connector: Connector) -> None:
    received = Received()
    await connector.subscribe("fifo/+", received)
    for i in range(2000):  # past the subscription's high-water mark: flow control engages
        await connector.publish("fifo/a", {"seq": i})
    calls = await received.wait(2000)
    assert [p["seq"] for _, p in calls] == list(range(2000))
    assert connector.bus is not None
    stats = connector.bus.stats()
    assert stats.published == 2000
    assert stats.delivered == 2000
    assert connector.publish_failures == 0


async def test_a_failing_callback_is_isolated_and_counted(url: str) -> None:
    received = Received()
    errors: list[tuple[Exception, str, Any]] = []

    def on_error(exc: Exception, topic: str, env: Any) -> None:
        errors.append((exc, topic, env))

    connector = Connector(url, presence=False, on_error=on_error)
    await connector.connect()
    assert connector.bus is not None

    async def failing(topic: str, payload: dict[str, Any]) -> None:
        if payload["n"] == 1:
            raise RuntimeError("callback bug")
        await received(topic, payload)

    await connector.subscribe("fail/x", failing)
    for n in range(3):
        await connector.publish("fail/x", {"n": n})
    calls = await received.wait(2)
    assert [p["n"] for _, p in calls] == [0, 2]
    assert connector.bus.stats().dropped.get(DropReason.HANDLER_ERROR) == 1
    ((exc, topic, env),) = errors
    assert str(exc) == "callback bug"
    assert topic == "fail/x"
    assert env.payload == {"n": 1}  # reported with the message it failed on
    await connector.disconnect()


async def test_bus_subscribers_get_one_envelope_with_the_publishers_metadata(
    url: str, connector: Connector
) -> None:
    before = datetime.now(UTC)
    async with (
        cascade_bus.connect(url) as bus,
        bus.subscribe("env/+") as one,
        bus.subscribe("env/#") as two,
    ):
        await connector.publish("env/a", {"k": [1, 2]})
        a = await one.get(timeout=WAIT)
        b = await two.get(timeout=WAIT)
    assert a.payload == b.payload == {"k": [1, 2]}
    assert a.payload is not b.payload
    assert a.id  # one message, one id, whoever receives it
    assert a.id == b.id
    assert a.topic == "env/a"
    assert a.source == b.source
    assert before - timedelta(seconds=1) <= a.time <= datetime.now(UTC)
    assert a.time == b.time


async def test_non_dict_payloads_and_clears_keep_their_shape(connector: Connector) -> None:
    received = Received()
    await connector.subscribe("shape/#", received)
    await connector.publish("shape/text", "hello")
    await connector.publish("shape/retained", {"paused": True}, retain=True)
    await connector.publish("shape/retained", {}, retain=True)  # a clear
    calls = await received.wait(3)
    assert calls == [
        ("shape/text", {"value": "hello"}),
        ("shape/retained", {"paused": True}),
        ("shape/retained", {}),
    ]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
async def test_a_non_finite_float_is_refused_and_counted(connector: Connector, bad: float) -> None:
    received = Received()
    await connector.subscribe("finite/x", received)
    await connector.publish("finite/x", {"v": bad, "other": None})
    await connector.publish("finite/x", {"v": 1.5, "other": None})
    ((_, got),) = await received.wait(1)
    assert got == {"v": 1.5, "other": None}
    assert connector.publish_failures == 1


async def test_an_unencodable_payload_is_refused_and_counted(connector: Connector) -> None:
    await connector.publish("bad/x", {"obj": object()})
    assert connector.publish_failures == 1


async def test_the_bus_api_raises_what_the_connector_counts(url: str) -> None:
    async with cascade_bus.connect(url) as bus:
        with pytest.raises(cascade_bus.EncodeError, match="bad/x"):
            bus._publish_payload("bad/x", {"v": math.nan})
        with pytest.raises(cascade_bus.InvalidTopic):
            bus._publish_payload("bad/+", {"v": 1})


async def test_messages_the_transport_delivers_reach_the_callback_in_order(url: str) -> None:
    # Retained replays and publishes with metadata reach a Connector subscription as messages
    # (not pushed payloads); it queues them in the pushed form (`RECEIVED`), FIFO with the rest.
    async with cascade_bus.connect(url) as bus:
        await bus.publish("wrapped/r", {"kept": True}, retain=True)
        connector = Connector(url, presence=False)
        await connector.connect()
        try:
            received = Received()
            await connector.subscribe("wrapped/+", received)
            assert received.calls == [("wrapped/r", {"kept": True})]  # before subscribe returned
            await bus.publish("wrapped/x", {"n": 1}, headers={"h": "1"})  # a message
            await connector.publish("wrapped/x", {"n": 2})  # a pushed payload
            await bus.publish("wrapped/x", "text", headers={"h": "3"})  # shaped for Cascade
            calls = await received.wait(4)
            assert calls[1:] == [
                ("wrapped/x", {"n": 1}),
                ("wrapped/x", {"n": 2}),
                ("wrapped/x", {"value": "text"}),
            ]
        finally:
            await connector.disconnect()


async def test_a_full_payload_subscription_drops_wrapped_messages_counted(url: str) -> None:
    from cascade_bus._worker import PayloadHandler

    gate = asyncio.Event()
    seen: list[int] = []
    four = asyncio.Event()

    class Slow(PayloadHandler):
        async def callback(self, _topic: str, payload: Any) -> None:
            await gate.wait()
            seen.append(payload["n"])
            if len(seen) == 4:
                four.set()

    errors: list[Exception] = []
    async with cascade_bus.connect(url, on_error=lambda e, *_: errors.append(e)) as bus:
        await bus.subscribe("full/x", Slow(), buffer_size=4, overflow="drop_oldest")
        for n in range(10):  # with headers: messages, not pushed payloads; no yield between
            await bus.publish("full/x", {"n": n}, headers={"k": "v"})
        gate.set()
        async with asyncio.timeout(WAIT):
            await four.wait()
        assert seen == [6, 7, 8, 9]  # the newest four
        stats = bus.stats()
        assert stats.dropped.get(DropReason.OVERFLOW) == 6
        assert stats.delivered == 4
        assert stats.buffered == 0
        assert errors == []
