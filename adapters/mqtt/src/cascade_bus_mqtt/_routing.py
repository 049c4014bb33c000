"""Routing received messages: broker subscriptions (entries), identifiers, flow control.

`Router.received` hands each message to the subscriptions it is for (by MQTT 5 subscription
identifier, else by filter), answers barrier tokens, and pauses reading while a subscription
is full (TCP then holds the broker back) until its handler made room.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from typing import TYPE_CHECKING

import paho.mqtt.client as paho_mqtt

from cascade_bus.spi import (
    DropReason,
    Message,
    MessageSink,
    StatsRecorder,
    TaskSet,
    Waiters,
    topic_matches,
)

from ._cloudevents import STRUCTURED_PREFIX, from_user_properties
from ._inflight import InflightWindow
from ._packets import RESERVED_PREFIX, RETAIN_PROPERTY
from ._wire import _Ack, _Wire

if TYPE_CHECKING:
    from ._session import Unclaimed

__all__ = ["Router", "_Entry"]

_BARRIER_ID = 1
# Persistent sessions start their subscription identifiers at a random point below this
# (MQTT allows up to 268,435,455), so a restarted process does not reuse its predecessor's.
_ID_SPREAD = 1 << 27


class _Entry:
    """One subscription at the broker (a filter, or ``$share/<queue>/<filter>``) and its sinks."""

    __slots__ = ("fresh", "native", "pattern", "qos", "queue", "sinks", "sub_id")

    def __init__(self, native: str, pattern: str, queue: str | None, qos: int) -> None:
        self.native = native
        self.pattern = pattern
        self.queue = queue
        self.qos = qos
        self.sinks: list[MessageSink] = []
        self.sub_id = 0
        # The sink being subscribed right now: retained replays go to it alone.
        self.fresh: MessageSink | None = None


class Router:
    """Where received messages go, and whether reading is paused for a full subscription.

    Args:
        barrier_topic: This transport's own barrier topic (tokens answer `barriers`).
        window: The in-flight window (reading never pauses while a user publish waits).
        stats: The transport's counters.
        tasks: The transport's tasks (the resume task is one).
        persistent: A persistent session (identifiers start at a random point).
    """

    def __init__(
        self,
        barrier_topic: str,
        window: InflightWindow,
        stats: StatsRecorder,
        tasks: TaskSet,
        persistent: bool,
    ) -> None:
        self.barrier_topic = barrier_topic
        self.barriers = Waiters()  # our barrier tokens, by token
        self.window = window
        self.stats = stats
        self.tasks = tasks
        self.entries: dict[str, _Entry] = {}
        self.by_id: dict[int, _Entry] = {}
        # Subscription identifiers of a previous process on this session stay on the messages
        # the broker queued for it; a random start keeps ours from colliding with them.
        self.id_base = _BARRIER_ID + 1
        if persistent:
            self.id_base += int.from_bytes(os.urandom(4), "big") % _ID_SPREAD
        self.ids = itertools.count(self.id_base)
        self.id_last = _BARRIER_ID
        self.replaying: _Entry | None = None  # the entry being subscribed (retained replay)
        self.unclaimed: Unclaimed | None = None
        # Subscriptions that reported "full" while reading: reading pauses until they have room.
        self.full: list[MessageSink] = []
        self.paused = False
        self.paused_wire: _Wire | None = None  # the connection whose reading is paused
        self.resume_task: asyncio.Task[None] | None = None

    def reset(self) -> None:
        """A new connection starts reading."""
        self.full.clear()
        self.paused = False
        self.paused_wire = None

    def on_message(self, client: paho_mqtt.Client, wire: _Wire, msg: paho_mqtt.MQTTMessage) -> None:
        """A PUBLISH paho decoded (QoS 2, or one `_parse_publish` leaves to paho)."""
        headers: dict[str, str] | None = None
        ids: list[int] | None = None
        if wire.v5:
            props = msg.properties
            if props is not None:
                user = getattr(props, "UserProperty", None)
                if user:
                    headers = dict(user)
                content_type = getattr(props, "ContentType", None)
                if content_type and not content_type.startswith(STRUCTURED_PREFIX):
                    headers = {**(headers or {}), "content-type": content_type}
                ids = getattr(props, "SubscriptionIdentifier", None)
        self.received(
            wire,
            msg.topic,
            bytes(msg.payload),
            msg.qos,
            msg.mid,
            bool(msg.dup),
            bool(msg.retain),
            headers,
            ids,
        )

    def received(
        self,
        wire: _Wire,
        topic: str,
        payload: bytes,
        qos: int,
        mid: int,
        dup: bool,
        retained: bool,
        headers: dict[str, str] | None,
        ids: list[int] | None,
    ) -> None:
        """Route one received message to the subscriptions it is for (acked after them)."""
        if topic.startswith(RESERVED_PREFIX):
            if qos:
                wire.ack(mid, qos)
            if topic == self.barrier_topic:
                self.barriers.arrived(payload)
            return
        if dup:
            self.stats.duplicates += 1  # a redelivery: the broker never saw our PUBACK
        ack = _Ack(wire, mid, qos) if qos else None
        retain = False
        if headers is not None and RETAIN_PROPERTY in headers:
            # A cascade-bus publisher's retained publish (MQTT 5): a live copy of it (RETAIN
            # flag off) is Message.retain; a replay is retained anyway. Never a header.
            del headers[RETAIN_PROPERTY]
            retain = not retained
            if not headers:
                headers = None
        if headers is not None and "specversion" in headers:  # a binary-mode CloudEvent
            headers = from_user_properties(headers)
        message = Message(
            topic, payload, headers, retained=retained, retain=retain, qos=qos, ack=ack
        )
        delivered = 0
        if ids:
            for sub_id in ids:
                entry = self.by_id.get(sub_id)
                if entry is not None:
                    delivered += self.deliver(entry, message, retained)
        elif retained and self.replaying is not None:
            fresh = self.replaying.fresh
            if fresh is not None and topic_matches(self.replaying.pattern, topic):
                delivered = 1
                if not fresh.deliver(message):
                    self.full.append(fresh)
        else:
            for entry in self.entries.values():
                if topic_matches(entry.pattern, topic):
                    delivered += self.deliver(entry, message, retained)
        if not delivered:
            if self.unclaimed is not None and not retained and self.foreign(ids):
                # A persistent session's backlog, routed by a previous process's
                # subscriptions: held for the subscribe() that will want it.
                self.unclaimed.take(message, ack)
                return
            # Nothing here subscribes to it (a subscription just removed, a retained replay
            # for a queue subscription, a clean session's stray message): counted, and
            # acknowledged so it is not resent.
            self.stats.drop(DropReason.NO_SUBSCRIBER)
        if ack is not None:
            ack.expect(delivered)

    def deliver(self, entry: _Entry, message: Message, retained: bool) -> int:
        """Hand a message to an entry's sinks; return how many took it (each will ack once).

        A retained replay goes to the sink being subscribed (``entry.fresh``) alone, or, in a
        reconnect's resync (no ``fresh`` then), to every sink of the entry.
        """
        if retained:
            if entry.queue is not None:
                return 0  # Mosquitto replays retained to shared subscriptions; the bus does not
            fresh = entry.fresh
            if fresh is not None:
                if not fresh.deliver(message):
                    self.full.append(fresh)
                return 1
        for sink in entry.sinks:
            if not sink.deliver(message):
                self.full.append(sink)
        return len(entry.sinks)

    def foreign(self, ids: list[int] | None) -> bool:
        """True unless one of the message's subscription identifiers is one we issued.

        A message still tagged with one of our own identifiers (a subscription just removed)
        is a plain stray; anything else (a previous process's identifiers, or none: MQTT
        3.1.1) may be a resumed session's backlog.
        """
        if not ids:
            return True
        low, high = self.id_base, self.id_last
        return all(not low <= sub_id <= high for sub_id in ids)

    # -- flow control ---------------------------------------------------------------------------

    def pause_reading(self, wire: _Wire) -> None:
        """Stop reading from the broker until every full subscription has room again.

        Not while one of our QoS>=1 publishes waits for its acknowledgement: that ack comes on
        this socket, and the publisher may be the very handler the full subscription waits on.
        A QoS 1 barrier does not count: no handler waits on its acknowledgement, and one in
        flight while a resync's QoS 0 replay arrives would otherwise turn flow control off for
        the whole replay (overflow instead of waiting for the handler). The presence publish
        does (its wait for the PUBACK is bounded: a paused socket must not fail a connect).
        """
        if not wire.alive or self.paused or self.window.busy_for_users(self.barrier_topic):
            self.full.clear()
            return
        loop = asyncio.get_running_loop()
        loop.remove_reader(wire.sock.fileno())
        self.paused = True
        self.paused_wire = wire
        full = self.full[:]
        self.full.clear()  # the same list: the session appends to it too
        self.resume_task = self.tasks.spawn(self._resume_reading(wire, full), "resume")

    def resume_now(self) -> None:
        """Read again at once (one of our publishes waits for its acknowledgement)."""
        task = self.resume_task
        if task is not None and not task.done():
            task.cancel()  # one that has not started yet never runs its finally
        if self.paused_wire is not None:
            self._unpause(self.paused_wire)

    async def _resume_reading(self, wire: _Wire, full: list[MessageSink]) -> None:
        try:
            for sink in full:
                await sink.ready()  # bounded by the bus's flow_timeout
        finally:
            self._unpause(wire)

    def _unpause(self, wire: _Wire) -> None:
        """Read ``wire`` again, unless reading is not paused on it (a newer connection's)."""
        if not self.paused or wire is not self.paused_wire:
            return
        self.paused = False
        self.paused_wire = None
        if wire.alive:
            loop = asyncio.get_running_loop()
            loop.add_reader(wire.sock.fileno(), wire.readable)
            if wire.buf:  # packets read before the pause come first
                loop.call_soon(wire.resume)

    def fail_barriers(self, error: BaseException) -> None:
        """The transport closed: nobody waits for a barrier any more."""
        self.barriers.fail_all(error)
