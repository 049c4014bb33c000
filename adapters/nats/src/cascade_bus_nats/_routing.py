"""Routing: subject -> subscription. What arrives for a bus subscription, and its QoS-1 acks.

An `Entry` is one bus subscription (its core SUBs, its QoS-1 `Consumer`s, its replay buffer and
its backlog while the sink is full); ``route_*`` are called for every message (see `Router`).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Mapping
from typing import TYPE_CHECKING, Any

import nats.errors as nats_errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as NatsSubscription

from cascade_bus.spi import (
    DropReason,
    Message,
    MessageSink,
    TransportSubscription,
    WithId,
    encode_header_value,
)

from ._fastpath import PLAIN, Route, Router
from ._mapper import ESCAPE, topic_from_subject
from ._wire import ACK, INBOX, JS_ACK, ack_reply_fields, is_no_responders, split_headers

if TYPE_CHECKING:
    from ._transport import NatsTransport

__all__ = ["BACKLOG", "Ack", "Consumer", "Entry", "ack_soon", "nsub", "unsub_route"]

log = logging.getLogger("cascade_bus.nats")
# Messages one subscription may hold while its sink is full (then QoS 0 is dropped, counted).
BACKLOG = 65_536


async def nsub(
    nc: NatsClient, router: Router | None, subject: str, queue: str, route: Route
) -> NatsSubscription:
    """A core subscription whose messages go to ``route`` (through `Router` if we can)."""
    if router is None:

        async def callback(msg: Msg) -> None:
            route(msg.subject, msg.reply, msg.data, msg.headers)

        return await nc.subscribe(subject, queue=queue, cb=callback)
    sid = router.next_sid(nc)
    router.routes[sid] = route  # before the SUB goes out: no message can miss the route
    try:
        sub = await nc.subscribe(subject, queue=queue)
    except BaseException:
        router.routes.pop(sid, None)
        raise
    if sub._id != sid:  # pragma: no cover - nats-py numbers subscriptions in order
        router.routes[sub._id] = router.routes.pop(sid)
    return sub


def ack_soon(ack: Ack) -> None:
    """Acknowledge a JetStream message the subscription will not see (a stale copy)."""
    try:
        pending = ack.send()
    except nats_errors.Error as exc:
        log.debug("ack of %s failed: %r", ack.reply, exc)
        return
    if pending is not None:
        ack.consumer.entry.transport._tasks.spawn(_written(pending, ack.reply), "ack")


async def _written(pending: Awaitable[Any], reply: str) -> None:
    try:
        await pending
    except nats_errors.Error as exc:  # not acked: JetStream redelivers it (a duplicate)
        log.debug("ack of %s failed: %r", reply, exc)


def unsub_route(router: Router | None, sub: NatsSubscription) -> None:
    """Forget the route of a core subscription (before unsubscribing it)."""
    if router is not None:
        router.routes.pop(sub._id, None)


class Ack:
    """`Message.ack` of a JetStream message: acknowledges it once the handler ran."""

    __slots__ = ("consumer", "reply", "seq")

    def __init__(self, consumer: Consumer, reply: str, seq: int) -> None:
        self.consumer = consumer
        self.reply = reply
        self.seq = seq

    def send(self) -> Awaitable[Any] | None:
        """Queue the ack; return an awaitable only when the write buffer is full."""
        consumer = self.consumer
        consumer.unacked.pop(self.seq, None)
        transport = consumer.entry.transport
        nc = transport._nc
        if nc is None or not nc.is_connected:
            return None  # not acked: JetStream redelivers it (counted as a duplicate)
        return transport._writer.publish(self.reply, ACK)

    async def __call__(self) -> None:
        try:
            pending = self.send()
            if pending is not None:
                await pending
        except nats_errors.Error as exc:  # not acked: JetStream redelivers it (a duplicate)
            log.debug("ack of %s failed: %r", self.reply, exc)


class Entry(TransportSubscription):
    """One bus subscription: its core subscriptions, QoS-1 consumers and replay buffer.

    Messages arrive through ``route_*`` (plain functions called for every message, see
    `Router`) and go to the sink in arrival order. When the sink says it is at its high-water
    mark, later messages wait in ``backlog`` while one task awaits ``sink.ready()`` and hands
    them over; the receive loop itself never blocks.
    """

    def __init__(
        self,
        transport: NatsTransport,
        pattern: str,
        natives: tuple[str, ...],
        sink: MessageSink,
        qos: int,
        queue: str | None,
    ) -> None:
        self.transport = transport
        self.pattern = pattern
        self.natives = natives
        self.sink = sink
        self.qos = qos
        self.queue = queue
        # A leading wildcard must not match $ topics (MQTT) nor NATS's INBOX replies.
        self.wild = pattern[0] in "+#"
        self.cut = len(transport._opts.qos1_prefix) + 1
        self.own_ids = transport._msg_id_prefix
        self.nsubs: list[NatsSubscription] = []
        self.consumers: list[Consumer] = []
        # While the retained snapshot is read: (revision or None, message) in arrival order.
        self.buffer: list[tuple[str | None, Message]] | None = None
        # Snapshot revision per topic: live copies of retained publishes at or below it are
        # duplicates of what the snapshot delivered.
        self.seen: dict[str, int] = {}
        self.backlog: deque[Message] = deque()
        self.waiting = False  # a task waits for the sink; new messages go to the backlog
        self.drainer: asyncio.Task[None] | None = None  # that task
        # Lost the connection: the retained resync after the reconnect is still to be done
        # (``buffer`` holds what arrives meanwhile).
        self.resync = False
        self.closed = False

    def __repr__(self) -> str:
        return f"<NATS subscription {self.pattern!r} natives={list(self.natives)} qos={self.qos}>"

    async def unsubscribe(self) -> None:
        await self.remove()

    async def remove(self, *, closing: bool = False) -> None:
        """Unsubscribe; delete the consumers nobody will resume (see `Consumer`)."""
        entry, transport = self, self.transport
        if entry.closed:
            return
        entry.closed = True
        entry.buffer = None
        transport._entries.discard(entry)
        for sub in entry.nsubs:
            unsub_route(transport._router, sub)
            try:
                await sub.unsubscribe()
            except nats_errors.Error as exc:
                log.debug("unsubscribe %r: %r", entry.pattern, exc)
        nc = transport._nc
        if nc is not None and nc.is_connected:
            deletes = [
                transport._js.delete_consumer(transport._opts.stream, consumer.name)
                for consumer in entry.consumers
                if consumer.kind == "private" or (consumer.kind == "resumable" and not closing)
            ]
            if deletes:
                await asyncio.gather(*deletes)

    def stale(self, message: Message, rev: str) -> bool:
        """Tell whether a retained publish's live copy was already delivered by the snapshot.

        The copy can reach us after the snapshot read its KV entry, even after the hand-over.
        """
        seen = self.seen
        return bool(seen) and rev.isdigit() and int(rev) <= seen.get(message.topic, 0)

    def feed(self, message: Message, rev: str | None) -> None:
        """Hand one received message on (buffer, drop as stale, backlog or sink)."""
        buffer = self.buffer
        if buffer is not None:
            buffer.append((rev, message))
            return
        if rev is not None and self.stale(message, rev):
            if isinstance(message.ack, Ack):
                ack_soon(message.ack)
            return
        if self.waiting:
            backlog = self.backlog
            if len(backlog) >= BACKLOG:
                if message.qos == 0:  # QoS 1 is not acked: JetStream delivers it again
                    self.transport.stats.drop(DropReason.OVERFLOW)
                return
            backlog.append(message)
            return
        if not self.sink.deliver(message):
            self._start_drain()

    def _start_drain(self) -> None:
        self.waiting = True
        self.drainer = self.transport._tasks.spawn(self._drain(), "flow-control")

    def release(self) -> None:
        """End buffering: hand on what arrived meanwhile (stale live copies dropped)."""
        buffered, self.buffer = self.buffer, None
        for rev, message in buffered or ():
            self.feed(message, rev)

    async def _drain(self) -> None:
        sink = self.sink
        backlog = self.backlog
        try:
            while not self.closed:
                await sink.ready()
                while backlog:
                    if not sink.deliver(backlog.popleft()):
                        break
                else:
                    return
        finally:
            self.waiting = False
            if self.closed and backlog:
                self.transport.stats.drop(DropReason.UNSUBSCRIBED, len(backlog))
                backlog.clear()

    def route_plain(
        self, subject: str, reply: str, data: bytes, headers: Mapping[str, str] | None
    ) -> None:
        """A core message on the plain subject (published at QoS 0)."""
        if headers and (  # a shared block without status or own headers (and maybe an id)
            id(headers) in PLAIN or (type(headers) is WithId and id(headers.base) in PLAIN)
        ):
            if self.wild and (subject[0] == "$" or subject.startswith(INBOX)):
                return
            if not reply and self.buffer is None and not self.waiting:
                # `topic_from_subject` inline for the common subject without escapes
                topic = (
                    subject.replace(".", "/") if ESCAPE not in subject
                    else topic_from_subject(subject)
                )  # fmt: skip
                if not self.sink.deliver(Message(topic, data, headers)):
                    self._start_drain()
                return
        elif headers and is_no_responders(data, headers):
            # The server's answer to one of our requests (on its reply subject, delivered to
            # the first of our plain subscriptions that matches it): nobody listens.
            self.transport._no_responders(subject)
            return
        if self.wild and (subject[0] == "$" or subject.startswith(INBOX)):
            return
        rev = None
        if headers:
            headers, rev = split_headers(headers, self.own_ids)
        if reply:
            # A plain NATS request: answering env.reply_to (bus.reply) reaches the requester.
            headers = {
                "ce-replyto": encode_header_value(topic_from_subject(reply)),
                **(headers or {}),
            }
        if rev is None:
            message = Message(topic_from_subject(subject), data, headers)
            if self.buffer is None and not self.waiting:
                if not self.sink.deliver(message):
                    self._start_drain()
                return
        else:  # the live copy of a retained publish (a clear too): tracked for the resync
            message = Message(topic_from_subject(subject), data, headers, retain=True)
        self.feed(message, rev)

    def route_prefixed(
        self, subject: str, reply: str, data: bytes, headers: Mapping[str, str] | None
    ) -> None:
        """A QoS-1 message seen with core NATS by a QoS-0 subscription."""
        topic = topic_from_subject(subject[self.cut :])
        if self.wild and topic[0] == "$":
            return
        if headers:
            headers, rev = split_headers(headers, self.own_ids)
            if rev is not None:  # the live copy of a retained publish
                self.feed(Message(topic, data, headers, retain=True), rev)
                return
        self.feed(Message(topic, data, headers), None)


class Consumer:
    """A durable JetStream push consumer feeding one `Entry` (QoS 1).

    ``kind``: ``"private"`` (a random name: deleted on unsubscribe and on close, nobody could
    resume it), ``"resumable"`` (named after ``client_id``: deleted on unsubscribe, kept on
    close so that the next bus with that ``client_id`` resumes it) or ``"shared"`` (a queue
    group's: never deleted here; the server drops it ``consumer_inactive`` after its last
    member left).
    """

    __slots__ = ("deliver", "entry", "filter", "kind", "last", "name", "unacked")

    def __init__(
        self, entry: Entry, name: str, filter_subject: str, deliver: str, kind: str
    ) -> None:
        self.entry = entry
        self.name = name
        self.filter = filter_subject
        self.deliver = deliver
        self.kind = kind
        self.last = 0  # highest stream sequence received
        self.unacked: dict[int, None] = {}  # received, not yet acked (insertion ordered)

    def start_sequence(self) -> int | None:
        """Where a re-created consumer resumes: the oldest unacked message, or the next one."""
        if self.unacked:
            return min(self.unacked)
        return self.last + 1 if self.last else None

    def route(
        self, subject: str, reply: str, data: bytes, headers: Mapping[str, str] | None
    ) -> None:
        if not reply.startswith(JS_ACK):
            return  # not a stream message (no heartbeats or flow control are configured)
        entry = self.entry
        delivered, seq, _ = ack_reply_fields(reply)
        if delivered > 1:
            entry.transport.stats.duplicates += 1
        if seq > self.last:
            self.last = seq
        self.unacked[seq] = None
        ack = Ack(self, reply, seq)
        topic = topic_from_subject(subject[entry.cut :])
        if entry.wild and topic[0] == "$":
            ack_soon(ack)
            return
        if headers:
            headers, rev = split_headers(headers, entry.own_ids)
            if rev is not None:  # the live copy of a retained publish
                entry.feed(Message(topic, data, headers, qos=1, ack=ack, retain=True), rev)
                return
        entry.feed(Message(topic, data, headers, qos=1, ack=ack), None)
