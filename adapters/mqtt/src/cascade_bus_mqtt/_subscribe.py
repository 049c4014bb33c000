"""Subscribing: SUBSCRIBE with identifiers, the loopback barrier, resubscribe and resync.

``subscribe`` returns only after SUBACK *and* a barrier message published after it came back
on the same connection, so every retained message the broker sent for the new filter has been
delivered first (no sleeps). After a reconnect `Subscriptions.resubscribe_all` resyncs.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import TYPE_CHECKING

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from cascade_bus import ConnectionLost, SubscribeError
from cascade_bus.spi import MessageSink, TransportSubscription

from ._errors import client_errors, subscribe_refused
from ._inflight import MqttOutgoing
from ._packets import _publish_packet
from ._routing import _BARRIER_ID, Router, _Entry

if TYPE_CHECKING:
    from ._transport import MqttTransport

__all__ = ["Subscriptions"]

log = logging.getLogger("cascade_bus.mqtt")

# Bound on the barrier that ends a reconnect's retained replay (see resubscribe_all).
_RESYNC_TIMEOUT = 10.0


class _Handle(TransportSubscription):
    __slots__ = ("entry", "sink", "subs")

    def __init__(self, subs: Subscriptions, entry: _Entry, sink: MessageSink) -> None:
        self.subs = subs
        self.entry = entry
        self.sink = sink

    async def unsubscribe(self) -> None:
        await self.subs.remove(self.entry, self.sink)


class Subscriptions:
    """The transport's subscriptions at the broker (kept in its `Router`), made and remade."""

    def __init__(self, transport: MqttTransport, router: Router) -> None:
        self.transport = transport
        self.router = router
        self.lock = asyncio.Lock()
        self.barrier_ids = itertools.count(1)

    async def native(self, native: str, qos: int, sub_id: int) -> None:
        """SUBSCRIBE ``native`` (with identifier ``sub_id``, MQTT 5) and check the SUBACK."""
        transport = self.transport
        client = transport._client
        if client is None:
            raise ConnectionLost(f"not connected to {transport.url.endpoint()}")
        with client_errors(transport.url.endpoint(), pattern=native):
            if transport._v5:
                properties = Properties(PacketTypes.SUBSCRIBE)  # type: ignore[no-untyped-call]
                properties.SubscriptionIdentifier = sub_id
                options = SubscribeOptions(qos=qos)
                call = client.subscribe(native, options=options, properties=properties)
            else:
                call = client.subscribe(native, qos)
            granted = await transport._conn.until_lost(call, f"subscribing to {native!r}")
        error = subscribe_refused(transport.url.endpoint(), native, list(granted))
        if error is not None:
            raise error

    async def subscribe_barrier(self) -> None:
        """Subscribe this connection to its own barrier topic (right after CONNACK)."""
        await self.native(self.router.barrier_topic, 1, _BARRIER_ID)

    async def barrier(self, qos: int) -> None:
        """Publish a token to our own barrier topic and wait for it to come back."""
        transport = self.transport
        wire = transport._wire
        if wire is None or not wire.alive:
            raise ConnectionLost(f"lost {transport.url.endpoint()} before a barrier")
        token = str(next(self.barrier_ids)).encode()
        barriers = self.router.barriers
        fut = barriers.add(token)
        try:
            topic = self.router.barrier_topic
            no_props = transport._no_props
            if qos:  # its PUBACK counts in the in-flight window like any other
                out = MqttOutgoing(topic, token, 1, False, no_props, None, True)
                transport._inflight.send(wire, out, True)
            else:
                head = transport._heads.head(topic)
                wire.write(_publish_packet(head, token, 0, False, no_props, 0), False)
            await transport._conn.until_lost(fut, "waiting for a barrier")
        finally:
            barriers.discard(token)

    async def subscribe(
        self, pattern: str, sink: MessageSink, qos: int, queue: str | None
    ) -> TransportSubscription:
        """Subscribe (one broker subscription per filter) and replay retained first."""
        transport = self.transport
        router = self.router
        unclaimed = router.unclaimed
        native = f"$share/{queue}/{pattern}" if queue else pattern
        async with self.lock:
            await transport._up.wait()
            entry = router.entries.get(native)
            created = entry is None
            if entry is None:
                entry = _Entry(native, pattern, queue, qos)
            old_id = entry.sub_id
            entry.sub_id = router.id_last = next(router.ids)
            entry.qos = max(entry.qos, qos)
            entry.sinks.append(sink)
            entry.fresh = sink if queue is None else None
            router.entries[native] = entry
            router.by_id[entry.sub_id] = entry
            router.replaying = entry
            barrier_qos = entry.qos
            if unclaimed is not None:
                unclaimed.claim(pattern, sink)
                unclaimed.claimer = (pattern, sink)
                # QoS 1: queued behind the whole backlog, which so reaches us before it.
                barrier_qos = 1
            try:
                await self.native(native, entry.qos, entry.sub_id)
                await self.barrier(barrier_qos)
            except BaseException:
                entry.sinks.remove(sink)
                if created:
                    router.entries.pop(native, None)
                router.by_id.pop(entry.sub_id, None)
                entry.sub_id = old_id
                raise
            finally:
                entry.fresh = None
                router.replaying = None
                if unclaimed is not None:
                    unclaimed.claimer = None
            if old_id:
                router.by_id.pop(old_id, None)
        return _Handle(self, entry, sink)

    async def remove(self, entry: _Entry, sink: MessageSink) -> None:
        """Detach ``sink``; the last one of an entry unsubscribes it at the broker."""
        router = self.router
        async with self.lock:
            if sink in entry.sinks:
                entry.sinks.remove(sink)
            if entry.sinks or router.entries.get(entry.native) is not entry:
                return
            del router.entries[entry.native]
            router.by_id.pop(entry.sub_id, None)
            transport = self.transport
            client = transport._client
            if client is not None and transport._connected:
                try:
                    async with asyncio.timeout(5.0):
                        with client_errors(transport.url.endpoint(), pattern=entry.native):
                            await client.unsubscribe(entry.native)
                except (SubscribeError, TimeoutError) as exc:
                    log.debug("unsubscribe %r: %r", entry.native, exc)

    async def resubscribe_all(self) -> None:
        """Resubscribe every filter after a reconnect and resync the retained state.

        Every sink of a non-queue entry hears `resync_begin` before the first SUBSCRIBE (with
        MQTT 3.1.1 a replay reaches every entry whose filter matches, so all of them must be
        resyncing by then), receives the broker's retained replay as usual (``entry.fresh`` is
        None: every sink of the entry gets it, see `Router.deliver`), and hears `resync_end`
        once a QoS 1 barrier published after the last SUBACK came back. The SUBACK alone is
        not enough (Mosquitto 2.0 writes it *before* the replay), but the broker queues the
        replay when it handles the SUBSCRIBE, so the barrier is queued behind all of it (QoS 1:
        also behind QoS 1 messages waiting for the in-flight window, as a resumed session's
        backlog). The sinks drop replays of values they already have and report the topics
        cleared meanwhile.

        Lost again before the barrier returned: this raises, the next attempt begins again,
        and `resync_end` is never called for an incomplete replay. A barrier that does not
        come back within ``_RESYNC_TIMEOUT`` (handlers holding the broker's in-flight window
        with unacknowledged messages, a huge backlog) holds the reconnect up no longer: the
        replay goes on, deduplicated (the sinks stay in their resync until the next one), but
        no clears are reported for this outage.
        """
        router = self.router
        entries = list(router.entries.values())
        resync = [(entry, list(entry.sinks)) for entry in entries if entry.queue is None]
        for _entry, sinks in resync:
            for sink in sinks:
                sink.resync_begin()
        for entry in entries:
            await self.native(entry.native, entry.qos, entry.sub_id)
        if not any(sinks for _entry, sinks in resync):
            return
        try:
            async with asyncio.timeout(_RESYNC_TIMEOUT):
                await self.barrier(1)
        except TimeoutError:
            log.warning(
                "%s did not finish the retained replay within %.0fs of resubscribing; "
                "topics cleared during the outage are not reported this time",
                self.transport.url.endpoint(),
                _RESYNC_TIMEOUT,
            )
            return
        for entry, sinks in resync:
            if router.entries.get(entry.native) is not entry:
                continue  # unsubscribed meanwhile: its sinks are closed
            for sink in sinks:
                if sink in entry.sinks:
                    sink.resync_end()
