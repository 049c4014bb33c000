"""The NATS transport: core NATS for QoS 0, JetStream for QoS 1 and for retained messages.

Subjects. Portable topics become NATS subjects through `NatsTopicMapper` (``/`` → ``.``,
``+`` → ``*``, ``#`` → ``>``, ``%XX`` escapes). ``a/#`` is subscribed as ``a`` and ``a.>``. NATS
wildcards also match ``$`` subjects and NATS's own ``_INBOX.`` replies; a subscription whose
pattern starts with a wildcard drops those itself, so the bus never needs to re-filter
(``filters_exactly`` stays True).

QoS 1. Messages published with ``qos=1`` go to ``<qos1_prefix>.<subject>`` (default
``$CASCADE.Q1.<subject>``), captured by one JetStream stream (``CASCADE_BUS``; limits
retention, one hour and 1 GiB by default, so a re-created consumer can resume where it stopped;
interest retention loses messages across restarts on nats-server 2.9). The publisher waits for
the stream's acknowledgement; every message carries a ``Nats-Msg-Id``, so a resend after a lost
acknowledgement is dropped by the stream's duplicate window. While disconnected, a publish (any
QoS, retained too) returns once the message is in the offline buffer (``offline_buffer``; full:
QoS 0 dropped and counted, QoS 1 and retained refused with `PublishError`); messages still
waiting for their acknowledgement when the connection drops join it in front, and their
publishers stop waiting too. After the reconnect they are sent again in order and confirmed
(`flush` waits for that); one that fails then is counted (``publish_failed``) and logged.

A QoS-1 subscription is a durable push consumer per native filter (``max_ack_pending`` bounds
what is in flight); the bus acks each message after its handler ran (`Message.ack`), and a
redelivery (JetStream's delivery count above 1, on the fast and the public path alike) is
counted in ``stats.duplicates``. A QoS-0 subscription also listens on the prefixed subject
with plain core NATS, so it sees QoS-1 messages at QoS 0 (MQTT's min(publish, subscribe) rule);
a QoS-1 subscription listens to the plain subject with core NATS for QoS-0 messages.

Retained messages (emulated). A retained publish first writes the body (and its headers) to the
KV bucket ``cascade_retained`` under the key = the NATS subject (an empty body writes a KV delete
marker), gets the entry's revision from JetStream's acknowledgement, and only then publishes
the live message with the header ``Cascade-Bus-Rev: <revision>``. A subscriber strips that
header and hands the live copy on with ``Message.retain`` set (a clear too), so the sink's
resync ledger also tracks topics whose value it first saw live. A new subscription:

1. starts its live subscriptions first (core SUBs, QoS-1 consumers) and *buffers* what arrives;
2. reads the snapshot: the last KV entry of every matching key with its revision (a get for an
   exact subject; for a wildcard, the keys listed by the bucket's leader and a get each, or an
   ephemeral ``last_per_subject`` consumer beyond `_LISTED_MAX` keys), sent after the SUBs on
   the same connection, so the server registered them first;
3. hands every live value of the snapshot to the sink (``retained=True``), oldest revision first;
4. replays the buffer, dropping a live message whose revision is at most the snapshot's revision
   for its topic (the snapshot already delivered it or a newer value), then goes live; the check
   stays on, since such a live copy may also arrive after the hand-over.

Every retained publish is seen at least once: if its live copy reached the server before our SUB,
its KV write (done before the live copy was sent) precedes the snapshot read. It is seen at
most once: the revision identifies the live copy of a value the snapshot delivered. Nothing
else is dropped, and each topic keeps its order. Queue subscriptions get no replay.

Retained resync. When the connection drops, every replaying subscription starts buffering
(step 1: nats-py replays its SUBs on the new connection before anything can arrive); after the
reconnect (and the JetStream repair) one task, ``resync``, reads each one's snapshot again and
hands it over as in steps 3 and 4 between ``sink.resync_begin()`` and ``sink.resync_end()``:
the sink drops the values it already had and synthesizes a clear for each topic it knew that
the snapshot no longer holds, so changes made during the outage arrive once. Lost again while
reading, the task is cancelled and the next reconnect starts over; a snapshot that cannot be
read is logged and counted (``resync_failures``), and the buffered live messages go on.

Request/reply. A request the bus publishes (its body or, with ``format=raw``, its
``ce-replyto`` header names a ``reply_to``) goes out with that inbox as its NATS reply subject;
any other publish has none. When nothing is subscribed to the request's subject, the server
answers on the reply subject with a 503 status and no body (nats-py announces ``headers`` and
``no_responders`` in CONNECT); the subscription that receives it calls ``on_no_responders``
instead of delivering it, and `Bus.request` raises `NoResponders` at once. Plain NATS clients
can answer a request with ``msg.respond()``.

Per message, the transport skips most of nats-py's machinery (see `_fastpath`): received frames
go from its read buffer straight to the subscriptions' sinks, publishes straight to its write
buffer. A sink at its high-water mark makes later messages wait in order in a per-subscription
backlog while one task awaits ``sink.ready()``; the read loop never blocks.

Reconnect. nats-py reconnects (waiting ``reconnect_min``, doubling with jitter up to
``reconnect_max``, between attempts on a server) and replays core SUBs; this transport counts
it, sends the offline buffer again (messages published while disconnected, QoS-1 messages never
acknowledged), checks the stream, the bucket and every QoS-1 consumer, re-creating what the
server lost (a missing consumer restarts from the oldest message it had not acknowledged), and
resyncs the retained state.

Cluster. The stream and the bucket are created with ``replicas`` copies (``auto``: 3 when the
server is part of a cluster, 1 if JetStream cannot place them or on a single server), so they
and the consumers survive the loss of a node. While leaders are re-elected after a node died,
JetStream calls time out or answer 503: publishes are resent (until ``qos1_timeout``) and the
JetStream calls of ``subscribe`` are retried (`_js_retry`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import itertools
import logging
import os
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, ClassVar, TypeVar, cast

import msgspec
import nats.errors as nats_errors
import nats.js.errors as js_errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as NatsSubscription
from nats.js import api as js_api
from nats.js.manager import JetStreamManager

from cascade_bus import (
    BusClosed,
    ConnectError,
    ConnectionLost,
    InvalidTopic,
    PayloadTooLarge,
    PublishError,
    SubscribeError,
    validate_topic,
)
from cascade_bus.spi import (
    BusURL,
    Capabilities,
    DropReason,
    Message,
    MessageSink,
    NetworkTransport,
    TopicMapper,
    TransportSubscription,
    backoff_delays,
)

from ._fastpath import (
    PublicWriter,
    Route,
    Router,
    TooLarge,
    Writer,
    install_parser,
    supported,
)
from ._mapper import NatsTopicMapper, subject_from_topic, topic_from_subject
from ._options import NatsOptions

__all__ = ["REVISION_HEADER", "NatsTransport"]

log = logging.getLogger("cascade_bus.nats")

#: Header of a retained message's live copy: the revision of its KV entry (stripped on receipt).
REVISION_HEADER = "Cascade-Bus-Rev"
_MSG_ID = "Nats-Msg-Id"
_KV_OP = "KV-Operation"
_STATUS = "Status"
# Headers a direct get or JetStream adds to a stored message; not the publisher's.
_STORED_HEADERS = (
    "Nats-Stream",
    "Nats-Subject",
    "Nats-Sequence",
    "Nats-Time-Stamp",
    "Nats-Last-Sequence",
    _KV_OP,
    _MSG_ID,
)
_ACK = b"+ACK"
_INBOX = "_INBOX."
_JS_ACK = "$JS.ACK."
# nats-server's default max_control_line is 4 KiB; the subject shares that line.
_MAX_SUBJECT_BYTES = 3_800
# Messages one subscription may hold while its sink is full (then QoS 0 is dropped, counted).
_BACKLOG = 65_536
_DEFAULT_MAX_PAYLOAD = 1_048_576

_CAPS = Capabilities(
    max_qos=1,
    retain=True,
    retain_emulated=True,
    wildcards=True,
    headers=True,
    queue_groups=True,
    request_reply=True,
    no_responders=True,
    will=False,
    persistence=True,
    ordering=True,
    max_payload=_DEFAULT_MAX_PAYLOAD,
    emulated=frozenset({"retain"}),
)
_NO_RETAIN_CAPS = msgspec.structs.replace(
    _CAPS, retain=False, retain_emulated=False, emulated=frozenset()
)
_CORE_CAPS = msgspec.structs.replace(_NO_RETAIN_CAPS, max_qos=0, persistence=False)

# Errors nats-py raises when a connection is gone or going (the operation may succeed later).
_GONE = (
    nats_errors.ConnectionClosedError,
    nats_errors.OutboundBufferLimitError,
    nats_errors.ConnectionReconnectingError,
    nats_errors.ConnectionDrainingError,
    nats_errors.StaleConnectionError,
)


def _transient(exc: Exception) -> bool:
    """Tell whether a JetStream call failed for a moment (no leader yet, a reconnect)."""
    if isinstance(exc, js_errors.APIError):
        return exc.code == 503
    return isinstance(
        exc,
        TimeoutError
        | nats_errors.NoRespondersError
        | nats_errors.ConnectionReconnectingError
        | nats_errors.StaleConnectionError,
    )


class _ApiError(msgspec.Struct):
    code: int = 0
    err_code: int = 0
    description: str = ""


class _PubAck(msgspec.Struct):
    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    error: _ApiError | None = None


_pub_ack = msgspec.json.Decoder(_PubAck)


class _SubjectsState(msgspec.Struct):
    subjects: dict[str, int] | None = None


class _SubjectsInfo(msgspec.Struct):
    """The part of a ``STREAM.INFO`` answer (with ``subjects_filter``) the snapshot reads."""

    state: _SubjectsState = msgspec.field(default_factory=_SubjectsState)
    error: _ApiError | None = None
    limit: int = 0  # set when the server paged the subjects


_subjects_info = msgspec.json.Decoder(_SubjectsInfo)
#: Up to this many keys matching a wildcard are read one by one, more through a consumer.
_LISTED_MAX = 256
#: One retained value read back: (topic, KV revision, body, headers, deleted).
_Stored = tuple[str, int, bytes, "dict[str, str] | None", bool]
_T = TypeVar("_T")
# JetStream's errors for replicas it cannot place: no suitable peers, insufficient resources,
# replicas > 1 on a server that is not clustered.
_PLACEMENT_ERRORS = frozenset({10005, 10023, 10074})


def _reply_subject(reply_to: str) -> str:
    """The NATS reply subject for a request's portable ``reply_to``, or "" if it cannot be one.

    Sent as the NATS reply subject, it lets the server answer "no responders" (a 503 status
    on that subject) when nothing is subscribed to the request's subject.
    """
    try:
        validate_topic(reply_to)
    except InvalidTopic:
        return ""
    subject = subject_from_topic(reply_to)
    return subject if len(subject.encode()) <= _MAX_SUBJECT_BYTES else ""


def _is_no_responders(data: bytes, headers: dict[str, str]) -> bool:
    """Tell whether a received message is the server's "no responders" status (503, no body)."""
    return not data and headers.get(_STATUS) == "503"


def _split_headers(
    headers: dict[str, str], own_ids: str
) -> tuple[dict[str, str] | None, str | None]:
    """Take the adapter's own headers out of a received message's headers."""
    rev = headers.pop(REVISION_HEADER, None)
    msg_id = headers.get(_MSG_ID)
    if msg_id is not None and msg_id.startswith(own_ids):
        del headers[_MSG_ID]
    return (headers or None), rev


def _stored_headers(headers: dict[str, str] | None) -> dict[str, str] | None:
    """The publisher's headers of a stored KV entry (without what JetStream added)."""
    if not headers:
        return None
    kept = {k: v for k, v in headers.items() if k not in _STORED_HEADERS}
    kept.pop(REVISION_HEADER, None)
    return kept or None


def _ack_reply_fields(reply: str) -> tuple[int, int, int]:
    """(delivered count, stream sequence, pending) from a ``$JS.ACK...`` reply subject."""
    tokens = reply.split(".")
    if len(tokens) == 9:  # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>
        return int(tokens[4]), int(tokens[5]), int(tokens[8])
    # $JS.ACK.<domain>.<account>.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>...
    return int(tokens[6]), int(tokens[7]), int(tokens[10])


def _header_bytes(headers: Mapping[str, str]) -> int:
    return 12 + sum(len(k) + len(v.encode()) + 4 for k, v in headers.items())


class _Out:
    """A message that must reach the server: waiting for a connection, or for its JetStream ack.

    ``confirm``: a JetStream publish, done once the stream acknowledged it; else a core (QoS 0)
    message held while disconnected. ``future`` is the publisher's (the stream sequence, or
    the error); it is None once nobody waits: the publish returned when the message entered
    the offline buffer (``detached``), and a later failure is counted and logged instead.
    ``then``: for the KV write of a retained value, sends its live copy once the revision is
    known, handing ``future`` on to it.
    """

    __slots__ = (
        "attempts", "confirm", "data", "deadline", "detached", "future", "headers", "reply",
        "sent_at", "settled", "subject", "then", "token", "topic",
    )  # fmt: skip

    def __init__(
        self,
        topic: str,
        subject: str,
        data: bytes,
        headers: dict[str, str] | None,
        future: asyncio.Future[int] | None,
        *,
        confirm: bool,
        reply: str = "",
    ) -> None:
        self.topic = topic
        self.subject = subject
        self.data = data
        self.headers = headers
        self.future = future
        self.confirm = confirm
        self.reply = reply  # a held request's NATS reply subject (QoS 0 only)
        self.token = ""
        self.attempts = 0
        self.sent_at = 0.0
        self.deadline = 0.0  # set by its next send: ``qos1_timeout`` from then on
        self.settled = not confirm
        self.detached = False
        self.then: Callable[[_Out, int], None] | None = None


class _Ack:
    """`Message.ack` of a JetStream message: acknowledges it once the handler ran."""

    __slots__ = ("consumer", "reply", "seq")

    def __init__(self, consumer: _Consumer, reply: str, seq: int) -> None:
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
        return transport._writer.publish(self.reply, _ACK)

    async def __call__(self) -> None:
        try:
            pending = self.send()
            if pending is not None:
                await pending
        except nats_errors.Error as exc:  # not acked: JetStream redelivers it (a duplicate)
            log.debug("ack of %s failed: %r", self.reply, exc)


class _Entry(TransportSubscription):
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
        # A leading wildcard must not match $ topics (MQTT) nor NATS's _INBOX replies.
        self.wild = pattern[0] in "+#"
        self.cut = len(transport._opts.qos1_prefix) + 1
        self.own_ids = transport._msg_id_prefix
        self.nsubs: list[NatsSubscription] = []
        self.consumers: list[_Consumer] = []
        # While the retained snapshot is read: (revision or None, message) in arrival order.
        self.buffer: list[tuple[str | None, Message]] | None = None
        # Snapshot revision per topic: live copies of retained publishes at or below it are
        # duplicates of what the snapshot delivered.
        self.seen: dict[str, int] = {}
        self.backlog: deque[Message] = deque()
        self.waiting = False  # a task waits for the sink; new messages go to the backlog
        self.drainer: asyncio.Future[Any] | None = None  # that task
        # Lost the connection: the retained resync after the reconnect is still to be done
        # (``buffer`` holds what arrives meanwhile).
        self.resync = False
        self.closed = False

    def __repr__(self) -> str:
        return f"<NATS subscription {self.pattern!r} natives={list(self.natives)} qos={self.qos}>"

    async def unsubscribe(self) -> None:
        await self.transport._remove(self)

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
            if isinstance(message.ack, _Ack):
                self.transport._ack_soon(message.ack)
            return
        if self.waiting:
            backlog = self.backlog
            if len(backlog) >= _BACKLOG:
                if message.qos == 0:  # QoS 1 is not acked: JetStream delivers it again
                    self.transport.stats.drop(DropReason.OVERFLOW)
                return
            backlog.append(message)
            return
        if not self.sink.deliver(message):
            self._start_drain()

    def _start_drain(self) -> None:
        self.waiting = True
        self.drainer = self.transport._spawn(self._drain(), "flow-control")

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
        self, subject: str, reply: str, data: bytes, headers: dict[str, str] | None
    ) -> None:
        """A core message on the plain subject (published at QoS 0)."""
        if headers and _is_no_responders(data, headers):
            # The server's answer to one of our requests (on its reply subject, delivered to
            # the first of our plain subscriptions that matches it): nobody listens.
            self.transport._no_responders(subject)
            return
        if self.wild and (subject[0] == "$" or subject.startswith(_INBOX)):
            return
        rev = None
        if headers:
            headers, rev = _split_headers(headers, self.own_ids)
        if reply:
            # A plain NATS request: answering env.reply_to (bus.reply) reaches the requester.
            headers = headers or {}
            headers.setdefault("ce-replyto", topic_from_subject(reply))
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
        self, subject: str, reply: str, data: bytes, headers: dict[str, str] | None
    ) -> None:
        """A QoS-1 message seen with core NATS by a QoS-0 subscription."""
        topic = topic_from_subject(subject[self.cut :])
        if self.wild and topic[0] == "$":
            return
        if headers:
            headers, rev = _split_headers(headers, self.own_ids)
            if rev is not None:  # the live copy of a retained publish
                self.feed(Message(topic, data, headers, retain=True), rev)
                return
        self.feed(Message(topic, data, headers), None)


class _Consumer:
    """A durable JetStream push consumer feeding one `_Entry` (QoS 1).

    ``kind``: ``"private"`` (a random name: deleted on unsubscribe and on close, nobody could
    resume it), ``"resumable"`` (named after ``client_id``: deleted on unsubscribe, kept on
    close so that the next bus with that ``client_id`` resumes it) or ``"shared"`` (a queue
    group's: never deleted here; the server drops it ``consumer_inactive`` after its last
    member left).
    """

    __slots__ = ("deliver", "entry", "filter", "kind", "last", "name", "unacked")

    def __init__(
        self, entry: _Entry, name: str, filter_subject: str, deliver: str, kind: str
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

    def route(self, subject: str, reply: str, data: bytes, headers: dict[str, str] | None) -> None:
        if not reply.startswith(_JS_ACK):
            return  # not a stream message (no heartbeats or flow control are configured)
        entry = self.entry
        delivered, seq, _ = _ack_reply_fields(reply)
        if delivered > 1:
            entry.transport.stats.duplicates += 1
        if seq > self.last:
            self.last = seq
        self.unacked[seq] = None
        ack = _Ack(self, reply, seq)
        topic = topic_from_subject(subject[entry.cut :])
        if entry.wild and topic[0] == "$":
            entry.transport._ack_soon(ack)
            return
        if headers:
            headers, rev = _split_headers(headers, entry.own_ids)
            if rev is not None:  # the live copy of a retained publish
                entry.feed(Message(topic, data, headers, qos=1, ack=ack, retain=True), rev)
                return
        entry.feed(Message(topic, data, headers, qos=1, ack=ack), None)


class NatsTransport(NetworkTransport):
    """``nats://[user:pass@|token@]host[:4222][,host2:4222...]`` and ``tls://`` via nats-py.

    Options (URL query or keyword): ``user``/``password``/``token`` (instead of the URL's
    userinfo), ``name`` (connection name), ``ca_file``/``certfile``/``keyfile``/``tls_verify``/
    ``tls_hostname`` (TLS; any of the files, or the ``tls://`` scheme, turns it on),
    ``reconnect`` (true), ``reconnect_min``/``reconnect_max`` (0.05 s / 5 s: the jittered,
    doubling wait between attempts on a server; ``reconnect_wait``, deprecated, sets both),
    ``connect_attempt_timeout`` (2 s), ``ping_interval`` (20 s), ``max_outstanding_pings`` (2),
    ``randomize`` (false: try servers in URL order), ``offline_buffer`` (10,000 messages held
    while disconnected), ``jetstream`` (true; false = core NATS only: QoS 0, no retained),
    ``retain`` (true), ``stream`` (``CASCADE_BUS``), ``qos1_prefix`` (``$CASCADE.Q1``),
    ``stream_max_age`` (3,600 s), ``stream_max_bytes`` (1 GiB), ``stream_retention`` (limits,
    or interest), ``stream_storage`` (file), ``retain_bucket``
    (``cascade_retained``), ``ack_wait`` (30 s before JetStream redelivers an unacked message),
    ``max_ack_pending`` (1,000 per QoS-1 subscription), ``consumer_inactive`` (3,600 s before
    the server removes the consumer of a vanished subscriber), ``ack_timeout`` (5 s per attempt
    to get a publish acknowledged), ``qos1_timeout`` (30 s in all, then `PublishError`),
    ``drain_timeout`` (5 s), ``client_id`` (none: QoS-1 consumers end with the bus; set, they
    are kept on `aclose` and resumed by the next bus with that id), ``replicas`` (auto: 3 in a
    cluster of three or more, else 1; or 1 to 5: copies of the stream and the bucket).
    """

    capabilities: Capabilities = _CAPS
    mapper: ClassVar[TopicMapper] = NatsTopicMapper()
    package: ClassVar[str] = "cascade-bus-nats"

    def __init__(self, url: BusURL, options: Mapping[str, Any]) -> None:
        super().__init__(url, options)
        self._opts = opts = NatsOptions.parse(url, self.options)
        if not opts.jetstream:
            self.capabilities = _CORE_CAPS
        elif not opts.retain:
            self.capabilities = _NO_RETAIN_CAPS
        self._uid = os.urandom(6).hex()
        self._msg_id_prefix = f"cbus:{self._uid}:"
        self._msg_ids = itertools.count(1)
        self._tokens = itertools.count(1)
        self._consumer_ids = itertools.count(1)
        self._nc: NatsClient | None = None
        self._jsm: JetStreamManager | None = None
        self._router: Router | None = None  # None: nats-py's public API (see _fastpath)
        self._writer: Writer | PublicWriter
        self._max_payload = _DEFAULT_MAX_PAYLOAD
        self._pub_prefixes: dict[str, bytes] = {}
        self._closing = False
        self._dead = False  # nats-py gave up reconnecting
        self._offline: deque[_Out] = deque()
        self._inflight: dict[str, _Out] = {}
        self._unsettled = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._ack_prefix = ""
        self._entries: set[_Entry] = set()
        self._kv_prefix = f"$KV.{opts.retain_bucket}."
        self._kv_stream = f"KV_{opts.retain_bucket}"
        self._kv_direct = False
        self._warned_replicas: set[str] = set()
        self._q1_prefix = opts.qos1_prefix + "."
        self._recovery: asyncio.Future[Any] | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._recover_again = False
        self._resync_task: asyncio.Future[Any] | None = None
        self.resync_failures = 0
        """Retained resyncs after a reconnect that failed (logged; live messages went on)."""
        self._backoff = backoff_delays(opts.reconnect_min, opts.reconnect_max)
        self._background: set[asyncio.Future[Any]] = set()
        self._warned_slow = False
        self._js_ready = False

    # -- state ---------------------------------------------------------------------------------

    @property
    def buffered(self) -> int:
        """Messages held for a connection (published while disconnected)."""
        return len(self._offline)

    @property
    def client(self) -> NatsClient | None:
        """The nats-py client (None before `connect` and after `aclose`)."""
        return self._nc

    @property
    def max_payload(self) -> int | None:
        """The server's max_payload (from its INFO), 1 MiB before connecting."""
        return self._max_payload

    async def wait_jetstream(self) -> None:
        """Wait until the stream, bucket and QoS-1 consumers are checked after (re)connecting.

        Bound it with ``asyncio.timeout``.

        Raises:
            BusClosed: the transport was closed.
        """
        while not (self._connected and self._js_ready):
            if self._closed:
                raise BusClosed("the NATS transport is closed")
            await self._state_changed.wait()

    def _spawn(self, coro: Awaitable[Any], name: str) -> asyncio.Future[Any]:
        task: asyncio.Future[Any] = asyncio.ensure_future(coro)
        if isinstance(task, asyncio.Task):
            task.set_name(f"cascade_bus.nats[{self._uid}].{name}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    # -- connecting ----------------------------------------------------------------------------

    async def connect(self) -> None:
        """Connect (trying each server in turn), check JetStream, stream and bucket.

        Raises:
            ConnectError: no server reachable, credentials refused, TLS not offered, or
                JetStream missing (the message names the endpoint, never the password).
        """
        opts = self._opts
        servers = list(opts.servers)
        failures: list[str] = []
        client: NatsClient | None = None
        for attempt in range(len(servers)):
            nc = NatsClient()
            try:
                await nc.connect(
                    servers=servers[attempt:] + servers[:attempt],
                    name=opts.name,
                    user=opts.user,
                    password=opts.password,
                    token=opts.token,
                    tls=opts.tls,
                    tls_hostname=opts.tls_hostname,
                    # Fail fast on the first connection (each server tried twice) ...
                    allow_reconnect=False,
                    max_reconnect_attempts=1,
                    dont_randomize=not opts.randomize,
                    reconnect_time_wait=opts.reconnect_min,  # type: ignore[arg-type]
                    connect_timeout=opts.connect_attempt_timeout,  # type: ignore[arg-type]
                    ping_interval=opts.ping_interval,  # type: ignore[arg-type]
                    max_outstanding_pings=opts.max_outstanding_pings,
                    drain_timeout=opts.drain_timeout,  # type: ignore[arg-type]
                    error_cb=self._on_error,
                    disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected,
                    closed_cb=self._on_closed,
                )
            except Exception as exc:
                failures.append(f"{servers[attempt]}: {self._describe(exc)}")
                # A failed TLS handshake can leave nats-py waiting on a dead socket: be brief.
                await self._close_quietly(nc, 0.25)
                if isinstance(exc, nats_errors.Error) and "uthoriz" in str(exc):
                    break  # the credentials are the same for every server
                continue
            client = nc
            break
        if client is None:
            raise ConnectError(f"could not connect to {self.url.endpoint()}: {'; '.join(failures)}")
        nc = client
        # ... then let nats-py reconnect, for ever.
        nc.options["allow_reconnect"] = opts.reconnect
        nc.options["max_reconnect_attempts"] = -1
        self._reset_backoff(nc)
        self._nc = nc
        if supported(nc):
            self._router, self._writer = Router(nc), Writer(nc)
            install_parser(nc)
        else:
            log.info("nats-py %r internals differ: using its public API (slower)", nc)
            self._router, self._writer = None, PublicWriter(nc)
        self._max_payload = nc.max_payload or _DEFAULT_MAX_PAYLOAD
        try:
            if opts.tls is not None and not nc._server_info.get("tls_required"):
                raise ConnectError(
                    f"{self.url.endpoint()} does not offer TLS; use nats:// for a plain connection"
                )
            ack_inbox = nc.new_inbox()
            self._ack_prefix = ack_inbox + "."
            await self._nsub(ack_inbox + ".*", "", self._route_ack)
            if opts.jetstream:
                self._jsm = JetStreamManager(nc, timeout=opts.ack_timeout)
                await self._ensure_jetstream()
        except BaseException:
            self._nc = None
            await self._close_quietly(nc)
            raise
        self._js_ready = True
        self._set_connected(True)

    def _describe(self, exc: BaseException) -> str:
        text = str(exc) or type(exc).__name__
        if isinstance(exc, nats_errors.Error) and "uthoriz" in text:
            return "the server refused the credentials (authorization violation)"
        if isinstance(exc, asyncio.TimeoutError | TimeoutError):
            return "timed out"
        password = self._opts.password
        token = self._opts.token
        for secret in (password, token):
            if secret:
                text = text.replace(secret, "[secure]")
        return text

    @staticmethod
    async def _close_quietly(nc: NatsClient, timeout: float = 2.0) -> None:
        try:
            async with asyncio.timeout(timeout):
                await nc.close()
        except Exception as exc:
            log.debug("closing a NATS client: %r", exc)

    async def _ensure_jetstream(self, jsm: JetStreamManager | None = None) -> bool:
        """Create the stream and the bucket if missing; True when the stream was (re)created.

        Raises:
            ConnectError: JetStream is not available, or the names clash with other streams.
        """
        try:
            results = await asyncio.gather(
                self._ensure_stream(jsm),
                self._ensure_bucket(jsm) if self._opts.retain else _false(),
            )
        except (js_errors.ServiceUnavailableError, nats_errors.NoRespondersError) as exc:
            raise ConnectError(
                f"JetStream is not enabled on {self.url.endpoint()} (needed for QoS 1 and "
                "retained messages); start nats-server with -js, or use ?jetstream=false for "
                "core NATS only"
            ) from exc
        except js_errors.APIError as exc:
            raise ConnectError(f"JetStream on {self.url.endpoint()} refused: {exc}") from exc
        return bool(results[0])

    def _replicas(self) -> int:
        """The replicas to create the stream and the bucket with (see ``replicas``).

        ``auto``: 3 on a server that is part of a cluster of at least three (its INFO names a
        cluster; ``connect_urls``, when advertised, lists its members), else 1.
        """
        wanted = self._opts.replicas
        if wanted:
            return wanted
        nc = self._nc
        info: dict[str, Any] = getattr(nc, "_server_info", None) or {}
        if not info.get("cluster"):
            return 1
        members = info.get("connect_urls")
        return 1 if isinstance(members, list) and 0 < len(members) < 3 else 3

    async def _create_replicated(
        self, what: str, create: Callable[[int], Awaitable[_T]]
    ) -> tuple[_T, int]:
        """Create a stream with `_replicas` replicas; ``auto`` falls back to 1 if refused.

        Returns what ``create`` returned and the replicas it was given.

        Raises:
            ConnectError: JetStream cannot place an explicit ``replicas`` count.
        """
        replicas = self._replicas()
        try:
            return await create(replicas), replicas
        except js_errors.APIError as exc:
            if replicas == 1 or exc.err_code not in _PLACEMENT_ERRORS:
                raise
            if self._opts.replicas:
                raise ConnectError(
                    f"JetStream on {self.url.endpoint()} cannot create {what} with "
                    f"replicas={replicas}: {exc.description}"
                ) from exc
            log.warning(
                "JetStream on %s cannot place %d replicas of %s (%s); created with 1: it "
                "is lost with the server holding it",
                self.url.endpoint(),
                replicas,
                what,
                exc.description,
            )
        return await create(1), 1

    def _check_replicas(self, what: str, have: int | None) -> int:
        """Warn (once) when an existing stream has fewer replicas than wanted; return its count."""
        have = have or 1
        wanted = self._replicas()
        if have < wanted and what not in self._warned_replicas:
            self._warned_replicas.add(what)
            log.warning(
                "%s on %s has %d replica(s), fewer than the %d wanted (replicas=%s); it is "
                "used as it is (raise it with `nats stream edit --replicas`)",
                what,
                self.url.endpoint(),
                have,
                wanted,
                self._opts.replicas or "auto",
            )
        return have

    async def _ensure_stream(self, jsm: JetStreamManager | None = None) -> bool:
        jsm = jsm or self._jsm
        assert jsm is not None
        opts = self._opts
        wanted = self._q1_prefix + ">"
        what = f"the stream {opts.stream!r}"
        try:
            info = await jsm.stream_info(opts.stream)
        except js_errors.NotFoundError:

            def config(replicas: int) -> js_api.StreamConfig:
                return js_api.StreamConfig(
                    name=opts.stream,
                    description="cascade-bus QoS 1 messages",
                    subjects=[wanted],
                    retention=js_api.RetentionPolicy.INTEREST
                    if opts.stream_retention == "interest"
                    else js_api.RetentionPolicy.LIMITS,
                    max_bytes=opts.stream_max_bytes or None,
                    discard=js_api.DiscardPolicy.OLD,
                    storage=js_api.StorageType.FILE
                    if opts.stream_storage == "file"
                    else js_api.StorageType.MEMORY,
                    max_age=opts.stream_max_age or None,
                    duplicate_window=120.0,
                    num_replicas=replicas,
                )

            try:
                await self._create_replicated(
                    what, lambda replicas: jsm.add_stream(config(replicas))
                )
                return True
            except js_errors.BadRequestError:  # created concurrently by another client
                info = await jsm.stream_info(opts.stream)
        else:
            self._check_replicas(what, info.config.num_replicas)
        if wanted not in (info.config.subjects or []):
            raise ConnectError(
                f"stream {opts.stream!r} on {self.url.endpoint()} does not capture {wanted!r} "
                f"(it has {info.config.subjects}); choose another ?stream= or ?qos1_prefix="
            )
        return False

    async def _ensure_bucket(self, jsm: JetStreamManager | None = None) -> bool:
        jsm = jsm or self._jsm
        assert jsm is not None
        what = f"the bucket {self._opts.retain_bucket!r}"
        try:
            info = await jsm.stream_info(self._kv_stream)
        except js_errors.NotFoundError:
            js = cast(Any, self._nc).jetstream(timeout=self._opts.ack_timeout)
            try:
                kv, replicas = await self._create_replicated(
                    what,
                    lambda replicas: js.create_key_value(
                        bucket=self._opts.retain_bucket,
                        history=1,
                        direct=True,
                        description="cascade-bus retained messages",
                        replicas=replicas,
                    ),
                )
                self._set_kv_reads(bool(kv._direct), replicas)
                return True
            except js_errors.BadRequestError:
                info = await jsm.stream_info(self._kv_stream)
        else:
            self._check_replicas(what, info.config.num_replicas)
        self._set_kv_reads(bool(info.config.allow_direct), info.config.num_replicas or 1)
        return False

    def _set_kv_reads(self, direct: bool, replicas: int) -> None:
        """Read retained values with direct gets only from an unreplicated bucket.

        Every replica answers a direct get, and a follower may not have applied the newest
        write yet; a replicated bucket is read through its leader (``STREAM.MSG.GET``), which
        has every acknowledged write.
        """
        self._kv_direct = direct and replicas == 1

    # -- nats-py callbacks ---------------------------------------------------------------------

    def _reset_backoff(self, nc: NatsClient) -> None:
        """Start the waits between reconnect attempts again at ``reconnect_min``."""
        self._backoff = backoff_delays(self._opts.reconnect_min, self._opts.reconnect_max)
        nc.options["reconnect_time_wait"] = next(self._backoff)

    async def _on_error(self, exc: Exception) -> None:
        nc = self._nc
        if (
            nc is not None
            and (nc.is_reconnecting or nc.is_connecting)
            and not (self._connected or self._closing)
        ):
            # A reconnect attempt failed: nats-py waits ``reconnect_time_wait`` before it
            # tries that server again, so the backoff grows (jittered) up to reconnect_max.
            wait = next(self._backoff)
            nc.options["reconnect_time_wait"] = wait
            log.info(
                "reconnecting to %s failed (%s); next attempt in %.2fs",
                self.url.endpoint(),
                self._describe(exc),
                wait,
            )
            return
        if isinstance(exc, nats_errors.SlowConsumerError):
            self.stats.drop(DropReason.OVERFLOW)
            if not self._warned_slow:
                self._warned_slow = True
                log.warning(
                    "a subscription on %s fell behind and nats-py dropped messages (counted "
                    "in stats().dropped['overflow'])",
                    self.url.endpoint(),
                )
            return
        log.debug("NATS %s: %s", self.url.endpoint(), self._describe(exc))

    async def _on_disconnected(self) -> None:
        if self._closing:
            return
        if self._connected:
            log.warning("lost the connection to %s; reconnecting", self.url.endpoint())
        self._js_ready = False
        self._set_connected(False)
        self._requeue_inflight()
        self._hold_live()

    async def _on_reconnected(self) -> None:
        if self._closing:
            return
        self.stats.reconnects += 1
        nc = self._nc
        if nc is not None:
            self._reset_backoff(nc)
        log.warning("reconnected to %s", self.url.endpoint())
        self._start_recovery()

    async def _on_closed(self) -> None:
        if self._closing:
            return
        self._dead = True
        self._set_connected(False)
        log.error("the connection to %s is closed for good", self.url.endpoint())
        self._fail_waiting(ConnectionLost(f"lost the connection to {self.url.endpoint()}"))

    def _start_recovery(self) -> None:
        if self._recovery is not None and not self._recovery.done():
            self._recover_again = True
            return
        self._recovery = self._spawn(self._recover(), "recovery")

    async def _recover(self) -> None:
        """After a reconnect: resend what is held, go live, then repair JetStream state."""
        while True:
            self._recover_again = False
            nc = self._nc
            if nc is None or self._closing or not nc.is_connected:
                return
            self._max_payload = nc.max_payload or self._max_payload
            if isinstance(self._writer, Writer):
                self._writer.limit = self._max_payload
            await self._resend_offline()
            if nc.is_connected and not self._recover_again:
                self._set_connected(True)
            if self._opts.jetstream and nc.is_connected:
                await self._repair_jetstream()
            else:
                self._js_ready = True
                self._set_connected(self._connected)
            if nc.is_connected and not self._recover_again:
                self._start_resync()
            if not self._recover_again:
                return

    # -- retained resync -------------------------------------------------------------------------

    def _hold_live(self) -> None:
        """The connection is gone: buffer what arrives next until the retained resync is done.

        Cancels a resync still reading the previous connection's snapshot: the next
        reconnect starts it over (a sink never hears `resync_end` for an incomplete replay).
        """
        task = self._resync_task
        if task is not None and not task.done():
            task.cancel()
        if not self._opts.retain:
            return
        for entry in self._entries:
            if entry.queue is None and not entry.closed:
                entry.resync = True
                if entry.buffer is None:
                    entry.buffer = []

    def _start_resync(self) -> None:
        if not any(entry.resync for entry in self._entries):
            return
        task = self._resync_task
        if task is None or task.done():
            self._resync_task = self._spawn(self._resync(), "resync")

    async def _resync(self) -> None:
        """Bring every replaying subscription to the retained state after a reconnect.

        Each gets the bucket's current snapshot for its pattern exactly as `subscribe` hands
        it over (live messages buffered since the connection dropped, then replayed minus the
        copies the snapshot covers), bracketed by ``sink.resync_begin()`` / ``resync_end()``:
        the sink drops the values it already had and reports the topics cleared meanwhile.
        """
        while True:
            entries = [entry for entry in self._entries if entry.resync]
            if not entries:
                return
            await asyncio.gather(*(self._resync_entry(entry) for entry in entries))

    async def _resync_entry(self, entry: _Entry) -> None:
        try:
            snapshot = await self._read_snapshot(entry)
            drainer = entry.drainer
            if drainer is not None and not drainer.done():
                # Messages from before the outage still wait for the sink: they go first.
                await asyncio.shield(drainer)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if entry.closed or not entry.resync:
                return
            entry.resync = False
            self.resync_failures += 1
            log.warning(
                "could not resync the retained messages of %r after reconnecting to %s (%s); "
                "live messages go on, the next reconnect tries again",
                entry.pattern,
                self.url.endpoint(),
                self._describe(exc),
            )
            entry.release()
            return
        if entry.closed or not entry.resync:
            return
        entry.resync = False
        self._hand_over(entry, snapshot, resync=True)

    async def _repair_jetstream(self) -> None:
        """Re-create the stream, bucket and QoS-1 consumers the server lost (bounded retries).

        A restarted server answers nothing while JetStream reloads its store, so the checks
        start with short timeouts; once they pass, QoS-1 messages still waiting for an ack are
        sent again at once (the stream drops copies it already has) instead of after
        ``ack_timeout``: the server may have swallowed them while it was not ready.
        """
        nc = self._nc
        if nc is None:
            return
        started = asyncio.get_running_loop().time()
        timeout = 0.25
        for _ in range(30):
            if self._closing or not nc.is_connected or nc is not self._nc:
                return
            jsm = JetStreamManager(nc, timeout=timeout)
            try:
                fresh = await self._ensure_jetstream(jsm)
                for entry in list(self._entries):
                    for consumer in entry.consumers:
                        await self._ensure_consumer(consumer, fresh, jsm)
            except (ConnectError, nats_errors.Error, TimeoutError) as exc:
                log.info("JetStream on %s not ready yet: %s", self.url.endpoint(), exc)
                await asyncio.sleep(min(timeout, 0.5))  # it may still be loading its store
                timeout = min(timeout * 2, self._opts.ack_timeout)
                continue
            if nc.is_connected:
                self._js_ready = True
                self._set_connected(self._connected)  # wakes wait_jetstream()
                for out in [o for o in self._inflight.values() if o.sent_at < started]:
                    del self._inflight[out.token]
                    self._resend(out)
            return
        log.error("could not restore the JetStream stream/consumers on %s", self.url.endpoint())

    async def _ensure_consumer(
        self, consumer: _Consumer, stream_recreated: bool, jsm: JetStreamManager | None = None
    ) -> None:
        jsm = jsm or self._jsm
        assert jsm is not None
        try:
            await jsm.consumer_info(self._opts.stream, consumer.name)
            return
        except js_errors.NotFoundError:
            pass
        if consumer.entry.closed:
            return
        start = None if stream_recreated else consumer.start_sequence()
        log.warning(
            "QoS-1 consumer %s for %r was gone on %s; re-created%s",
            consumer.name,
            consumer.entry.pattern,
            self.url.endpoint(),
            f" from stream sequence {start}" if start else "",
        )
        await self._create_consumer(
            consumer, start, everything=stream_recreated, queue=consumer.entry.queue, jsm=jsm
        )

    # -- publishing ----------------------------------------------------------------------------

    def _subject(self, topic: str) -> str:
        subject = subject_from_topic(topic)
        if len(subject) * 4 > _MAX_SUBJECT_BYTES and len(subject.encode()) > _MAX_SUBJECT_BYTES:
            raise InvalidTopic(
                f"topic is {len(subject.encode())} bytes as a NATS subject; NATS takes at most "
                f"{_MAX_SUBJECT_BYTES}",
                topic=topic[:80],
            )
        if subject[0] == "$" and (subject + ".").startswith(self._q1_prefix):
            raise InvalidTopic(
                f"topic {topic!r} is under {self._opts.qos1_prefix!r}, reserved for QoS-1 traffic",
                topic=topic,
            )
        return subject

    def _pub_prefix(self, topic: str) -> bytes:
        """``b"PUB <subject> "`` for a topic (checked once, then cached)."""
        prefix = b"PUB " + self._subject(topic).encode() + b" "
        cache = self._pub_prefixes
        if len(cache) >= 4096:
            cache.clear()
        cache[topic] = prefix
        return prefix

    def _check_size(self, topic: str, data: bytes, headers: Mapping[str, str]) -> None:
        size = len(data) + _header_bytes(headers)
        if size > self._max_payload:
            raise self._too_large(topic, size)

    def _too_large(self, topic: str, size: int) -> PayloadTooLarge:
        return PayloadTooLarge(
            f"message for {topic!r} is {size} bytes with its headers; the NATS server accepts "
            f"at most {self._max_payload}",
            size=size,
            limit=self._max_payload,
        )

    async def publish(
        self,
        topic: str,
        data: bytes,
        *,
        qos: int = 0,
        retain: bool = False,
        headers: Mapping[str, str] | None = None,
        reply: str = "",
    ) -> None:
        """Publish; QoS 1 and retained return once JetStream acknowledged the message.

        While disconnected, every publish returns once the message is in the offline buffer;
        QoS-1 and retained ones are sent and confirmed after the reconnect (`flush` waits for
        them; a failure then is counted in ``stats.dropped['publish_failed']`` and logged).
        ``reply`` is a NATS reply subject (requests, see `publish_request`).

        Raises:
            PublishError: the server refused it, it was not acknowledged within
                ``qos1_timeout``, or the offline buffer is full (QoS 1, retained).
            PayloadTooLarge: body and headers exceed the server's max_payload.
            ConnectionLost: the connection is gone for good (reconnect off).
        """
        if qos == 0 and not retain and self._connected:
            if self._router is not None:
                pending = self._publish_fast(topic, data, headers, reply)
                if pending is not None:
                    await pending
                return
            nc = self._nc
            assert nc is not None
            subject = self._subject(topic)
            if headers:
                self._check_size(topic, data, headers)
            try:
                await nc.publish(
                    subject,
                    data,
                    reply=reply,
                    headers=cast(dict[str, str] | None, headers),
                )
                return
            except nats_errors.MaxPayloadError:
                raise PayloadTooLarge(
                    f"message for {topic!r} is {len(data)} bytes; the NATS server accepts at "
                    f"most {nc.max_payload}",
                    size=len(data),
                    limit=nc.max_payload,
                ) from None
            except nats_errors.BadHeaderError as exc:
                raise PublishError(
                    f"publish to {topic!r}: a header name NATS cannot carry: {exc}", topic=topic
                ) from None
            except _GONE:
                pass  # lost it just now: hold the message like any other while disconnected
        await self._publish_slow(topic, data, qos, retain, headers, reply)

    def publish_request(
        self,
        topic: str,
        data: bytes,
        qos: int,
        retain: bool,
        headers: Mapping[str, str] | None,
        *,
        reply_to: str,
    ) -> Awaitable[None] | None:
        """`publish_nowait` for a request: its inbox travels as the NATS reply subject.

        The server then answers "no responders" on it when nobody listens (see
        `on_no_responders`). QoS 1 requests go through JetStream, which has no reply subject.
        """
        reply = _reply_subject(reply_to)
        if qos or retain or not self._connected or self._router is None:
            return self.publish(topic, data, qos=qos, retain=retain, headers=headers, reply=reply)
        return self._publish_fast(topic, data, headers, reply)

    def publish_nowait(
        self,
        topic: str,
        data: bytes,
        qos: int,
        retain: bool,
        headers: Mapping[str, str] | None,
    ) -> Awaitable[None] | None:
        """`publish` without a coroutine for QoS 0 while connected (the bus's fast path).

        Returns an awaitable when the caller must wait (QoS 1, retained, disconnected, or the
        write buffer over ``pending_size``), else None: the message is queued for the socket.
        """
        if qos or retain or not self._connected or self._router is None:
            if qos == 1 and not retain and self._opts.jetstream:
                return self._publish_qos1_nowait(topic, data, headers)
            return self.publish(topic, data, qos=qos, retain=retain, headers=headers)
        return self._publish_fast(topic, data, headers)

    def _publish_qos1_nowait(
        self, topic: str, data: bytes, headers: Mapping[str, str] | None
    ) -> Awaitable[Any] | None:
        """`_js_publish` without a coroutine.

        Returns the future the stream's acknowledgement settles (the bus bounds it by
        ``publish_timeout``), or None when the message went to the offline buffer.

        Raises:
            PublishError: disconnected and the offline buffer is full.
        """
        if self._closed:
            raise BusClosed("the NATS transport is closed")
        extra: dict[str, str] = dict(headers) if headers else {}
        self._check_size(topic, data, {**extra, _MSG_ID: "x" * 40, REVISION_HEADER: "0" * 12})
        extra[_MSG_ID] = self._next_msg_id()
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        out = _Out(topic, self._q1_prefix + self._subject(topic), data, extra, future, confirm=True)
        pending = self._submit(out)
        if out.detached:
            return None  # held for the next connection: accepted
        return future if pending is None else self._written_then(pending, future)

    def _next_msg_id(self) -> str:
        return f"{self._msg_id_prefix}{next(self._msg_ids)}"

    @staticmethod
    async def _written_then(pending: Awaitable[None], future: asyncio.Future[int]) -> None:
        await pending
        await future

    def _publish_fast(
        self, topic: str, data: bytes, headers: Mapping[str, str] | None, reply: str = ""
    ) -> Awaitable[None] | None:
        if len(data) > self._max_payload:
            raise self._too_large(topic, len(data))
        writer = self._writer
        assert isinstance(writer, Writer)
        if not headers and not reply:
            prefix = self._pub_prefixes.get(topic)
            if prefix is None:
                prefix = self._pub_prefix(topic)
            pending = writer.publish_plain(prefix, data)
            return None if pending is None else self._room(pending)
        subject = self._subject(topic)
        try:
            pending = writer.publish(subject, data, headers, reply)
        except TooLarge as exc:
            raise self._too_large(topic, exc.size) from None
        except ValueError as exc:
            raise PublishError(f"publish to {topic!r}: {exc}", topic=topic) from None
        return None if pending is None else self._room(pending)

    async def _room(self, pending: Awaitable[Any]) -> None:
        """Wait (bounded) for nats-py to write its full buffer to the socket."""
        try:
            async with asyncio.timeout(self._opts.ack_timeout):
                await pending
        except TimeoutError:
            log.warning("%s did not take our data for %.1fs", self.url.endpoint(),
                        self._opts.ack_timeout)  # fmt: skip

    async def _publish_slow(
        self,
        topic: str,
        data: bytes,
        qos: int,
        retain: bool,
        headers: Mapping[str, str] | None,
        reply: str = "",
    ) -> None:
        if self._closed:
            raise BusClosed("the NATS transport is closed")
        subject = self._subject(topic)
        extra: dict[str, str] = dict(headers) if headers else {}
        if retain or qos:
            if not self._opts.jetstream:
                raise PublishError(
                    f"QoS 1 and retained messages need JetStream (jetstream=false): {topic!r}",
                    topic=topic,
                )
            self._check_size(topic, data, {**extra, _MSG_ID: "x" * 40, REVISION_HEADER: "0" * 12})
        if retain:
            await self._publish_retained(topic, subject, data, extra, qos)
        elif qos:
            await self._js_publish(topic, self._q1_prefix + subject, data, extra)
        else:
            await self._core_publish(subject, data, extra or None, reply)

    async def _publish_retained(
        self, topic: str, subject: str, data: bytes, headers: dict[str, str], qos: int
    ) -> None:
        """Write the value to the bucket, then (`_send_live`) publish its live copy.

        Returns once both are done, or once the KV write is in the offline buffer.
        """
        stored = dict(headers)
        if not data:
            stored[_KV_OP] = "DEL"
        stored[_MSG_ID] = self._next_msg_id()
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        out = _Out(topic, self._kv_prefix + subject, data, stored, future, confirm=True)
        out.then = functools.partial(self._send_live, subject, data, headers, qos)
        pending = self._submit(out)
        if pending is not None:
            await pending
        try:
            await future
        except PublishError as exc:
            raise PublishError(str(exc), topic=topic, reason=exc.reason) from exc.__cause__

    def _send_live(
        self,
        subject: str,
        data: bytes,
        headers: dict[str, str],
        qos: int,
        written: _Out,
        rev: int,
    ) -> None:
        """A retained value is in the bucket as revision ``rev``: publish its live copy.

        Called when the KV write is acknowledged (`_settle`); the publisher's future, if it
        still waits, goes on to the live copy. Never raises (runs in the receive path).
        """
        live_headers = {**headers, REVISION_HEADER: str(rev)}
        future = written.future
        if qos:
            live_headers[_MSG_ID] = self._next_msg_id()
            out = _Out(
                written.topic, self._q1_prefix + subject, data, live_headers, future, confirm=True
            )
            out.detached = written.detached
            self._unsettled += 1
            self._idle.clear()
            if self._connected:
                pending = self._send(out)
                if pending is not None:
                    self._spawn(pending, "live-copy")
            else:
                self._park(out)  # held beyond offline_buffer: its KV write was accepted
            return
        error: BaseException | None = None
        held = _Out(written.topic, subject, data, live_headers, None, confirm=False)
        if self._connected:
            try:
                pending = self._writer.publish(subject, data, live_headers)
                if pending is not None:
                    self._spawn(self._write_live(pending, held), "live-copy")
            except _GONE:
                self._park(held)
            except (ValueError, nats_errors.Error) as exc:
                error = PublishError(f"publish of the live copy failed: {exc}")
        else:
            self._park(held)
        if future is not None and not future.done():
            if error is None:
                future.set_result(rev)
            else:
                future.set_exception(error)
        elif error is not None and written.detached:
            self._lost(written, error, DropReason.PUBLISH_FAILED)

    async def _write_live(self, pending: Awaitable[Any], held: _Out) -> None:
        """Wait for the write of a retained value's QoS-0 live copy (held again if lost)."""
        try:
            await pending
        except _GONE:
            if not self._closing:
                self._park(held)
        except nats_errors.Error as exc:
            self._lost(held, exc, DropReason.PUBLISH_FAILED)

    async def _core_publish(
        self, subject: str, data: bytes, headers: dict[str, str] | None, reply: str = ""
    ) -> None:
        nc = self._nc
        if self._connected and nc is not None:
            topic = topic_from_subject(subject)
            try:
                pending = self._writer.publish(subject, data, headers, reply)
                if pending is not None:
                    await pending
                return
            except _GONE:
                pass  # lost it just now: hold it like any other message while disconnected
            except (TooLarge, nats_errors.MaxPayloadError):
                raise self._too_large(topic, len(data)) from None
            except (ValueError, nats_errors.Error) as exc:
                raise PublishError(f"publish to {topic!r} failed: {exc}", topic=topic) from None
        held = _Out(topic_from_subject(subject), subject, data, headers, None, confirm=False)
        held.reply = reply
        self._hold(held)

    def _hold(self, out: _Out) -> None:
        """Keep a message until the connection is back (bounded by ``offline_buffer``).

        Raises:
            ConnectionLost: reconnect is off or gave up (the bus counts it).
            PublishError: the buffer is full and the message is QoS 1 or retained (a QoS-0
                message is dropped and counted instead).
        """
        if self._dead or not self._opts.reconnect or self._closed:
            raise ConnectionLost(
                f"not connected to {self.url.endpoint()} and reconnect is off or gave up"
            )
        if len(self._offline) >= self._opts.offline_buffer:
            if not out.confirm:
                self.stats.drop(DropReason.OFFLINE_OVERFLOW)
                return
            raise PublishError(
                f"offline buffer full ({self._opts.offline_buffer} messages) while "
                f"disconnected from {self.url.endpoint()}; message for {out.topic!r} not "
                "accepted",
                topic=out.topic,
                reason=DropReason.OFFLINE_OVERFLOW,
            )
        self._park(out)

    def _park(self, out: _Out, *, front: bool = False) -> None:
        """Keep a message for the next connection; its publisher stops waiting (accepted).

        A JetStream publish is confirmed after the reconnect: `flush` waits for it, and its
        ``qos1_timeout`` counts from its next send.
        """
        if front:
            self._offline.appendleft(out)
        else:
            self._offline.append(out)
        self._idle.clear()
        if out.confirm:
            out.deadline = 0.0
            future = out.future
            if future is not None:
                out.future = None
                out.detached = True
                if not future.done():
                    future.set_result(0)

    def _submit(self, out: _Out) -> Awaitable[None] | None:
        """Send a JetStream publish now, or hold it for the next connection.

        Returns what the caller must await before the write buffer takes more, if anything.

        Raises:
            ConnectionLost: see `_hold`.
            PublishError: see `_hold`.
        """
        self._unsettled += 1
        self._idle.clear()
        if self._connected:
            return self._send(out)
        try:
            self._hold(out)
        except BaseException:
            out.future = None  # nobody reads it: the caller gets the exception
            out.then = None
            self._settle(out)
            raise
        return None

    async def _js_publish(
        self, topic: str, subject: str, data: bytes, headers: dict[str, str]
    ) -> int:
        """Publish to a JetStream subject and wait for the stream's ack; return its sequence.

        The message is sent again (same ``Nats-Msg-Id``) after a lost connection, a missing
        ack (``ack_timeout``) or a temporary refusal, until ``qos1_timeout`` runs out. While
        disconnected it returns (0) once the message is in the offline buffer.
        """
        headers[_MSG_ID] = self._next_msg_id()
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        out = _Out(topic, subject, data, headers, future, confirm=True)
        pending = self._submit(out)
        if pending is not None:
            await pending
        try:
            return await future
        except asyncio.CancelledError:
            if not out.detached:
                self._abandon(out)
            raise
        except PublishError as exc:
            raise PublishError(str(exc), topic=topic, reason=exc.reason) from exc.__cause__

    def _settle(
        self, out: _Out, seq: int = 0, error: BaseException | None = None, *, count: bool = True
    ) -> bool:
        """Finish a JetStream publish once: resolve its future, update the idle state.

        A retained value's KV write goes on to its live copy (``then``). Returns True for a
        failure nobody waits for (the publish returned when the message was buffered); unless
        the caller counts those itself (``count=False``), it is counted and logged here.
        """
        if out.settled:
            return False
        out.settled = True
        self._unsettled -= 1
        then, out.then = out.then, None
        if then is not None and error is None:
            try:
                then(out, seq)
            except Exception as exc:  # never let one message stop the receive path
                log.exception("the live copy of a retained message for %r failed", out.topic)
                error = exc
        lost = False
        if error is not None or then is None:
            future = out.future
            if future is not None:
                if not future.done():
                    if error is None:
                        future.set_result(seq)
                    else:
                        future.set_exception(error)
            elif error is not None and out.detached:
                lost = True
                if count:
                    self._lost(out, error, DropReason.PUBLISH_FAILED)
        self._check_idle()
        return lost

    def _lost(self, out: _Out, error: BaseException, reason: str) -> None:
        """Count and log a message accepted while disconnected that could not be delivered."""
        self.stats.drop(reason)
        log.warning(
            "a message for %r accepted while disconnected from %s was not delivered: %s",
            out.topic,
            self.url.endpoint(),
            error,
        )

    def _check_idle(self) -> None:
        if not self._unsettled and not self._offline:
            self._idle.set()

    def _abandon(self, out: _Out) -> None:
        out.then = None
        self._inflight.pop(out.token, None)
        with contextlib.suppress(ValueError):
            self._offline.remove(out)
        if out.future is not None and not out.future.done():
            out.future.cancel()
        self._settle(out)

    def _send(self, out: _Out) -> Awaitable[None] | None:
        """Send a JetStream publish with a fresh reply token; the sweeper watches for its ack."""
        token = f"{next(self._tokens):x}"
        out.token = token
        out.attempts += 1
        out.sent_at = now = asyncio.get_running_loop().time()
        if not out.deadline:
            out.deadline = now + self._opts.qos1_timeout
        self._inflight[token] = out
        self._arm_sweeper()
        try:
            pending = self._writer.publish(
                out.subject, out.data, out.headers, self._ack_prefix + token
            )
        except _GONE:
            return None  # stays in flight: sent again after the reconnect
        except (nats_errors.Error, ValueError) as exc:
            self._inflight.pop(token, None)
            self._settle(out, error=PublishError(f"publish failed: {exc}"))
            return None
        return None if pending is None else self._sent(pending, out)

    async def _sent(self, pending: Awaitable[Any], out: _Out) -> None:
        try:
            await pending
        except _GONE:
            pass  # stays in flight: sent again after the reconnect
        except nats_errors.Error as exc:
            self._inflight.pop(out.token, None)
            self._settle(out, error=PublishError(f"publish failed: {exc}"))

    def _route_ack(
        self, subject: str, reply: str, data: bytes, headers: dict[str, str] | None
    ) -> None:
        """A JetStream publish acknowledgement (or a no-responders status) on our inbox."""
        out = self._inflight.pop(subject[len(self._ack_prefix) :], None)
        if out is None or out.settled:
            return  # an answer to an earlier attempt, or to an abandoned message
        if headers and headers.get(_STATUS) == "503":
            self._retry(out, "no stream answered (JetStream unavailable or stream missing)")
            self._start_recovery()
            return
        try:
            ack = _pub_ack.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self._settle(out, error=PublishError(f"unreadable acknowledgement: {exc}"))
            return
        error = ack.error
        if error is None:
            self._settle(out, ack.seq)
        elif error.code == 503:
            self._retry(out, error.description)
        else:
            self._settle(
                out,
                error=PublishError(
                    f"{self.url.endpoint()} refused the message: {error.description} "
                    f"(code {error.code}/{error.err_code})"
                ),
            )

    def _arm_sweeper(self) -> None:
        if self._sweeper is None:
            opts = self._opts
            every = max(0.02, min(opts.ack_timeout, opts.qos1_timeout) / 4)
            self._sweeper = asyncio.get_running_loop().call_later(every, self._sweep)

    def _sweep(self) -> None:
        """Resend what waited ``ack_timeout`` for its ack; fail what ran out of time."""
        self._sweeper = None
        now = asyncio.get_running_loop().time()
        ack_timeout = self._opts.ack_timeout
        for token, out in list(self._inflight.items()):
            if out.settled:
                del self._inflight[token]
            elif now >= out.deadline:
                del self._inflight[token]
                self._settle(out, error=self._expired())
            elif now - out.sent_at >= ack_timeout:
                del self._inflight[token]
                self._retry(out, f"no acknowledgement within {ack_timeout}s")
        if self._inflight:
            self._arm_sweeper()

    def _expired(self) -> PublishError:
        return PublishError(
            f"{self.url.endpoint()} did not acknowledge the QoS-1 message within "
            f"{self._opts.qos1_timeout}s"
        )

    def _retry(self, out: _Out, why: str) -> None:
        if out.settled:
            return
        delay = min(0.02 * 2 ** min(out.attempts, 6), 1.0)
        log.debug("resending %s in %.2fs: %s", out.subject, delay, why)
        asyncio.get_running_loop().call_later(delay, self._resend, out)

    def _resend(self, out: _Out) -> None:
        if out.settled or self._closing:
            return
        if self._connected:
            pending = self._send(out)
            if pending is not None:
                self._spawn(pending, "resend")
        else:
            self._park(out, front=True)

    def _requeue_inflight(self) -> None:
        """Put the messages still waiting for an ack in front of the offline buffer.

        Held in a buffer that survives the reconnect, they count as accepted: their
        publishers stop waiting (as for a message published while disconnected).
        """
        if not self._inflight:
            return
        pending = sorted(self._inflight.values(), key=lambda o: int(o.token, 16))
        self._inflight.clear()
        for out in reversed(pending):
            if not out.settled:
                self._park(out, front=True)

    async def _resend_offline(self) -> None:
        nc = self._nc
        while self._offline and nc is not None and nc.is_connected:
            out = self._offline.popleft()
            if out.confirm:
                if not out.settled:
                    pending = self._send(out)
                    if pending is not None:
                        await pending
                continue
            try:
                pending = self._writer.publish(out.subject, out.data, out.headers, out.reply)
                if pending is not None:
                    await pending
            except _GONE:
                self._offline.appendleft(out)
                break
        self._check_idle()

    def _fail_waiting(self, error: BaseException) -> None:
        outs = list(self._inflight.values()) + list(self._offline)
        self._inflight.clear()
        self._offline.clear()
        dropped = lost = 0
        for out in outs:
            if not out.confirm:
                dropped += 1
            else:
                out.then = None
                lost += self._settle(out, error=error, count=False)
        if dropped + lost:
            self.stats.drop(DropReason.DISCONNECTED, dropped + lost)
        if lost:
            log.warning(
                "%d QoS-1 or retained message(s) accepted while disconnected from %s were not "
                "delivered: %s",
                lost,
                self.url.endpoint(),
                error,
            )
        self._check_idle()

    async def flush(self, timeout: float) -> None:
        """Wait until every QoS-1 message is acknowledged and the server has everything else.

        While nats-py reconnects, what was written waits in its buffer for the next server:
        wait for the reconnect, then for a round trip on the new connection (a PING sent on a
        connection that breaks gets no PONG).

        Raises:
            TimeoutError: not done within ``timeout`` seconds.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        async with asyncio.timeout(timeout):
            while True:
                await self._idle.wait()
                nc = self._nc
                if nc is None:
                    return
                changed = self._state_changed
                if not (nc.is_connected and self._connected):
                    if self._closed or self._dead or not self._opts.reconnect:
                        return  # nothing more will reach a server
                    await changed.wait()  # the reconnect callbacks change the state
                    continue
                trip = asyncio.ensure_future(
                    self._round_trip(nc, max(deadline - loop.time(), 0.001))
                )
                # Read below, or by nobody when this flush times out first.
                trip.add_done_callback(_retrieve)
                while not trip.done() and self._connected:
                    lost = asyncio.ensure_future(self._state_changed.wait())
                    try:
                        await asyncio.wait((trip, lost), return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        lost.cancel()
                if not trip.done():
                    # The connection went: its PING gets no PONG. Cancelling is safe only
                    # now (the old connection's reader is gone): a cancelled PONG future
                    # still queued in nats-py would break its next PONG.
                    trip.cancel()
                    continue
                try:
                    trip.result()
                    return
                except _GONE:
                    pass  # the connection went meanwhile: again once it is back

    async def _round_trip(self, nc: NatsClient, timeout: float) -> None:
        """Return once the server has processed everything this connection sent so far.

        nats-py's ``flush()`` writes its PING straight to the socket, ahead of commands still
        in its write buffer, so its PONG alone does not prove they arrived: write the buffer
        first (or, through the public API, let a first PING/PONG push it out), then PING.
        """
        if self._router is not None:
            await nc._flush_pending(force_flush=True)
        else:
            await nc.flush(timeout=timeout)  # type: ignore[arg-type]
        await nc.flush(timeout=timeout)  # type: ignore[arg-type]

    # -- subscribing ---------------------------------------------------------------------------

    async def _wait_up(self) -> NatsClient:
        while not self._connected:
            if self._closed or self._dead:
                raise BusClosed("the NATS transport is closed")
            await self._state_changed.wait()
        nc = self._nc
        assert nc is not None
        return nc

    async def subscribe(
        self,
        pattern: str,
        sink: MessageSink,
        *,
        qos: int = 0,
        queue: str | None = None,
    ) -> TransportSubscription:
        """Subscribe; for a non-queue subscription, hand over the retained snapshot first.

        Raises:
            SubscribeError: the server refused the subject or the consumer.
        """
        if self._closed:
            raise BusClosed("the NATS transport is closed")
        natives = self.mapper.to_native_patterns(pattern)
        for native in natives:
            if len(native.encode()) > _MAX_SUBJECT_BYTES:
                raise SubscribeError(
                    f"pattern {pattern[:80]!r} is too long for a NATS subject", pattern=pattern
                )
        nc = await self._wait_up()
        entry = _Entry(self, pattern, natives, sink, qos, queue)
        replay = self._opts.retain and queue is None
        if replay:
            entry.buffer = []
        nqueue = subject_from_topic(queue) if queue else ""
        try:
            for native in natives:
                entry.nsubs.append(await self._nsub(native, nqueue, entry.route_plain))
                if qos == 0 and self._opts.jetstream:
                    entry.nsubs.append(
                        await self._nsub(self._q1_prefix + native, nqueue, entry.route_prefixed)
                    )
            if qos:
                for native in natives:
                    await self._add_consumer(entry, native, queue)
            if replay:
                await self._replay(entry)
            else:
                await self._round_trip(nc, self._opts.ack_timeout)
        except BaseException as exc:
            await self._remove(entry)
            if isinstance(exc, SubscribeError | BusClosed) or not isinstance(exc, Exception):
                raise
            raise SubscribeError(
                f"subscription to {pattern!r} on {self.url.endpoint()} failed: "
                f"{self._describe(exc)}",
                pattern=pattern,
            ) from exc
        self._entries.add(entry)
        return entry

    async def _nsub(self, subject: str, queue: str, route: Route) -> NatsSubscription:
        """A core subscription whose messages go to ``route`` (through `Router` if we can)."""
        nc = self._nc
        assert nc is not None
        router = self._router
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

    def _unsub_route(self, sub: NatsSubscription) -> None:
        router = self._router
        if router is not None:
            router.routes.pop(sub._id, None)

    def _no_responders(self, subject: str) -> None:
        """The server says our request on ``subject``'s inbox reached nobody: tell the bus."""
        hook = self.on_no_responders
        if hook is not None:
            hook(topic_from_subject(subject))

    def _ack_soon(self, ack: _Ack) -> None:
        """Acknowledge a JetStream message the subscription will not see (a stale copy)."""
        try:
            pending = ack.send()
        except nats_errors.Error as exc:
            log.debug("ack of %s failed: %r", ack.reply, exc)
            return
        if pending is not None:
            self._spawn(pending, "ack")

    def _consumer_names(self, native: str, queue: str | None) -> tuple[str, str, str]:
        """(durable name, deliver subject, kind) of a QoS-1 consumer (see `_Consumer`)."""
        stream = self._opts.stream
        if queue is not None:
            # Every member of the queue group, in any process, must find the same consumer.
            digest = hashlib.sha256(f"{stream}\0{queue}\0{native}".encode()).hexdigest()[:24]
            return f"cbusq_{digest}", f"{_INBOX}cbusq.{digest}", "shared"
        client_id = self._opts.client_id
        if client_id is not None:
            # The next bus with this client_id finds the same consumer and resumes it.
            digest = hashlib.sha256(f"{stream}\0{client_id}\0{native}".encode()).hexdigest()[:24]
            return f"cbusd_{digest}", f"{_INBOX}cbusd.{digest}", "resumable"
        nc = self._nc
        assert nc is not None
        return f"cbus_{self._uid}_{next(self._consumer_ids)}", nc.new_inbox(), "private"

    async def _add_consumer(self, entry: _Entry, native: str, queue: str | None) -> None:
        nc = self._nc
        assert nc is not None
        name, deliver, kind = self._consumer_names(native, queue)
        consumer = _Consumer(entry, name, self._q1_prefix + native, deliver, kind)
        entry.consumers.append(consumer)
        nqueue = subject_from_topic(queue) if queue else ""
        # Interest first, then the consumer: nothing it pushes can miss us.
        entry.nsubs.append(await self._nsub(deliver, nqueue, consumer.route))
        await self._js_retry(
            lambda: self._create_consumer(consumer, None, everything=False, queue=queue)
        )

    async def _js_retry(self, call: Callable[[], Awaitable[_T]]) -> _T:
        """Run a JetStream call, again while JetStream cannot answer for a moment.

        In a cluster, a node that just died takes leaders with it (the meta group's, a
        stream's); until their elections end, API calls time out or answer 503. Retried with
        backoff until ``qos1_timeout`` (the bus's ``subscribe_timeout`` may end it sooner).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._opts.qos1_timeout
        delay = 0.05
        while True:
            try:
                return await call()
            except Exception as exc:
                if self._closed or loop.time() + delay >= deadline or not _transient(exc):
                    raise
                log.info("JetStream on %s busy (%r); trying again", self.url.endpoint(), exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def _create_consumer(
        self,
        consumer: _Consumer,
        start: int | None,
        *,
        everything: bool,
        queue: str | None,
        jsm: JetStreamManager | None = None,
    ) -> None:
        jsm = jsm or self._jsm
        assert jsm is not None
        opts = self._opts
        if everything:
            policy = js_api.DeliverPolicy.ALL
        elif start is not None:
            policy = js_api.DeliverPolicy.BY_START_SEQUENCE
        else:
            policy = js_api.DeliverPolicy.NEW
        config = js_api.ConsumerConfig(
            durable_name=consumer.name,
            deliver_subject=consumer.deliver,
            deliver_group=subject_from_topic(queue) if queue else None,
            filter_subject=consumer.filter,
            deliver_policy=policy,
            opt_start_seq=start if policy is js_api.DeliverPolicy.BY_START_SEQUENCE else None,
            ack_policy=js_api.AckPolicy.EXPLICIT,
            ack_wait=opts.ack_wait,
            max_ack_pending=opts.max_ack_pending,
            inactive_threshold=opts.consumer_inactive or None,
            description=f"cascade-bus QoS 1: {consumer.entry.pattern}"[:200],
        )
        try:
            await jsm.add_consumer(opts.stream, config)
        except js_errors.BadRequestError:
            if consumer.kind == "private":
                raise
            # The group's (or this client_id's) consumer exists with other settings: use it.
            info = await jsm.consumer_info(opts.stream, consumer.name)
            if info.config.deliver_subject != consumer.deliver:
                raise

    async def _replay(self, entry: _Entry) -> None:
        """Deliver the retained snapshot, then the buffered live messages not already in it."""
        self._hand_over(entry, await self._read_snapshot(entry), resync=False)

    async def _read_snapshot(self, entry: _Entry) -> list[list[_Stored]]:
        return await asyncio.gather(
            *(self._js_retry(functools.partial(self._snapshot, native)) for native in entry.natives)
        )

    def _hand_over(self, entry: _Entry, snapshot: list[list[_Stored]], *, resync: bool) -> None:
        """Hand the snapshot to the sink (oldest revision first), then what ``buffer`` holds.

        A buffered live copy at or below the snapshot's revision of its topic is dropped
        (`_Entry.stale`): the snapshot delivered it or a newer value. With ``resync`` the
        snapshot is bracketed by ``resync_begin`` / ``resync_end`` (see `_resync`).
        """
        seen = entry.seen
        values: list[tuple[int, Message]] = []
        for found in snapshot:
            for topic, rev, data, headers, deleted in found:
                if entry.wild and topic[0] == "$":
                    continue
                if rev > seen.get(topic, 0):
                    seen[topic] = rev
                if not deleted and data:
                    values.append((rev, Message(topic, data, headers, retained=True)))
        sink = entry.sink
        if resync:
            sink.resync_begin()
        for _, message in sorted(values, key=lambda item: item[0]):
            sink.deliver(message)
        if resync:
            sink.resync_end()
        entry.release()

    async def _snapshot(self, native: str) -> list[_Stored]:
        """The last KV entry of every key matching ``native``: (topic, revision, data, ...)."""
        key = self._kv_prefix + native
        if not any(token in ("*", ">") for token in native.split(".")):
            return await self._read_key(key)
        listed = await self._snapshot_listed(key)
        if listed is not None:
            return listed
        return await self._snapshot_consumer(key)

    async def _snapshot_listed(self, key_filter: str) -> list[_Stored] | None:
        """The keys matching a wildcard, listed by the bucket's leader, then read one by one.

        Cheaper than a consumer for a few keys, and it needs no consumer created (in a cluster
        that is a proposal to the meta group, whose leader may be re-elected after a node
        failure). None when more than `_LISTED_MAX` keys match: a consumer streams them.
        """
        nc = self._nc
        assert nc is not None
        reply = await nc.request(
            f"$JS.API.STREAM.INFO.{self._kv_stream}",
            msgspec.json.encode({"subjects_filter": key_filter}),
            timeout=self._opts.ack_timeout,
        )
        info = _subjects_info.decode(reply.data)
        error = info.error
        if error is not None:
            raise js_errors.APIError(
                code=error.code, description=error.description, err_code=error.err_code
            )
        subjects = info.state.subjects or {}
        if len(subjects) > _LISTED_MAX or (info.limit and len(subjects) >= info.limit):
            return None
        found = await asyncio.gather(*(self._read_key(subject) for subject in subjects))
        return [entry for entries in found for entry in entries]

    async def _read_key(self, key: str) -> list[_Stored]:
        """The last KV entry of one key (none if it has none).

        A direct get when the bucket is not replicated, else a get through its leader
        (``STREAM.MSG.GET``), which has every acknowledged write (see `_set_kv_reads`).
        """
        topic = topic_from_subject(key[len(self._kv_prefix) :])
        if not self._kv_direct:
            jsm = self._jsm
            assert jsm is not None
            try:
                stored = await jsm.get_msg(self._kv_stream, subject=key)
            except js_errors.NotFoundError:
                return []
            headers = stored.headers or {}
            deleted = headers.get(_KV_OP) in ("DEL", "PURGE")
            data = stored.data or b""
            return [(topic, stored.seq or 0, data, _stored_headers(headers), deleted)]
        nc = self._nc
        assert nc is not None
        reply = await nc.request(
            f"$JS.API.DIRECT.GET.{self._kv_stream}.{key}",
            b"",
            timeout=self._opts.ack_timeout,
        )
        headers = reply.headers or {}
        if headers.get(_STATUS):
            if headers[_STATUS] == "404":
                return []
            raise SubscribeError(
                f"reading the retained message of {topic!r} failed: "
                f"{headers.get('Description', headers[_STATUS])}",
                pattern=topic,
            )
        rev = int(headers.get("Nats-Sequence", "0"))
        deleted = headers.get(_KV_OP) in ("DEL", "PURGE")
        return [(topic, rev, reply.data, _stored_headers(headers), deleted)]

    async def _snapshot_consumer(self, filter_subject: str) -> list[_Stored]:
        nc = self._nc
        jsm = self._jsm
        assert nc is not None
        assert jsm is not None
        cut = len(self._kv_prefix)
        found: list[_Stored] = []
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        expected: list[int] = []

        async def collect(msg: Msg) -> None:
            if not msg.reply.startswith(_JS_ACK):
                return
            _, rev, pending = _ack_reply_fields(msg.reply)
            headers = msg.headers
            deleted = headers is not None and headers.get(_KV_OP) in ("DEL", "PURGE")
            found.append(
                (
                    topic_from_subject(msg.subject[cut:]),
                    rev,
                    msg.data,
                    _stored_headers(headers),
                    deleted,
                )
            )
            if not done.done() and (pending == 0 or (expected and len(found) >= expected[0])):
                done.set_result(None)

        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox, cb=collect)
        name = ""
        try:
            info = await jsm.add_consumer(
                self._kv_stream,
                js_api.ConsumerConfig(
                    deliver_subject=inbox,
                    filter_subject=filter_subject,
                    deliver_policy=js_api.DeliverPolicy.LAST_PER_SUBJECT,
                    ack_policy=js_api.AckPolicy.NONE,
                    mem_storage=True,
                    num_replicas=1,
                    inactive_threshold=30.0,
                ),
            )
            name = info.name or ""
            expected.append(info.num_pending or 0)
            if (not expected[0] or len(found) >= expected[0]) and not done.done():
                done.set_result(None)
            async with asyncio.timeout(self._opts.ack_timeout):
                await done
        finally:
            with contextlib.suppress(nats_errors.Error):
                await sub.unsubscribe()
            if name:
                self._spawn(self._delete_consumer(self._kv_stream, name), "snapshot-cleanup")
        return found

    async def _delete_consumer(self, stream: str, name: str) -> None:
        jsm = self._jsm
        if jsm is None:
            return
        try:
            async with asyncio.timeout(2.0):
                await jsm.delete_consumer(stream, name)
        except (nats_errors.Error, TimeoutError) as exc:
            log.debug("deleting consumer %s/%s: %r", stream, name, exc)

    async def _remove(self, entry: _Entry, *, closing: bool = False) -> None:
        """Unsubscribe; delete the consumers nobody will resume (see `_Consumer`)."""
        if entry.closed:
            return
        entry.closed = True
        entry.buffer = None
        self._entries.discard(entry)
        for sub in entry.nsubs:
            self._unsub_route(sub)
            try:
                await sub.unsubscribe()
            except nats_errors.Error as exc:
                log.debug("unsubscribe %r: %r", entry.pattern, exc)
        nc = self._nc
        if nc is not None and nc.is_connected:
            deletes = [
                self._delete_consumer(self._opts.stream, consumer.name)
                for consumer in entry.consumers
                if consumer.kind == "private" or (consumer.kind == "resumable" and not closing)
            ]
            if deletes:
                await asyncio.gather(*deletes)

    # -- closing -------------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Remove this connection's consumers, drain the connection and close it. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for entry in list(self._entries):
            await self._remove(entry, closing=True)
        tasks = [t for t in self._background if not t.done()]
        for task in (self._recovery, self._resync_task):
            if task is not None and not task.done():
                task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=2.0)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._offline or self._inflight:
            self._fail_waiting(BusClosed("the NATS transport was closed"))
        nc, self._nc = self._nc, None
        if nc is not None:
            if nc.is_connected:
                try:
                    async with asyncio.timeout(self._opts.drain_timeout + 1.0):
                        await nc.drain()
                except Exception as exc:
                    log.debug("draining the NATS connection: %r", exc)
            if not nc.is_closed:
                await self._close_quietly(nc)
        self._set_connected(False)


async def _false() -> bool:
    return False


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Done callback: fetch a task's exception so that nobody reading it is no warning."""
    if not task.cancelled():
        task.exception()
