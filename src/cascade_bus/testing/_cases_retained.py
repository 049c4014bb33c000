"""Conformance cases: retained messages (replay before subscribe returns, last write, clear)."""

from __future__ import annotations

from .. import (
    Bus,
)
from ._base import SuiteBase
from ._helpers import (
    BusFactory,
    Collector,
    sentinel,
)

__all__ = ["RetainedCases"]


class RetainedCases(SuiteBase):
    """Retained messages: replayed once to new subscriptions, before ``subscribe()`` returns."""

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
