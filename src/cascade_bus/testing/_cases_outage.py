"""Fault cases around an outage: retained resync and publishing while disconnected."""

from __future__ import annotations

import asyncio

import pytest

from .. import DropReason, PublishError
from ._fault_base import FaultBase, Outage
from ._helpers import (
    BusFactory,
    CallbackRecorder,
    Collector,
    ConnectorFactory,
    sentinel,
)

__all__ = ["OutageCases"]


class OutageCases(FaultBase):
    """Cases that cut the connection of the bus under test through the outage's proxy."""

    # -- retained resync ---------------------------------------------------------------------

    async def test_retained_resync_after_outage(
        self, make_bus: BusFactory, outage: Outage, topic: str
    ) -> None:
        """Cleared, changed and created during an outage: each arrives once after reconnect."""
        controller = await make_bus()
        self.require(controller, "retain", "wildcards")
        for name in ("a", "b", "c"):
            await controller.publish(f"{topic}/{name}", {"v": 1}, retain=True)
        await controller.flush(self.wait_timeout)
        subscriber = await self.behind(make_bus, outage)
        seen = Collector()
        await subscriber.subscribe(f"{topic}/#", seen)
        assert sorted(e.topic for e in seen.envelopes) == [f"{topic}/{n}" for n in "abc"]
        before = len(seen.envelopes)

        await outage.begin(subscriber)
        await controller.publish(f"{topic}/a", b"", retain=True)
        await controller.publish(f"{topic}/b", {"v": 2}, retain=True)
        await controller.publish(f"{topic}/d", {"v": 1}, retain=True)
        await controller.flush(self.wait_timeout)
        await outage.end(subscriber)

        await seen.wait_for(
            lambda: len(seen.envelopes) >= before + 3, "the three changes", self.wait_timeout
        )
        await controller.publish(f"{topic}/z", sentinel())
        await seen.wait_sentinel(self.wait_timeout)
        changes = sorted(
            (e.topic, "clear" if e.is_clear else e.payload) for e in seen.messages[before:]
        )
        assert changes == [
            (f"{topic}/a", "clear"),
            (f"{topic}/b", {"v": 2}),
            (f"{topic}/d", {"v": 1}),
        ], seen.describe()

    async def test_retained_set_live_then_changed_during_outage(
        self, make_bus: BusFactory, outage: Outage, topic: str
    ) -> None:
        """Retained values first seen live (set after subscribing) resync like replayed ones."""
        if not self.live_retain_known:
            pytest.skip(
                f"{type(self).__name__}: the transport cannot tell a live retained publish from "
                "a plain one (live_retain_known = False), so values first seen live are not "
                "tracked"
            )
        controller = await make_bus()
        self.require(controller, "retain", "wildcards")
        subscriber = await self.behind(make_bus, outage)
        seen = Collector()
        await subscriber.subscribe(f"{topic}/#", seen)
        for name in ("a", "b", "c"):
            await controller.publish(f"{topic}/{name}", {"v": 1}, retain=True)
        await seen.wait_count(3, self.wait_timeout)
        before = len(seen.envelopes)

        await outage.begin(subscriber)
        await controller.publish(f"{topic}/a", b"", retain=True)
        await controller.publish(f"{topic}/b", {"v": 2}, retain=True)
        await controller.flush(self.wait_timeout)
        await outage.end(subscriber)

        await seen.wait_for(
            lambda: len(seen.envelopes) >= before + 2, "the two changes", self.wait_timeout
        )
        await controller.publish(f"{topic}/z", sentinel())
        await seen.wait_sentinel(self.wait_timeout)
        changes = sorted(
            (e.topic, "clear" if e.is_clear else e.payload) for e in seen.messages[before:]
        )
        assert changes == [(f"{topic}/a", "clear"), (f"{topic}/b", {"v": 2})], seen.describe()

    async def test_retained_resync_through_the_connector(
        self, make_connector: ConnectorFactory, outage: Outage, unique: str
    ) -> None:
        """Cascade's engine: a run resumed (constraint cleared) during an outage resumes."""
        base = f"cascade/constraints/conf-{unique}"
        controller = make_connector()
        await controller.connect()
        assert controller.bus is not None
        self.require(controller.bus, "retain", "wildcards")
        await controller.publish(f"{base}/run-1", {"paused": True}, retain=True)
        await controller.publish(f"{base}/run-2", {"paused": True}, retain=True)
        await controller.bus.flush(self.wait_timeout)
        engine = make_connector(outage.url, **self.reconnect_options)
        outage.track(engine.disconnect)
        await engine.connect()
        assert engine.bus is not None
        calls = CallbackRecorder()
        await engine.subscribe(f"{base}/#", calls)
        assert sorted(calls.calls, key=str) == [
            (f"{base}/run-1", {"paused": True}),
            (f"{base}/run-2", {"paused": True}),
        ]
        before = len(calls.calls)

        await outage.begin(engine.bus)
        await controller.publish(f"{base}/run-1", {}, retain=True)  # resumed
        await controller.publish(f"{base}/run-3", {"paused": True}, retain=True)
        await controller.bus.flush(self.wait_timeout)
        await outage.end(engine.bus)

        await calls.wait_for(lambda: len(calls.calls) >= before + 2, "2 calls", self.wait_timeout)
        await controller.publish(f"{base}/zz", {"end": True})
        await calls.wait_for(
            lambda: (f"{base}/zz", {"end": True}) in calls.calls, "the end", self.wait_timeout
        )
        assert sorted(calls.calls[before:-1], key=str) == [
            (f"{base}/run-1", {}),
            (f"{base}/run-3", {"paused": True}),
        ], calls.describe()

    # -- publishing while down ---------------------------------------------------------------

    async def test_qos1_published_during_own_outage_is_delivered(
        self, make_bus: BusFactory, outage: Outage, topic: str
    ) -> None:
        """QoS 1 publishes made while the publisher is cut off return, and all arrive after."""
        subscriber = await make_bus()
        self.require_qos(subscriber, 1)
        inbox = Collector()
        await subscriber.subscribe(f"{topic}/q", inbox, qos=1)
        publisher = await self.behind(make_bus, outage)
        await outage.begin(publisher)
        async with asyncio.timeout(self.wait_timeout):
            for i in range(20):
                await publisher.publish(f"{topic}/q", {"i": i}, qos=1)
        await outage.end(publisher)
        await publisher.flush(self.wait_timeout)
        await inbox.wait_for(
            lambda: {p["i"] for p in inbox.values} == set(range(20)), "20", self.wait_timeout
        )
        firsts = list(dict.fromkeys(p["i"] for p in inbox.values))
        assert firsts == list(range(20)), inbox.describe()  # in publishing order
        stats = publisher.stats()
        assert stats.dropped_total == 0, stats
        assert stats.buffered == 0, stats

    async def test_qos0_losses_during_outage_are_counted(
        self, make_bus: BusFactory, outage: Outage, topic: str
    ) -> None:
        """Every QoS 0 message published while down arrives or is counted as dropped."""
        subscriber = await make_bus()
        inbox = Collector()
        await subscriber.subscribe(f"{topic}/q0", inbox)
        publisher = await self.behind(make_bus, outage, offline_buffer=5)
        await outage.begin(publisher)
        async with asyncio.timeout(self.wait_timeout):
            for i in range(20):
                await publisher.publish(f"{topic}/q0", {"i": i})
        await outage.end(publisher)
        await publisher.publish(
            f"{topic}/q0", sentinel(), qos=min(1, publisher.capabilities.max_qos)
        )
        await inbox.wait_sentinel(self.wait_timeout)
        dropped = publisher.stats().dropped.get(DropReason.OFFLINE_OVERFLOW, 0)
        received = len({p["i"] for p in inbox.values})
        assert received + dropped == 20, (received, publisher.stats())
        assert dropped >= 15, publisher.stats()  # the offline buffer holds 5

    async def test_offline_buffer_full_refuses_qos1(
        self, make_bus: BusFactory, outage: Outage, topic: str
    ) -> None:
        """The publish-while-down policy: buffered until full, then PublishError for QoS 1."""
        subscriber = await make_bus()
        self.require_qos(subscriber, 1)
        inbox = Collector()
        await subscriber.subscribe(f"{topic}/full", inbox, qos=1)
        publisher = await self.behind(make_bus, outage, offline_buffer=3)
        await outage.begin(publisher)
        async with asyncio.timeout(self.wait_timeout):
            for i in range(3):
                await publisher.publish(f"{topic}/full", {"i": i}, qos=1)
            with pytest.raises(PublishError):
                await publisher.publish(f"{topic}/full", {"i": 3}, qos=1)
        await outage.end(publisher)
        await publisher.flush(self.wait_timeout)
        await inbox.wait_count(3, self.wait_timeout)
        assert sorted({p["i"] for p in inbox.values}) == [0, 1, 2]
