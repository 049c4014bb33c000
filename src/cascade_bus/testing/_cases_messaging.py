"""Conformance cases: round trips, topic characters, wildcard matrix, isolation, wire formats."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import pytest

from .. import (
    Bus,
    Envelope,
)
from ._base import SuiteBase
from ._helpers import (
    BusFactory,
    Collector,
    sentinel,
    with_query,
)
from ._suite_data import (
    ODD_LEVELS,
    RAW_ROUND_TRIP_PAYLOADS,
    ROUND_TRIP_PAYLOADS,
    WILDCARD_MATRIX,
    WILDCARD_TOPICS,
)

__all__ = ["MessagingCases"]


class MessagingCases(SuiteBase):
    """What goes in comes out: payloads, metadata, topics, patterns and wire formats."""

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
