"""Fault cases every network transport runs unchanged: outages, resync, hostile input.

Subclass `FaultSuite` as the conformance suite is subclassed (set ``url`` or override
``transport_url``). The ``outage`` fixture puts a `TcpProxy` between the buses under test and
the broker, so a case can cut every connection and refuse new ones while another bus, connected
directly, changes the broker's state; nothing else on the broker is disturbed. Transports
without a TCP endpoint (memory://) skip the outage cases with a reason.

Hooks a subclass may override: ``send_internal_junk`` (junk on the transport's own channels).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, ClassVar, Protocol
from urllib.parse import urlsplit

import msgspec
import pytest
import pytest_asyncio

from .. import Bus, DropReason, Envelope, PublishError
from .._transport import NetworkTransport
from ._base import SuiteBase
from ._helpers import (
    BusFactory,
    CallbackRecorder,
    Collector,
    ConnectorFactory,
    Reading,
    sentinel,
)
from .brokers import TcpProxy

__all__ = ["DEFAULT_PORTS", "FaultSuite", "Outage", "Restartable"]

#: Ports assumed when a URL names none (the brokers' registered defaults).
DEFAULT_PORTS: dict[str, int] = {
    "mqtt": 1883,
    "mqtts": 8883,
    "ws": 80,
    "nats": 4222,
    "tls": 4222,
    "redis": 6379,
    "rediss": 6379,
    "amqp": 5672,
    "amqps": 5671,
}

#: A body that claims to be one of our envelopes and is cut short: must be a counted drop.
JUNK_ENVELOPE = b'{"specversion":"1.0","id":"junk","type":'


class Outage:
    """An outage between some buses and their broker, made with a `TcpProxy`.

    Buses opened on `url` go through the proxy; `begin` resets their connections and refuses
    new ones until `end`. Buses opened on the plain transport URL are not affected.
    """

    def __init__(self, proxy: TcpProxy, transport_url: str, timeout: float) -> None:
        self.proxy = proxy
        self.url = proxy.rewrite(transport_url)
        """The transport URL through the proxy."""
        self._timeout = timeout
        self._closers: list[Callable[[], Awaitable[Any]]] = []

    def track(self, close: Callable[[], Awaitable[Any]]) -> None:
        """Close something behind the proxy before the proxy goes (a bus's ``close``)."""
        self._closers.append(close)

    async def aclose(self) -> None:
        """Close what was tracked (while the broker is reachable), then the proxy."""
        self.proxy.resume()
        try:
            async with asyncio.timeout(self._timeout * 3):
                await asyncio.gather(*(close() for close in self._closers))
        finally:
            await self.proxy.aclose()

    async def begin(self, *buses: Bus) -> None:
        """Cut every proxied connection, refuse new ones, and wait until ``buses`` noticed."""
        self.proxy.pause()
        await self.proxy.cut()
        async with asyncio.timeout(self._timeout):
            for bus in buses:
                await network(bus).wait_disconnected()

    async def end(self, *buses: Bus) -> None:
        """Let connections through again and wait until ``buses`` reconnected."""
        self.proxy.resume()
        async with asyncio.timeout(self._timeout):
            for bus in buses:
                await network(bus).wait_connected(reconnects=1)


def network(bus: Bus) -> NetworkTransport:
    """The bus's transport as a `NetworkTransport` (fault cases need its connection state)."""
    transport = bus.transport
    if not isinstance(transport, NetworkTransport):
        pytest.skip(f"{bus.url.scheme}:// is not a NetworkTransport: no connection state to watch")
    return transport


def raw_envelope(topic: str, payload: Any, env_id: str) -> bytes:
    """A JSON envelope body with a fixed id, as a redelivery would carry it again."""
    env = Envelope(id=env_id, source="faults", type="conformance", topic=topic, payload=payload)
    return bytes(msgspec.json.encode(env))


class Restartable(Protocol):
    """A broker process the restart case can restart (`BrokerProcess` is one)."""

    @property
    def url(self) -> str:
        """The broker's URL."""

    async def arestart(self) -> Any:
        """Stop the broker and start it again on the same port and state."""


class FaultSuite(SuiteBase):
    """Outage and hostile-input cases; subclass it as ``TestSomethingFaults`` with the URL.

    Class attributes to tune: ``reconnect_options`` (passed to every bus behind the proxy),
    ``wait_timeout`` (any single wait, reconnects included).
    """

    #: Options for buses behind the proxy: reconnect fast so cases take milliseconds.
    reconnect_options: ClassVar[dict[str, Any]] = {"reconnect_min": 0.02, "reconnect_max": 0.2}
    wait_timeout: ClassVar[float] = 10.0
    #: False where a subscriber cannot tell a live retained publish from a plain one (MQTT
    #: 3.1.1): values it first saw live are then not resynced.
    live_retain_known: ClassVar[bool] = True
    #: Publishers x messages each in the restart case (10 x 1,000).
    restart_load: ClassVar[tuple[int, int]] = (10, 1_000)

    # -- fixtures and hooks ------------------------------------------------------------------

    @pytest_asyncio.fixture
    async def outage(self, transport_url: str) -> AsyncIterator[Outage]:
        """A proxy in front of the broker of ``transport_url`` (skips without a TCP endpoint)."""
        parts = urlsplit(transport_url)
        port = parts.port or DEFAULT_PORTS.get(parts.scheme)
        if not parts.hostname or port is None:
            pytest.skip(f"{parts.scheme}:// has no TCP endpoint to cut (no network connection)")
        proxy = TcpProxy(parts.hostname, port)
        await proxy.start()
        outage = Outage(proxy, transport_url, self.wait_timeout)
        try:
            yield outage
        finally:
            await outage.aclose()

    @pytest.fixture
    def restartable_broker(self) -> Restartable:
        """A private broker the suite may restart, keeping its state on disk.

        Override with one of the broker fixtures (``private_mosquitto(persistence=True)``, ...);
        the default skips the restart case.
        """
        pytest.skip(
            f"{type(self).__name__} does not override restartable_broker (the suite cannot "
            "start a private broker of this kind)"
        )

    def durable_options(self) -> dict[str, Any]:
        """Options that make a subscriber's QoS 1 subscription outlive its connection."""
        return {"client_id": f"faults-{uuid.uuid4().hex[:12]}"}

    async def behind(self, make_bus: BusFactory, outage: Outage, **options: Any) -> Bus:
        """Open a bus whose connection goes through the outage's proxy."""
        bus = await make_bus(outage.url, **{**self.reconnect_options, **options})
        outage.track(bus.close)
        return bus

    async def send_internal_junk(self, bus: Bus, transport_url: str, topic: str) -> None:
        """Publish junk, with a plain client, on every channel the transport uses internally.

        ``bus`` is the subscriber under test (for its own control topics, inboxes, ...), which
        subscribes ``topic/+`` (or its children); return once the junk reached the broker. Override per
        transport; the default skips the case.
        """
        pytest.skip(
            f"{type(self).__name__} does not override send_internal_junk (the transport's "
            "internal channels are not known to the suite)"
        )

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
            pytest.skip(f"{type(self).__name__}: live_retain_known is False (see its docstring)")
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
