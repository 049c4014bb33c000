"""Fault cases without an outage: duplicates, hostile input, queue fairness, restarts."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import pytest

from .. import Bus, DropReason, Envelope
from ._fault_base import JUNK_ENVELOPE, FaultBase, Restartable, network, raw_envelope
from ._helpers import (
    BusFactory,
    Collector,
    Reading,
)

__all__ = ["HostileCases"]


class HostileCases(FaultBase):
    """Duplicates, junk, fair sharing and broker restarts."""

    # -- duplicates ----------------------------------------------------------------------------

    async def test_dedupe_window_suppresses_repeated_ids(
        self, make_bus: BusFactory, topic: str
    ) -> None:
        """With ``dedupe=N`` a body carrying an id seen among the last N is counted, not handled."""
        plain = await make_bus(format="raw")
        deduped, inbox = await make_bus(dedupe=100), Collector()
        keep_all, every = await make_bus(), Collector()
        await deduped.subscribe(f"{topic}/dup", inbox)
        await keep_all.subscribe(f"{topic}/dup", every)
        body = raw_envelope(f"{topic}/dup", {"n": 1}, "dup-id-1")
        for _ in range(3):
            await plain.publish(f"{topic}/dup", body)
        await plain.publish(f"{topic}/dup", raw_envelope(f"{topic}/dup", {"n": 2}, "dup-id-2"))
        await every.wait_count(4, self.wait_timeout)
        await inbox.wait_count(2, self.wait_timeout)
        assert [p["n"] for p in every.payloads] == [1, 1, 1, 2]
        assert [p["n"] for p in inbox.payloads] == [1, 2]
        assert deduped.stats().duplicates == 2, deduped.stats()
        assert deduped.stats().dropped.get(DropReason.DUPLICATE) == 2, deduped.stats()

    # -- hostile input -------------------------------------------------------------------------

    async def test_junk_bodies_on_a_subscribed_topic_are_counted(
        self, make_bus: BusFactory, topic: str
    ) -> None:
        """Bodies a typed subscription cannot decode cost one counted drop each, nothing else.

        (An untyped subscription takes any non-JSON body as opaque bytes: plain clients send
        binary, so only a typed one can call a body junk.)
        """
        subscriber = await make_bus()
        network(subscriber)  # in-process transports hand over objects: no body to parse
        inbox = Collector()
        await subscriber.subscribe(f"{topic}/j", inbox, type=Reading)
        plain = await make_bus(format="raw")
        for junk in (JUNK_ENVELOPE, b"\xff\x00 not json", b'{"sensor": 1}'):
            await plain.publish(f"{topic}/j", junk)
        await plain.publish(f"{topic}/j", Reading(sensor="after", value=1.0))
        await inbox.wait_count(1, self.wait_timeout)
        assert inbox.payloads == [Reading(sensor="after", value=1.0)]
        stats = subscriber.stats()
        assert stats.dropped.get(DropReason.DECODE_ERROR) == 3, stats
        assert stats.reconnects == 0, stats

    async def test_junk_on_internal_channels_costs_nothing_but_a_count(
        self, make_bus: BusFactory, transport_url: str, topic: str
    ) -> None:
        """Junk on the transport's own channels: no reconnect, no lost neighbour message."""
        subscriber = await make_bus()
        inbox = Collector()
        await self.subscribe_children(subscriber, topic, ("before", "after"), inbox)
        publisher = await make_bus()
        await publisher.publish(f"{topic}/before", {"n": 0})
        await inbox.wait_count(1, self.wait_timeout)
        await self.send_internal_junk(subscriber, transport_url, topic)
        await publisher.publish(f"{topic}/after", {"n": 1})
        await inbox.wait_count(2, self.wait_timeout)
        assert inbox.payloads == [{"n": 0}, {"n": 1}]
        for bus in (subscriber, publisher):
            assert bus.stats().reconnects == 0, bus.stats()
            with contextlib.suppress(pytest.skip.Exception):
                assert network(bus).connected

    # -- queue groups --------------------------------------------------------------------------

    @pytest.mark.parametrize("qos", [0, 1])
    async def test_queue_group_shares_a_burst(
        self, make_bus: BusFactory, topic: str, qos: int
    ) -> None:
        """20 messages to two workers with 50 ms handlers: both do part of the work."""
        publisher = await make_bus()
        self.require(publisher, "queue_groups")
        self.require_qos(publisher, qos)
        done: dict[str, list[int]] = {"w1": [], "w2": []}
        everything = Collector()

        def worker(name: str) -> Any:
            async def handle(env: Envelope[Any]) -> None:
                await asyncio.sleep(0.05)  # the work itself, not a synchronisation
                done[name].append(env.payload["i"])
                everything(env)

            return handle

        for name in done:
            bus = await make_bus()
            await bus.subscribe(f"{topic}/work", worker(name), queue="g", qos=qos)
        for i in range(20):
            await publisher.publish(f"{topic}/work", {"i": i}, qos=qos)
        await everything.wait_count(20, self.wait_timeout)
        assert sorted(done["w1"] + done["w2"]) == list(range(20)), done
        assert min(len(v) for v in done.values()) >= 3, done

    # -- broker restarts -----------------------------------------------------------------------

    async def test_qos1_messages_survive_two_broker_restarts(
        self, make_bus: BusFactory, restartable_broker: Restartable, topic: str
    ) -> None:
        """Publishers x QoS 1 messages, the broker restarted twice mid-flow: every one arrives.

        Publishers resend what the broker never acknowledged; the subscriber's durable
        subscription keeps what arrived while it was away. Duplicates are allowed, counted.
        """
        publishers, each = self.restart_load
        total = publishers * each
        url = restartable_broker.url
        seen: set[tuple[int, int]] = set()
        dups = 0
        marks = {total // 4: asyncio.Event(), total * 3 // 5: asyncio.Event()}
        marks[total] = asyncio.Event()

        def record(env: Envelope[Any]) -> None:
            nonlocal dups
            key = (env.payload["p"], env.payload["s"])
            if key in seen:
                dups += 1
                return
            seen.add(key)
            mark = marks.get(len(seen))
            if mark is not None:
                mark.set()

        subscriber = await make_bus(url, **self.reconnect_options, **self.durable_options())
        self.require_qos(subscriber, 1)
        await subscriber.subscribe(f"{topic}/#", record, qos=1)
        pubs = [await make_bus(url, **self.reconnect_options) for _ in range(publishers)]

        async def publish_all(p: int, bus: Bus) -> None:
            for s in range(each):
                await bus.publish(f"{topic}/{p}", {"p": p, "s": s}, qos=1)

        started = time.monotonic()
        restarts: list[int] = []
        try:
            async with asyncio.timeout(45):
                tasks = [asyncio.create_task(publish_all(p, b)) for p, b in enumerate(pubs)]
                for mark in sorted(marks)[:2]:
                    await marks[mark].wait()
                    restarts.append(len(seen))
                    await restartable_broker.arestart()
                await asyncio.gather(*tasks)
                await marks[total].wait()
        finally:
            report = (
                f"restarts at {restarts} received; {len(seen)}/{total} distinct in "
                f"{time.monotonic() - started:.1f}s; {dups} duplicates handled; subscriber "
                f"{subscriber.stats()}; publishers {[b.stats() for b in pubs]}"
            )
        # Close while the broker still runs (its fixture is torn down before make_bus's).
        async with asyncio.timeout(self.close_timeout):
            await asyncio.gather(*(b.close() for b in (subscriber, *pubs)))
        assert len(seen) == total, report
        assert subscriber.stats().delivered == total + dups, report
        assert subscriber.stats().dropped_total == 0, report
        for bus in pubs:
            stats = bus.stats()
            assert stats.published == each, report
            assert stats.dropped_total == 0, report
            assert stats.reconnects >= 1, report
