"""The conformance suite every cascade-bus transport runs unchanged.

Subclass `ConformanceSuite` in a test module and say which URL to test::

    from cascade_bus.testing import ConformanceSuite

    class TestMemory(ConformanceSuite):
        url = "memory://conformance"

or, when the URL comes from another fixture (a broker started for the session)::

    class TestMqtt(ConformanceSuite):
        @pytest.fixture
        def transport_url(self, mqtt_url: str) -> str:
            return mqtt_url

Every case is an ``async def`` test marked ``pytest.mark.asyncio``, so the suite runs under
pytest-asyncio in ``auto`` and ``strict`` mode alike. Cases that need a feature a transport may
lack ask the transport's `Capabilities` first and are skipped with a reason naming the missing
capability (``"nats lacks capability: retain"``); everything else must pass. The cases follow
Watermill's universal Pub/Sub tests: round trips, the wildcard matrix, ordering, concurrency,
handler failures, retained messages, queue groups, request/reply, closing, the Cascade
`Connector` scenarios and bad input.

Rules the cases keep, so a transport on a shared broker can run them in parallel: each test
publishes under its own unique prefix (the ``topic`` fixture, ``conf/<hex>``), every wait is
bounded by ``asyncio.timeout``, nothing sleeps to synchronise (a *sentinel* message published
last tells a subscriber it has seen everything before it), and retained messages a test leaves
under its prefix are cleared when the test ends.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import pytest

from .. import (
    Bus,
    BusClosed,
    BusError,
    DecodeError,
    DropReason,
    EncodeError,
    Envelope,
    InvalidTopic,
    NoResponders,
    PayloadTooLarge,
    RequestTimeout,
    UnsupportedFeature,
)
from ._base import SuiteBase
from ._helpers import (
    SENTINEL_KEY,
    BusFactory,
    CallbackRecorder,
    Collector,
    ConnectorFactory,
    ErrorRecorder,
    Reading,
    Signal,
    is_sentinel,
    sentinel,
    with_query,
)

__all__ = [
    "SENTINEL_KEY",
    "BusFactory",
    "CallbackRecorder",
    "Collector",
    "ConformanceSuite",
    "ConnectorFactory",
    "ErrorRecorder",
    "Reading",
    "Signal",
    "SuiteBase",
    "is_sentinel",
    "sentinel",
    "with_query",
]

#: Payloads that must come back equal and of the same type (bytes stay bytes).
ROUND_TRIP_PAYLOADS: tuple[Any, ...] = (
    {"a": 1, "b": "two", "c": [1, 2]},
    {},
    [1, "two", 3.5, None, True],
    [],
    'plain text with ünïcödé and "quotes"',
    "",
    42,
    -7,
    2**53,
    3.25,
    True,
    False,
    None,
    {"nested": {"list": [{"deep": [1, 2, {"x": None}]}], "empty": {}, "n": 0, "f": -0.5}},
    b"\x00\x01\xfe\xffbinary",
    b"{}",  # bytes that look like JSON still come back as bytes
)

#: The same for ``format=raw``: the body is the bare payload, so bytes must not look like JSON.
RAW_ROUND_TRIP_PAYLOADS: tuple[Any, ...] = (
    {"a": 1, "b": "two", "c": [1, 2]},
    {},
    [1, "two", 3.5, None, True],
    "plain text with ünïcödé",
    42,
    3.25,
    True,
    {"nested": {"list": [{"deep": [1, 2, {"x": None}]}]}},
    b"\x00\x01\xfe\xffbinary",
)

#: Concrete topics (relative to the test's prefix) the wildcard matrix publishes to.
WILDCARD_TOPICS: tuple[str, ...] = (
    "a",
    "ab",
    "a/b",
    "a/c",
    "b/a",
    "x/y",
    "A/b",
    "a/b/c",
    "a/x/c",
    "a/b/d",
    "a/b/c/d",
)

#: Pattern (relative to the prefix) → exactly the topics of `WILDCARD_TOPICS` it matches.
#: Written out by hand rather than computed, so the suite does not trust the matcher it tests.
WILDCARD_MATRIX: dict[str, frozenset[str]] = {
    "a": frozenset({"a"}),
    "a/b": frozenset({"a/b"}),
    "a/b/c/d": frozenset({"a/b/c/d"}),
    "+": frozenset({"a", "ab"}),
    "a/+": frozenset({"a/b", "a/c"}),
    "+/b": frozenset({"a/b", "A/b"}),
    "A/+": frozenset({"A/b"}),
    "+/+": frozenset({"a/b", "a/c", "b/a", "x/y", "A/b"}),
    "a/+/c": frozenset({"a/b/c", "a/x/c"}),
    "+/+/c": frozenset({"a/b/c", "a/x/c"}),
    "a/#": frozenset({"a", "a/b", "a/c", "a/b/c", "a/x/c", "a/b/d", "a/b/c/d"}),
    "a/b/#": frozenset({"a/b", "a/b/c", "a/b/d", "a/b/c/d"}),
    "a/+/#": frozenset({"a/b", "a/c", "a/b/c", "a/x/c", "a/b/d", "a/b/c/d"}),
    "a/b/c/d/#": frozenset({"a/b/c/d"}),
    "#": frozenset(WILDCARD_TOPICS),
}

#: Topic levels with characters some brokers cannot carry natively (the adapter must escape).
ODD_LEVELS: tuple[str, ...] = (
    "with.dot",
    "ünïcödé",
    "dash-and_underscore",
    "sp ace",
    "star*in",
    "gt>in",
    "dollar$in",
    "UPPER",
    "123",
    "semi;colon:",
)


class _Boom(Exception):
    """What the failing handlers raise."""


class ConformanceSuite(SuiteBase):
    """The conformance cases; subclass it as ``TestSomething`` and provide the URL.

    Set the class attribute ``url`` or override the ``transport_url`` fixture; the fixtures
    are `SuiteBase`'s (``make_bus``, ``bus``, ``unique``, ``topic``, ``make_connector``).
    """

    async def _round_trip(
        self, publisher: Bus, subscriber: Bus, topic: str, payloads: Sequence[Any]
    ) -> list[Envelope[Any]]:
        """Publish each payload to its own sub-topic; return the envelopes, in payload order."""
        inbox = Collector()
        headers = {"x-trace": "trace-1", "tenant": "acme"}
        await self.subscribe_children(
            subscriber, f"{topic}/rt", map(str, range(len(payloads))), inbox
        )
        for i, payload in enumerate(payloads):
            await publisher.publish(f"{topic}/rt/{i}", payload, headers=headers)
        await inbox.wait_count(len(payloads), self.wait_timeout)
        by_topic = {e.topic: e for e in inbox.envelopes}
        assert len(by_topic) == len(inbox.envelopes) == len(payloads), inbox.describe()
        out = [by_topic[f"{topic}/rt/{i}"] for i in range(len(payloads))]
        for env, payload in zip(out, payloads, strict=True):
            assert env.payload == payload, (env.topic, env.payload, payload)
            assert type(env.payload) is type(payload), (env.topic, env.payload, payload)
            assert headers.items() <= env.headers.items(), env.headers
        return out

    # -- round trip ----------------------------------------------------------------------------

    async def test_round_trip_payloads_and_headers(
        self, bus: Bus, make_bus: BusFactory, topic: str
    ) -> None:
        """Every JSON-able payload comes back equal and of the same type; headers arrive."""
        publisher = await make_bus()
        envs = await self._round_trip(publisher, bus, topic, ROUND_TRIP_PAYLOADS)
        ids = [e.id for e in envs]
        assert all(ids), ids
        assert len(set(ids)) == len(ids), ids
        for env in envs:
            assert isinstance(env.time, datetime)
            assert env.time.tzinfo is not None
            assert env.correlation_id is None
            assert env.reply_to is None

    async def test_round_trip_metadata(self, bus: Bus, topic: str) -> None:
        """type, correlation_id, reply_to and headers travel with the message."""
        inbox = Collector()
        await bus.subscribe(f"{topic}/meta", inbox)
        await bus.publish(
            f"{topic}/meta",
            {"x": 1},
            type="com.example.reading",
            correlation_id="corr-1",
            reply_to=f"{topic}/replies",
            headers={"k": "v"},
        )
        await inbox.wait_count(1, self.wait_timeout)
        (env,) = inbox.envelopes
        assert env.type == "com.example.reading"
        assert env.correlation_id == "corr-1"
        assert env.reply_to == f"{topic}/replies"
        assert env.headers.get("k") == "v"
        assert env.topic == f"{topic}/meta"
        assert env.payload == {"x": 1}

    async def test_topic_characters(self, bus: Bus, make_bus: BusFactory, topic: str) -> None:
        """Levels with dots, spaces, unicode and broker-special characters round-trip exactly."""
        publisher = await make_bus()
        every = Collector()
        exact = {level: Collector() for level in ODD_LEVELS}
        await self.subscribe_children(bus, f"{topic}/chars", [*ODD_LEVELS, "zz"], every)
        for level, inbox in exact.items():
            await bus.subscribe(f"{topic}/chars/{level}", inbox)
        for level in ODD_LEVELS:
            await publisher.publish(f"{topic}/chars/{level}", {"level": level})
        await publisher.publish(f"{topic}/chars/zz", sentinel())
        await every.wait_sentinel(self.wait_timeout)
        for inbox in exact.values():
            await inbox.wait_count(1, self.wait_timeout)
        assert sorted(e.topic for e in every.messages) == sorted(
            f"{topic}/chars/{level}" for level in ODD_LEVELS
        )
        for env in every.messages:
            assert env.payload == {"level": env.topic.rsplit("/", 1)[1]}
        for level in ODD_LEVELS:
            await publisher.publish(f"{topic}/chars/{level}", sentinel())
        for level, inbox in exact.items():
            await inbox.wait_sentinel(self.wait_timeout)
            assert [(e.topic, e.payload) for e in inbox.messages] == [
                (f"{topic}/chars/{level}", {"level": level})
            ]

    # -- wildcards -----------------------------------------------------------------------------

    async def test_wildcard_matrix(self, bus: Bus, make_bus: BusFactory, topic: str) -> None:
        """Each pattern gets exactly the topics the matrix says, with their concrete topics."""
        self.require(bus, "wildcards")
        publisher = await make_bus()
        inboxes = {pattern: Collector() for pattern in WILDCARD_MATRIX}
        for pattern, inbox in inboxes.items():
            await bus.subscribe(f"{topic}/{pattern}", inbox)
        for name in WILDCARD_TOPICS:
            await publisher.publish(f"{topic}/{name}", {"t": name})
        # One sentinel per pattern, on a topic that pattern matches, published after the rest.
        for pattern in WILDCARD_MATRIX:
            concrete = "/".join("s" if level in "+#" else level for level in pattern.split("/"))
            await publisher.publish(f"{topic}/{concrete}", sentinel(pattern))
        failures: list[str] = []
        for pattern, inbox in inboxes.items():
            await inbox.wait_sentinel(self.wait_timeout, token=pattern)
            expected = WILDCARD_MATRIX[pattern]
            got = [e.payload["t"] for e in inbox.messages]
            if sorted(got) != sorted(expected):
                failures.append(
                    f"{pattern!r}: expected {sorted(expected)}, got {sorted(got)}"
                    + (" (duplicates)" if len(got) != len(set(got)) else "")
                )
            for env in inbox.messages:
                if env.topic != f"{topic}/{env.payload['t']}":
                    failures.append(f"{pattern!r}: wrong concrete topic {env.topic!r}")
        assert not failures, "\n".join(failures)

    # -- ordering and volume -------------------------------------------------------------------

    async def test_fifo_order_of_1000_messages(
        self, bus: Bus, make_bus: BusFactory, topic: str
    ) -> None:
        """1,000 messages from one publisher arrive in the order they were published."""
        self.require(bus, "ordering")
        publisher = await make_bus()
        inbox = Collector()
        await bus.subscribe(f"{topic}/fifo", inbox)
        for i in range(1000):
            await publisher.publish(f"{topic}/fifo", i)
        await inbox.wait_count(1000, self.wait_timeout * 2)
        assert inbox.payloads == list(range(1000))

    async def test_concurrent_publishers(self, bus: Bus, make_bus: BusFactory, topic: str) -> None:
        """50 tasks x 100 messages: all 5,000 arrive exactly once."""
        publisher = await make_bus()
        inbox = Collector()
        await bus.subscribe(f"{topic}/many", inbox)

        async def produce(p: int) -> None:
            for n in range(100):
                await publisher.publish(f"{topic}/many", [p, n])

        async with asyncio.timeout(self.wait_timeout * 4):
            await asyncio.gather(*(produce(p) for p in range(50)))
        await publisher.publish(f"{topic}/many", sentinel())
        await inbox.wait_sentinel(self.wait_timeout * 2)
        await inbox.wait_count(5001, self.wait_timeout)
        got = [tuple(v) for v in inbox.values]
        assert len(got) == 5000, f"{len(got)} messages, {len(set(got))} distinct"
        assert sorted(got) == [(p, n) for p in range(50) for n in range(100)]
        if bus.capabilities.ordering:
            for p in range(50):
                assert [n for q, n in got if q == p] == list(range(100)), f"publisher {p}"

    async def test_two_subscriptions_on_one_pattern(
        self, bus: Bus, make_bus: BusFactory, topic: str
    ) -> None:
        """Every subscription on a pattern gets every message, on one bus or another."""
        publisher = await make_bus()
        first, second, elsewhere = Collector(), Collector(), Collector()
        pattern = f"{topic}/dup/+" if bus.capabilities.wildcards else f"{topic}/dup/x"
        await bus.subscribe(pattern, first)
        await bus.subscribe(pattern, second)
        other = await make_bus()
        await other.subscribe(pattern, elsewhere)
        for i in range(20):
            await publisher.publish(f"{topic}/dup/x", i)
        await publisher.publish(f"{topic}/dup/x", sentinel())
        for inbox in (first, second, elsewhere):
            await inbox.wait_sentinel(self.wait_timeout)
            if bus.capabilities.ordering:
                assert inbox.values == list(range(20))
            else:
                assert sorted(inbox.values) == list(range(20))

    async def test_subscribers_do_not_share_payload_objects(self, bus: Bus, topic: str) -> None:
        """A handler mutating its payload does not change what another one sees."""
        mutated = Signal()
        done: list[bool] = []

        def mutate(env: Envelope[Any]) -> None:
            env.payload["items"].append("mutated")
            env.payload["new"] = True
            done.append(True)
            mutated.notify()

        reader = Collector()
        await bus.subscribe(f"{topic}/iso", mutate)
        await bus.subscribe(f"{topic}/iso", reader)
        await bus.publish(f"{topic}/iso", {"items": [1]})
        await mutated.wait_for(lambda: bool(done), "the mutating handler", self.wait_timeout)
        await reader.wait_count(1, self.wait_timeout)
        assert reader.payloads == [{"items": [1]}]

    # -- handler failures ----------------------------------------------------------------------

    async def test_handler_errors_are_isolated_and_counted(
        self, make_bus: BusFactory, topic: str
    ) -> None:
        """A raising handler: later messages still handled, others unaffected, counted."""
        errors = ErrorRecorder()
        bus = await make_bus(on_error=errors)
        publisher = await make_bus()
        handled: list[Any] = []
        done = Signal()

        async def flaky(env: Envelope[Any]) -> None:
            if isinstance(env.payload, int) and env.payload % 2:
                raise _Boom(f"odd {env.payload}")
            handled.append(env.payload)
            done.notify()

        def sync_flaky(env: Envelope[Any]) -> None:
            if env.payload == 4:
                raise _Boom("four")

        steady = Collector()
        await bus.subscribe(f"{topic}/err", flaky)
        await bus.subscribe(f"{topic}/err", sync_flaky)
        await bus.subscribe(f"{topic}/err", steady)
        for i in range(10):
            await publisher.publish(f"{topic}/err", i)
        await publisher.publish(f"{topic}/err", sentinel())
        await steady.wait_sentinel(self.wait_timeout)
        await done.wait_for(
            lambda: any(is_sentinel(p) for p in handled), "the flaky handler", self.wait_timeout
        )
        await errors.wait_for(lambda: len(errors.calls) >= 6, "6 errors", self.wait_timeout)
        assert [p for p in handled if not is_sentinel(p)] == [0, 2, 4, 6, 8]
        assert steady.values == list(range(10))
        assert sorted(str(e) for e, _, _ in errors.calls) == sorted(
            ["four", *(f"odd {i}" for i in (1, 3, 5, 7, 9))]
        )
        for error, name, env in errors.calls:
            assert isinstance(error, _Boom)
            assert name == f"{topic}/err"
            assert env is not None
            assert env.topic == name
        assert bus.stats().dropped.get(DropReason.HANDLER_ERROR) == 6

    # -- unsubscribe and iterator mode ---------------------------------------------------------

    async def test_unsubscribe_stops_delivery_and_is_idempotent(
        self, bus: Bus, make_bus: BusFactory, topic: str
    ) -> None:
        """No delivery after unsubscribe(); calling it again is harmless."""
        publisher = await make_bus()
        gone, probe = Collector(), Collector()
        sub = await bus.subscribe(f"{topic}/unsub", gone)
        await bus.subscribe(f"{topic}/unsub", probe)
        await publisher.publish(f"{topic}/unsub", 1)
        await gone.wait_count(1, self.wait_timeout)
        await sub.unsubscribe()
        assert sub.closed
        await sub.unsubscribe()  # idempotent
        await publisher.publish(f"{topic}/unsub", 2)
        await publisher.publish(f"{topic}/unsub", sentinel())
        await probe.wait_sentinel(self.wait_timeout)
        assert probe.values == [1, 2]
        assert gone.payloads == [1]
        await sub.unsubscribe()
        assert bus.is_open

    async def test_iterator_mode(self, bus: Bus, make_bus: BusFactory, topic: str) -> None:
        """``async with bus.subscribe(p) as sub: async for env in sub`` and ``get()``."""
        publisher = await make_bus()
        got: list[Any] = []
        async with bus.subscribe(f"{topic}/iter") as sub:
            for i in range(3):
                await publisher.publish(f"{topic}/iter", i)
            async with asyncio.timeout(self.wait_timeout):
                async for env in sub:
                    assert env.topic == f"{topic}/iter"
                    got.append(env.payload)
                    if len(got) == 3:
                        break
            await publisher.publish(f"{topic}/iter", "via get")
            env = await sub.get(timeout=self.wait_timeout)
            assert env.payload == "via get"
            with pytest.raises(TimeoutError):
                await sub.get(timeout=0.05)
        assert got == [0, 1, 2]
        assert sub.closed
        async with asyncio.timeout(self.wait_timeout):
            assert [e async for e in sub] == []  # iteration of a closed subscription ends
        with pytest.raises(BusClosed):
            await sub.get(timeout=self.wait_timeout)

    async def test_handler_subscription_cannot_be_iterated(self, bus: Bus, topic: str) -> None:
        """A subscription with a handler refuses iteration with TypeError."""
        sub = await bus.subscribe(f"{topic}/h", Collector())
        with pytest.raises(TypeError):
            sub.__aiter__()
        await sub.unsubscribe()

    # -- typed payloads ------------------------------------------------------------------------

    async def test_typed_payloads(self, make_bus: BusFactory, topic: str) -> None:
        """``type=`` decodes payloads; a mismatch goes to on_error as DecodeError and is counted."""
        errors = ErrorRecorder()
        bus = await make_bus(on_error=errors)
        publisher = await make_bus()
        inbox = Collector()
        await bus.subscribe(f"{topic}/typed", inbox, type=Reading)
        await publisher.publish(f"{topic}/typed", {"sensor": "t1", "value": 1.5})
        await publisher.publish(f"{topic}/typed", Reading("t2", 2.0))
        await publisher.publish(f"{topic}/typed", {"sensor": 3, "value": "not a number"})
        await publisher.publish(f"{topic}/typed", [1, 2, 3])
        await publisher.publish(f"{topic}/typed", {"sensor": "t5", "value": 5})
        await inbox.wait_count(3, self.wait_timeout)
        await errors.wait_for(lambda: len(errors.calls) >= 2, "2 decode errors", self.wait_timeout)
        assert inbox.payloads == [Reading("t1", 1.5), Reading("t2", 2.0), Reading("t5", 5.0)]
        assert all(type(p) is Reading for p in inbox.payloads)
        assert len(errors.calls) == 2
        for error, name, _ in errors.calls:
            assert isinstance(error, DecodeError), error
            assert name == f"{topic}/typed"
        assert bus.stats().dropped.get(DropReason.DECODE_ERROR) == 2

    async def test_typed_iterator(self, bus: Bus, make_bus: BusFactory, topic: str) -> None:
        """``type=`` works in iterator mode too."""
        publisher = await make_bus()
        async with bus.subscribe(f"{topic}/typed-iter", type=Reading) as sub:
            await publisher.publish(f"{topic}/typed-iter", {"sensor": "x", "value": 0.5})
            env = await sub.get(timeout=self.wait_timeout)
        assert env.payload == Reading("x", 0.5)

    # -- retained ------------------------------------------------------------------------------

    async def test_retained_delivered_before_subscribe_returns(
        self, bus: Bus, make_bus: BusFactory, topic: str
    ) -> None:
        """The handler already ran for the retained message when subscribe() returns."""
        self.require(bus, "retain")
        publisher = await make_bus()
        await publisher.publish(f"{topic}/ret", {"v": 1}, retain=True)
        await publisher.flush(self.wait_timeout)
        inbox = Collector()
        await bus.subscribe(f"{topic}/ret", inbox)
        # The handler already ran for the retained message when subscribe() returned.
        assert [(e.topic, e.payload) for e in inbox.envelopes] == [(f"{topic}/ret", {"v": 1})]
        await publisher.publish(f"{topic}/ret", sentinel())
        await inbox.wait_sentinel(self.wait_timeout)
        assert inbox.values == [{"v": 1}]  # exactly once
        # Iterator mode: the retained message is queued when subscribe() returns.
        async with bus.subscribe(f"{topic}/ret") as sub:
            assert sub.pending == 1
            env = await sub.get(timeout=self.wait_timeout)
            assert (env.topic, env.payload) == (f"{topic}/ret", {"v": 1})
            # The sentinel published above was live, not retained: nothing else is replayed.
            assert sub.pending == 0

    async def test_retained_survives_the_publisher(self, make_bus: BusFactory, topic: str) -> None:
        """A retained message outlives the connection that published it."""
        publisher = await make_bus()
        self.require(publisher, "retain")
        await publisher.publish(f"{topic}/ret-gone", {"from": "gone"}, retain=True)
        await publisher.close()
        bus = await make_bus()
        inbox = Collector()
        await bus.subscribe(f"{topic}/ret-gone", inbox)
        assert inbox.payloads == [{"from": "gone"}]

    async def test_retained_last_write_wins(
        self, bus: Bus, make_bus: BusFactory, topic: str
    ) -> None:
        """Only the last retained value of a topic is replayed."""
        self.require(bus, "retain")
        publisher = await make_bus()
        for version in range(1, 4):
            await publisher.publish(f"{topic}/lww", {"version": version}, retain=True)
        await publisher.flush(self.wait_timeout)
        inbox = Collector()
        await bus.subscribe(f"{topic}/lww", inbox)
        assert inbox.payloads == [{"version": 3}]

    async def test_retained_cleared_by_empty_payload(
        self, bus: Bus, make_bus: BusFactory, topic: str
    ) -> None:
        """An empty retained body clears; live subscribers receive the clear."""
        self.require(bus, "retain")
        publisher = await make_bus()
        live = Collector()
        await publisher.publish(f"{topic}/clear", {"paused": True}, retain=True)
        await bus.subscribe(f"{topic}/clear", live)
        assert live.payloads == [{"paused": True}]
        await publisher.publish(f"{topic}/clear", b"", retain=True)
        await live.wait_count(2, self.wait_timeout)
        cleared = live.envelopes[1]
        assert cleared.payload == b""  # live subscribers see the clear
        assert cleared.is_clear
        await publisher.flush(self.wait_timeout)
        fresh = Collector()
        await bus.subscribe(f"{topic}/clear", fresh)
        assert fresh.envelopes == []  # nothing retained any more
        await publisher.publish(f"{topic}/clear", sentinel())
        await fresh.wait_sentinel(self.wait_timeout)
        assert fresh.values == []

    async def test_retained_not_replayed_to_older_subscriptions(
        self, bus: Bus, make_bus: BusFactory, topic: str
    ) -> None:
        """Retained replay goes to the new subscription only."""
        self.require(bus, "retain", "wildcards")
        publisher = await make_bus()
        older_same_bus, older_other_bus = Collector(), Collector()
        other = await make_bus()
        await bus.subscribe(f"{topic}/#", older_same_bus)
        await other.subscribe(f"{topic}/+", older_other_bus)
        await publisher.publish(f"{topic}/x", {"r": 1}, retain=True)
        await older_same_bus.wait_count(1, self.wait_timeout)
        await older_other_bus.wait_count(1, self.wait_timeout)
        newer, newest = Collector(), Collector()
        await bus.subscribe(f"{topic}/x", newer)
        await other.subscribe(f"{topic}/x", newest)
        assert newer.payloads == [{"r": 1}]
        assert newest.payloads == [{"r": 1}]
        await publisher.publish(f"{topic}/x", sentinel())
        for inbox in (older_same_bus, older_other_bus, newer, newest):
            await inbox.wait_sentinel(self.wait_timeout)
            assert inbox.values == [{"r": 1}], inbox.describe()

    async def test_retained_wildcard_replay_has_concrete_topics(
        self, bus: Bus, make_bus: BusFactory, topic: str
    ) -> None:
        """A wildcard subscription gets every matching retained message with its topic."""
        self.require(bus, "retain", "wildcards")
        publisher = await make_bus()
        values = {"w/a": 1, "w/b": 2, "w/c/d": 3, "other": 4, "w": 5}
        for name, value in values.items():
            await publisher.publish(f"{topic}/{name}", {"v": value}, retain=True)
        await publisher.flush(self.wait_timeout)
        deep, shallow = Collector(), Collector()
        await bus.subscribe(f"{topic}/w/#", deep)
        await bus.subscribe(f"{topic}/w/+", shallow)
        assert sorted((e.topic, e.payload["v"]) for e in deep.envelopes) == [
            (f"{topic}/w", 5),
            (f"{topic}/w/a", 1),
            (f"{topic}/w/b", 2),
            (f"{topic}/w/c/d", 3),
        ]
        assert sorted((e.topic, e.payload["v"]) for e in shallow.envelopes) == [
            (f"{topic}/w/a", 1),
            (f"{topic}/w/b", 2),
        ]

    async def test_many_retained_at_qos1_in_both_modes(
        self, bus: Bus, make_bus: BusFactory, topic: str
    ) -> None:
        """More retained messages than a broker's in-flight window (MQTT: 20) still arrive.

        At QoS 1 a handler acknowledges each as it runs; an iterator cannot iterate before
        ``subscribe()`` returns, so the bus acknowledges retained replays on arrival (the
        broker keeps the retained copy anyway) instead of holding up the subscription.
        """
        self.require(bus, "retain", "wildcards")
        qos = min(1, bus.capabilities.max_qos)
        publisher = await make_bus()
        count = 100
        for i in range(count):
            await publisher.publish(f"{topic}/many/{i}", {"i": i}, qos=qos, retain=True)
        await publisher.flush(self.wait_timeout)
        inbox = Collector()
        await bus.subscribe(f"{topic}/many/+", inbox, qos=qos)
        assert sorted(e.payload["i"] for e in inbox.envelopes) == list(range(count))
        async with bus.subscribe(f"{topic}/many/+", qos=qos) as sub:
            assert sub.pending == count
            seen = [(await sub.get(timeout=self.wait_timeout)).payload["i"] for _ in range(count)]
        assert sorted(seen) == list(range(count))

    async def test_queue_subscription_gets_no_retained_replay(
        self, bus: Bus, make_bus: BusFactory, topic: str
    ) -> None:
        """Queue-group members get no retained replay."""
        self.require(bus, "retain", "queue_groups")
        publisher = await make_bus()
        await publisher.publish(f"{topic}/qr", {"old": True}, retain=True)
        await publisher.flush(self.wait_timeout)
        worker = Collector()
        await bus.subscribe(f"{topic}/qr", worker, queue="workers")
        assert worker.envelopes == []
        await publisher.publish(f"{topic}/qr", sentinel())
        await worker.wait_sentinel(self.wait_timeout)
        assert worker.values == []

    # -- queue groups --------------------------------------------------------------------------

    async def test_queue_group_each_message_once(
        self, bus: Bus, make_bus: BusFactory, topic: str
    ) -> None:
        """3 queue members share 300 messages (each once, spread); a plain subscriber gets all."""
        self.require(bus, "queue_groups")
        group = Signal()
        members = [Collector(group) for _ in range(3)]
        for member in members:
            await (await make_bus()).subscribe(f"{topic}/jobs", member, queue="workers")
        everything = Collector()
        await bus.subscribe(f"{topic}/jobs", everything)
        publisher = await make_bus()
        for i in range(300):
            await publisher.publish(f"{topic}/jobs", i)
        await publisher.publish(f"{topic}/jobs", sentinel())
        await everything.wait_sentinel(self.wait_timeout)
        await group.wait_for(
            lambda: sum(len(m.envelopes) for m in members) >= 301,
            "301 messages across the group",
            self.wait_timeout,
        )
        handled = sorted(v for m in members for v in m.values)
        assert handled == list(range(300)), f"{len(handled)} handled, {len(set(handled))} distinct"
        assert sum(m.seen_sentinel() for m in members) == 1
        assert sum(1 for m in members if m.values) > 1, [len(m.values) for m in members]
        if bus.capabilities.ordering:
            assert everything.values == list(range(300))
            for member in members:
                assert member.values == sorted(member.values)
        else:
            assert sorted(everything.values) == list(range(300))

    # -- request / reply -----------------------------------------------------------------------

    async def test_request_reply(self, bus: Bus, make_bus: BusFactory, topic: str) -> None:
        """Concurrent requests each get their own reply through bus.reply()."""
        self.require(bus, "request_reply")
        responder = await make_bus()
        requests: list[Envelope[Any]] = []

        async def answer(env: Envelope[Any]) -> None:
            requests.append(env)
            await responder.reply(env, {"echo": env.payload, "cid": env.correlation_id})

        await responder.subscribe(f"{topic}/svc", answer)
        async with asyncio.timeout(self.wait_timeout * 2):
            replies = await asyncio.gather(
                *(
                    bus.request(f"{topic}/svc", {"n": n}, timeout=self.wait_timeout)
                    for n in range(10)
                )
            )
        for n, reply in enumerate(replies):
            assert reply.payload["echo"] == {"n": n}
            assert reply.payload["cid"] == reply.correlation_id
        assert len({r.reply_to for r in requests}) == 10
        assert len({r.correlation_id for r in requests}) == 10
        assert all(r.reply_to and r.correlation_id for r in requests)

    async def test_reply_by_plain_publish(self, bus: Bus, make_bus: BusFactory, topic: str) -> None:
        """A responder that publishes to env.reply_to answers the request."""
        self.require(bus, "request_reply")
        responder = await make_bus()

        async def answer(env: Envelope[Any]) -> None:
            assert env.reply_to is not None
            await responder.publish(env.reply_to, {"plain": env.payload})

        await responder.subscribe(f"{topic}/plain-svc", answer)
        reply = await bus.request(f"{topic}/plain-svc", "ping", timeout=self.wait_timeout)
        assert reply.payload == {"plain": "ping"}

    async def test_request_typed_reply(self, bus: Bus, make_bus: BusFactory, topic: str) -> None:
        """``request(type=...)`` converts the reply; a mismatch raises DecodeError."""
        self.require(bus, "request_reply")
        responder = await make_bus()

        async def answer(env: Envelope[Any]) -> None:
            await responder.reply(env, Reading("r", float(env.payload)))

        await responder.subscribe(f"{topic}/typed-svc", answer)
        reply = await bus.request(f"{topic}/typed-svc", 7, timeout=self.wait_timeout, type=Reading)
        assert reply.payload == Reading("r", 7.0)
        with pytest.raises(DecodeError):
            await bus.request(f"{topic}/typed-svc", 8, timeout=self.wait_timeout, type=list[str])

    async def test_request_timeout(self, bus: Bus, make_bus: BusFactory, topic: str) -> None:
        """A responder that never answers: RequestTimeout (a TimeoutError and a BusError)."""
        self.require(bus, "request_reply")
        silent = await make_bus()
        heard = Collector()
        await silent.subscribe(f"{topic}/silent-svc", heard)
        async with asyncio.timeout(self.wait_timeout):
            with pytest.raises(RequestTimeout) as info:
                await bus.request(f"{topic}/silent-svc", {"q": 1}, timeout=0.2)
        assert not isinstance(info.value, NoResponders)
        assert isinstance(info.value, TimeoutError)
        assert isinstance(info.value, BusError)
        await heard.wait_for(lambda: heard.values == [{"q": 1}], "the request", self.wait_timeout)
        await self.assert_still_works(bus, topic)

    async def test_request_no_responders(self, bus: Bus, topic: str) -> None:
        """Nobody subscribed: NoResponders at once, not after the (long) timeout."""
        self.require(bus, "request_reply")
        self.require(bus, "no_responders")
        async with asyncio.timeout(self.wait_timeout):
            with pytest.raises(NoResponders, match="nobody-home"):
                await bus.request(f"{topic}/nobody-home", {"q": 1}, timeout=3600)
        await self.assert_still_works(bus, topic)

    # -- isolation -----------------------------------------------------------------------------

    async def test_topic_isolation(self, bus: Bus, make_bus: BusFactory, topic: str) -> None:
        """Two unique prefixes never see each other's messages."""
        self.require(bus, "wildcards")
        other_prefix = f"conf/{uuid.uuid4().hex}"
        publisher = await make_bus()
        mine, theirs = Collector(), Collector()
        await bus.subscribe(f"{topic}/#", mine)
        await bus.subscribe(f"{other_prefix}/#", theirs)
        for i in range(5):
            await publisher.publish(f"{topic}/a/{i}", {"mine": i})
            await publisher.publish(f"{other_prefix}/a/{i}", {"theirs": i})
        await publisher.publish(f"{topic}/end", sentinel())
        await publisher.publish(f"{other_prefix}/end", sentinel())
        await mine.wait_sentinel(self.wait_timeout)
        await theirs.wait_sentinel(self.wait_timeout)
        assert sorted(v["mine"] for v in mine.values) == list(range(5))
        assert sorted(v["theirs"] for v in theirs.values) == list(range(5))
        assert all(e.topic.startswith(f"{topic}/") for e in mine.envelopes)
        assert all(e.topic.startswith(f"{other_prefix}/") for e in theirs.envelopes)

    # -- closing -------------------------------------------------------------------------------

    async def test_close_ends_a_waiting_iterator(self, make_bus: BusFactory, topic: str) -> None:
        """close() ends a waiting ``async for`` and a pending ``get()`` promptly."""
        bus = await make_bus()
        got: list[Any] = []
        arrived = Signal()
        sub = await bus.subscribe(f"{topic}/closing")

        async def consume() -> None:
            async for env in sub:
                got.append(env.payload)
                arrived.notify()

        task = asyncio.create_task(consume())
        waiter = asyncio.create_task(
            (await bus.subscribe(f"{topic}/closing-get")).get()  # no timeout: close must end it
        )
        await bus.publish(f"{topic}/closing", 1)
        await arrived.wait_for(lambda: got == [1], "the consumer", self.wait_timeout)
        # Both consumers are now parked waiting for the next message.
        async with asyncio.timeout(self.wait_timeout):
            await bus.close()
            await task  # the iteration ended (StopAsyncIteration), no exception
            with pytest.raises(BusClosed):
                await waiter
        assert got == [1]
        assert sub.closed
        with pytest.raises(BusClosed):
            await bus.publish(f"{topic}/closing", 2)
        with pytest.raises(BusClosed):
            await bus.subscribe(f"{topic}/closing", Collector())
        await bus.close()  # idempotent

    async def test_close_drains_published_messages(
        self, bus: Bus, make_bus: BusFactory, topic: str
    ) -> None:
        """Everything published before close() reaches a subscriber on another bus."""
        inbox = Collector()
        await bus.subscribe(f"{topic}/drain", inbox)
        publisher = await make_bus()
        for i in range(500):
            await publisher.publish(f"{topic}/drain", i)
        assert publisher.stats().published == 500
        async with asyncio.timeout(self.wait_timeout):
            await publisher.close()
        assert not publisher.is_open
        await inbox.wait_count(500, self.wait_timeout)
        if bus.capabilities.ordering:
            assert inbox.payloads == list(range(500))
        else:
            assert sorted(inbox.payloads) == list(range(500))
        assert bus.is_open

    # -- counters ------------------------------------------------------------------------------

    async def test_stats_counters(self, make_bus: BusFactory, topic: str) -> None:
        """The published and delivered counters are exact; nothing is dropped."""
        publisher, subscriber = await make_bus(), await make_bus()
        inbox = Collector()
        await subscriber.subscribe(f"{topic}/stats", inbox)
        for i in range(5):
            await publisher.publish(f"{topic}/stats", i)
        await publisher.publish(f"{topic}/stats", sentinel())
        await publisher.flush(self.wait_timeout)
        await inbox.wait_sentinel(self.wait_timeout)
        sent, received = publisher.stats(), subscriber.stats()
        assert sent.published == 6
        assert sent.delivered == 0
        assert received.published == 0
        assert received.delivered == 6
        assert sent.dropped_total == 0
        assert received.dropped_total == 0
        async with subscriber.subscribe(f"{topic}/stats-iter") as sub:
            await publisher.publish(f"{topic}/stats-iter", "one")
            await sub.get(timeout=self.wait_timeout)
        assert subscriber.stats().delivered == 7
        assert publisher.stats().published == 7

    # -- bad input -----------------------------------------------------------------------------

    @pytest.mark.parametrize(
        "bad",
        ["{t}/a/+", "{t}/#", "{t}/a/+/b", "{t}//x", "{t}/x/", "/{t}", "", "{t}/nul\x00"],
    )
    async def test_invalid_publish_topic(self, bus: Bus, topic: str, bad: str) -> None:
        """Wildcards, empty levels, NUL in a publish topic: InvalidTopic; the bus still works."""
        with pytest.raises(InvalidTopic):
            await bus.publish(bad.format(t=topic), {"x": 1})
        await self.assert_still_works(bus, topic)

    async def test_non_string_topic(self, bus: Bus, topic: str) -> None:
        """A topic that is not a str: InvalidTopic."""
        with pytest.raises(InvalidTopic):
            await bus.publish(123, {"x": 1})  # type: ignore[arg-type]
        await self.assert_still_works(bus, topic)

    @pytest.mark.parametrize("bad", ["{t}/a#", "{t}/#/a", "{t}/a+/b", "{t}//x", "{t}/", ""])
    async def test_invalid_subscribe_pattern(self, bus: Bus, topic: str, bad: str) -> None:
        """A malformed pattern: InvalidTopic; the bus still works."""
        with pytest.raises(InvalidTopic):
            await bus.subscribe(bad.format(t=topic), Collector())
        await self.assert_still_works(bus, topic)

    @pytest.mark.parametrize("fmt", ["json", "msgpack", "raw"])
    async def test_unencodable_payload(
        self, make_bus: BusFactory, transport_url: str, topic: str, fmt: str
    ) -> None:
        """A payload msgspec cannot encode: EncodeError, nothing published."""
        bus = await make_bus(with_query(transport_url, format=fmt))
        with pytest.raises(EncodeError):
            await bus.publish(f"{topic}/enc", object())
        with pytest.raises(EncodeError):
            await bus.publish(f"{topic}/enc", {"nested": {1, 2, 3j}})
        assert bus.stats().published == 0
        await self.assert_still_works(bus, topic)

    async def test_oversized_payload(self, bus: Bus, topic: str) -> None:
        """A body above the transport's max_payload: PayloadTooLarge, counted."""
        limit = bus.transport.max_payload
        if limit is None:
            pytest.skip(f"{bus.url.scheme} lacks capability: max_payload")
        if limit > self.max_oversized:
            pytest.skip(
                f"{bus.url.scheme} lacks capability: max_payload<={self.max_oversized} "
                f"(it is {limit}; raise max_oversized to test it)"
            )
        with pytest.raises(PayloadTooLarge) as info:
            await bus.publish(f"{topic}/big", b"x" * (limit + 1))
        assert info.value.limit == limit
        assert info.value.size > limit
        assert bus.stats().dropped.get(DropReason.PAYLOAD_TOO_LARGE) == 1
        await self.assert_still_works(bus, topic)

    async def test_unsupported_features_refused(self, bus: Bus, topic: str) -> None:
        """What the transport does not declare is refused with UnsupportedFeature, never ignored."""
        caps = bus.capabilities
        too_high = caps.max_qos + 1
        with pytest.raises(UnsupportedFeature) as info:
            await bus.publish(f"{topic}/qos", {"x": 1}, qos=too_high)
        assert info.value.transport == bus.url.scheme
        assert isinstance(info.value, NotImplementedError)
        with pytest.raises(UnsupportedFeature):
            await bus.subscribe(f"{topic}/qos", Collector(), qos=too_high)
        if not caps.retain:
            with pytest.raises(UnsupportedFeature):
                await bus.publish(f"{topic}/r", {"x": 1}, retain=True)
        if not caps.queue_groups:
            with pytest.raises(UnsupportedFeature):
                await bus.subscribe(f"{topic}/q", Collector(), queue="workers")
        if not caps.wildcards:
            with pytest.raises(UnsupportedFeature):
                await bus.subscribe(f"{topic}/+", Collector())
        if not caps.request_reply:
            with pytest.raises(UnsupportedFeature):
                await bus.request(f"{topic}/svc", {}, timeout=0.1)
        await self.assert_still_works(bus, topic)

    async def test_every_declared_qos_round_trips(
        self, bus: Bus, make_bus: BusFactory, topic: str
    ) -> None:
        """Every QoS up to capabilities.max_qos publishes and subscribes."""
        publisher = await make_bus()
        inbox = Collector()
        top = bus.capabilities.max_qos
        for qos in range(top + 1):
            await bus.subscribe(f"{topic}/qos{qos}", inbox, qos=qos)
        for qos in range(top + 1):
            await publisher.publish(f"{topic}/qos{qos}", {"qos": qos}, qos=qos)
        await inbox.wait_count(top + 1, self.wait_timeout)
        assert sorted(p["qos"] for p in inbox.payloads) == list(range(top + 1))

    # -- wire formats --------------------------------------------------------------------------

    @pytest.mark.parametrize("fmt", ["msgpack", "raw"])
    async def test_format_round_trip(
        self, make_bus: BusFactory, transport_url: str, topic: str, fmt: str
    ) -> None:
        """``?format=msgpack`` and ``?format=raw`` round-trip payloads and headers."""
        url = with_query(transport_url, format=fmt)
        publisher, subscriber = await make_bus(url), await make_bus(url)
        payloads = ROUND_TRIP_PAYLOADS if fmt == "msgpack" else RAW_ROUND_TRIP_PAYLOADS
        await self._round_trip(publisher, subscriber, topic, payloads)

    @pytest.mark.parametrize(
        ("sender", "receiver"),
        [("raw", "json"), ("json", "raw"), ("msgpack", "json"), ("raw", "msgpack")],
    )
    async def test_format_interop(
        self, make_bus: BusFactory, transport_url: str, topic: str, sender: str, receiver: str
    ) -> None:
        """Bodies in one wire format are read by a bus using another."""
        publisher = await make_bus(with_query(transport_url, format=sender))
        subscriber = await make_bus(with_query(transport_url, format=receiver))
        inbox = Collector()
        payloads: list[Any] = [{"a": 1, "b": [1, 2]}, [1, "x"], "text", 5, b"\x00\xffbin"]
        await self.subscribe_children(
            subscriber, f"{topic}/interop", map(str, range(len(payloads))), inbox
        )
        for i, payload in enumerate(payloads):
            await publisher.publish(f"{topic}/interop/{i}", payload)
        await inbox.wait_count(len(payloads), self.wait_timeout)
        by_topic = {e.topic: e.payload for e in inbox.envelopes}
        assert [by_topic[f"{topic}/interop/{i}"] for i in range(len(payloads))] == payloads
        assert type(by_topic[f"{topic}/interop/4"]) is bytes

    # -- the Cascade Connector -----------------------------------------------------------------

    async def test_cascade_retained_pause_in_force_before_subscribe_returns(
        self, make_connector: ConnectorFactory, unique: str
    ) -> None:
        """A retained pause has reached the engine when its subscribe() returns."""
        run = f"conf-{unique}"
        constraint = f"cascade/constraints/{run}"
        controller = make_connector()
        await controller.connect()
        assert controller.bus is not None
        self.require(controller.bus, "retain", "wildcards")
        qos = min(1, controller.bus.capabilities.max_qos)
        await controller.publish(constraint, {"paused": True}, qos=qos, retain=True)
        await controller.disconnect()  # the controller may be gone before the engine starts
        assert controller.publish_failures == 0

        engine = make_connector()
        await engine.connect()
        seen = CallbackRecorder(keep=lambda t: t.startswith(constraint))
        await engine.subscribe("cascade/constraints/#", seen)
        assert seen.calls == [(constraint, {"paused": True})]

        # Nested constraint topics under the run work the same way.
        await engine.publish(f"{constraint}/task-a", {"paused": True}, qos=qos, retain=True)
        await seen.wait_for(lambda: len(seen.calls) == 2, "the live constraint", self.wait_timeout)
        late = CallbackRecorder()
        await engine.subscribe(f"{constraint}/#", late)
        assert sorted(late.calls) == [
            (constraint, {"paused": True}),
            (f"{constraint}/task-a", {"paused": True}),
        ]
        for name in (constraint, f"{constraint}/task-a"):
            await engine.publish(name, {}, qos=qos, retain=True)
        assert engine.publish_failures == 0

    async def test_cascade_resume_by_empty_retained_payload(
        self, make_connector: ConnectorFactory, unique: str
    ) -> None:
        """Clearing with ``{}`` reaches the engine as ``{}`` within 1 s; nothing stays retained."""
        constraint = f"cascade/constraints/conf-{unique}"
        controller, engine = make_connector(), make_connector()
        await controller.connect()
        await engine.connect()
        assert controller.bus is not None
        self.require(controller.bus, "retain", "wildcards")
        await controller.publish(constraint, {"paused": True, "reason": "test"}, retain=True)
        seen = CallbackRecorder(keep=lambda t: t == constraint)
        await engine.subscribe("cascade/constraints/#", seen)
        assert seen.calls == [(constraint, {"paused": True, "reason": "test"})]
        await controller.publish(constraint, {}, retain=True)
        await seen.wait_for(lambda: len(seen.calls) == 2, "the resume", timeout=1.0)
        assert seen.calls[1] == (constraint, {})
        newcomer = CallbackRecorder()
        await engine.subscribe(constraint, newcomer)
        assert newcomer.calls == []  # the pause is gone for good
        for empty in ("", b"", None):  # the other empty forms clear too (and reach us as {})
            await controller.publish(constraint, {"paused": True}, retain=True)
            await controller.publish(constraint, empty, retain=True)
        await seen.wait_for(lambda: len(seen.calls) == 8, "3 more pause/resume", self.wait_timeout)
        assert [p for _, p in seen.calls[2:]] == [{"paused": True}, {}] * 3
        late = CallbackRecorder()
        await engine.subscribe(constraint, late)
        assert late.calls == []
        assert controller.publish_failures == 0

    async def test_cascade_telemetry(self, make_connector: ConnectorFactory, unique: str) -> None:
        """Telemetry on ``cascade/telemetry/+/+/+/events`` arrives with concrete topics."""
        run = f"conf-{unique}"
        engine, watcher = make_connector(), make_connector()
        await engine.connect()
        await watcher.connect()
        assert watcher.bus is not None
        self.require(watcher.bus, "wildcards")
        seen = CallbackRecorder(keep=lambda t: t.split("/")[2:3] == [run])
        await watcher.subscribe("cascade/telemetry/+/+/+/events", seen)
        sent: list[tuple[str, dict[str, Any]]] = []
        for task in ("extract", "load"):
            for state in ("pending", "running", "succeeded"):
                name = f"cascade/telemetry/{run}/{task}/1/events"
                event = {"run": run, "task": task, "attempt": 1, "state": state}
                await engine.publish(name, event)
                sent.append((name, event))
        # Not telemetry events: wrong depth or last level; they must not arrive.
        await engine.publish(f"cascade/telemetry/{run}/extract/events", {"state": "x"})
        await engine.publish(f"cascade/telemetry/{run}/extract/1/2/events", {"state": "x"})
        await engine.publish(f"cascade/telemetry/{run}/extract/1/logs", {"state": "x"})
        done = f"cascade/telemetry/{run}/zz/1/events"
        await engine.publish(done, {"state": "done"})
        await seen.wait_for(
            lambda: any(t == done for t, _ in seen.calls), "the last event", self.wait_timeout
        )
        got = [c for c in seen.calls if c[0] != done]
        if watcher.bus.capabilities.ordering:
            assert got == sent
        else:
            assert sorted(got, key=repr) == sorted(sent, key=repr)
        assert engine.publish_failures == 0

    async def test_cascade_connect_is_idempotent(self, make_connector: ConnectorFactory) -> None:
        """A second connect() keeps the same connection."""
        connector = make_connector()
        assert not connector.connected
        await connector.connect()
        first = connector.bus
        await connector.connect()
        assert connector.connected
        assert connector.bus is first

    async def test_cascade_reconnect_keeps_subscriptions(
        self, make_connector: ConnectorFactory, topic: str
    ) -> None:
        """After disconnect() and connect() the subscriptions still work."""
        engine, other = make_connector(), make_connector()
        await engine.connect()
        await other.connect()
        seen = CallbackRecorder()
        await engine.subscribe(f"{topic}/cmd", seen)
        await other.publish(f"{topic}/cmd", {"n": 1})
        await seen.wait_for(lambda: len(seen.calls) == 1, "the first command", self.wait_timeout)
        await engine.disconnect()
        assert not engine.connected
        await engine.disconnect()  # harmless
        await engine.connect()
        assert engine.connected
        await other.publish(f"{topic}/cmd", {"n": 2})
        await seen.wait_for(lambda: len(seen.calls) == 2, "the second command", self.wait_timeout)
        assert seen.calls == [(f"{topic}/cmd", {"n": 1}), (f"{topic}/cmd", {"n": 2})]

    async def test_cascade_unsubscribe_is_idempotent(
        self, make_connector: ConnectorFactory, topic: str
    ) -> None:
        """unsubscribe() stops the callback, twice is harmless, and survives reconnects."""
        engine, other = make_connector(), make_connector()
        await engine.connect()
        await other.connect()
        gone, probe = CallbackRecorder(), CallbackRecorder()
        handle = await engine.subscribe(f"{topic}/u", gone)
        await engine.subscribe(f"{topic}/u", probe)
        await handle.unsubscribe()
        await handle.unsubscribe()
        await other.publish(f"{topic}/u", {"after": True})
        await probe.wait_for(lambda: len(probe.calls) == 1, "the probe", self.wait_timeout)
        assert gone.calls == []
        # Still unsubscribed after a reconnect.
        await engine.disconnect()
        await engine.connect()
        await handle.unsubscribe()
        await other.publish(f"{topic}/u", {"after": "reconnect"})
        await probe.wait_for(lambda: len(probe.calls) == 2, "the probe", self.wait_timeout)
        assert gone.calls == []

    async def test_cascade_publish_never_raises(
        self, make_connector: ConnectorFactory, topic: str
    ) -> None:
        """Bad topics, bad payloads, no connection: publish() counts, never raises."""
        connector = make_connector()
        await connector.publish(f"{topic}/x", {"before": "connect"})
        assert connector.publish_failures == 1
        await connector.connect()
        await connector.publish(f"{topic}/bad/+", {"wildcard": True})
        await connector.publish(f"{topic}//empty-level", {"x": 1})
        await connector.publish("", {"x": 1})
        await connector.publish(f"{topic}/x", {"unencodable": object()})
        assert connector.publish_failures == 5
        await connector.publish(f"{topic}/x", {"fine": True})
        assert connector.publish_failures == 5
        await connector.disconnect()
        await connector.publish(f"{topic}/x", {"after": "disconnect"})
        assert connector.publish_failures == 6
        connector.publish_soon(f"{topic}/x", {"after": "disconnect"})
        await connector.disconnect()  # waits for what publish_soon scheduled
        assert connector.publish_failures == 7

    async def test_cascade_publish_soon_from_sync_code(
        self, make_connector: ConnectorFactory, topic: str
    ) -> None:
        """publish_soon() from synchronous code is delivered; disconnect() drains it."""
        engine, watcher = make_connector(), make_connector()
        await engine.connect()
        await watcher.connect()
        seen = CallbackRecorder()
        await watcher.subscribe(f"{topic}/soon", seen)

        def from_sync_code() -> None:
            for i in range(3):
                engine.publish_soon(f"{topic}/soon", {"i": i})

        from_sync_code()
        await engine.disconnect()  # drains what was scheduled
        await seen.wait_for(lambda: len(seen.calls) == 3, "3 scheduled", self.wait_timeout)
        assert sorted(p["i"] for _, p in seen.calls) == [0, 1, 2]
        assert engine.publish_failures == 0
