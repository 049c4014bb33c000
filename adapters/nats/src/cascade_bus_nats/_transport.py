"""The NATS transport: core NATS for QoS 0, JetStream for QoS 1 and retained (a KV bucket).

`NatsTransport` composes the parts (`_connection`, `_routing`, `_jetstream`, `_retained`,
`_outgoing`, `_inflight`, `_publishing`; client internals behind `_fastpath.supported`) and
holds the QoS-0 send hot path, `flush`, `subscribe` and `aclose`. How it all works (subjects,
QoS 1, retained snapshot and resync, reconnect, cluster): docs/transports/nats.md.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Mapping
from types import MappingProxyType
from typing import Any, ClassVar, cast

import nats.errors as nats_errors
from nats.aio.client import Client as NatsClient
from nats.js.manager import JetStreamManager

from cascade_bus import BusClosed, ConnectError, SubscribeError
from cascade_bus.spi import (
    BusURL,
    Capabilities,
    MessageSink,
    NetworkTransport,
    TaskSet,
    TopicMapper,
    TransportSubscription,
    WithId,
)

from ._connection import Connection, close_quietly, open_client, round_trip
from ._errors import GONE, publish_error, subscribe_error, too_large
from ._fastpath import Router, install_parser, supported
from ._inflight import InFlight
from ._jetstream import JetStream
from ._mapper import NatsTopicMapper, subject_from_topic, topic_from_subject
from ._options import CAPABILITIES, NatsOptions, capabilities
from ._outgoing import Outbox
from ._presence import NatsPresence
from ._publishing import Publishing
from ._retained import Retained
from ._routing import Entry, nsub
from ._subjects import Subjects
from ._wire import DEFAULT_MAX_PAYLOAD, MAX_SUBJECT_BYTES, REVISION_HEADER, header_bytes
from ._wire import reply_subject as _reply_subject
from ._writer import PublicWriter, Writer

__all__ = ["REVISION_HEADER", "NatsTransport"]

log = logging.getLogger("cascade_bus.nats")


class NatsTransport(NatsPresence, NetworkTransport):
    """``nats://[user:pass@|token@]host[:4222][,host2:4222...]`` and ``nats+tls://`` via nats-py.

    Options (URL query or keyword; every one is described in docs/transports/nats.md and
    parsed by `NatsOptions`): credentials, TLS files, ``reconnect``/``reconnect_min``/
    ``reconnect_max``, ``offline_buffer``, ``jetstream`` (false = core NATS only), ``retain``,
    the stream and bucket names and limits, consumer settings (``ack_wait``,
    ``max_ack_pending``, ``consumer_inactive``), ``ack_timeout``/``qos1_timeout``,
    ``client_id`` (QoS-1 consumers resumed by the next bus with that id) and ``replicas``.
    """

    capabilities: Capabilities = CAPABILITIES
    mapper: ClassVar[TopicMapper] = NatsTopicMapper()
    #: The server's max_payload (from its INFO), 1 MiB before connecting: a plain attribute,
    #: read by the bus on every publish (no property call).
    max_payload: int = DEFAULT_MAX_PAYLOAD
    package: ClassVar[str] = "cascade-bus-nats"

    def __init__(self, url: BusURL, options: Mapping[str, Any]) -> None:
        super().__init__(url, options)
        self._opts = opts = NatsOptions.parse(url, self.options)
        self.capabilities = capabilities(opts)
        self._uid = os.urandom(6).hex()
        self._nc: NatsClient | None = None
        self._router: Router | None = None  # None: nats-py's public API (see _fastpath)
        self._writer: Writer | PublicWriter
        self.max_payload = DEFAULT_MAX_PAYLOAD
        self._subjects = subjects = Subjects(opts.qos1_prefix)
        self._subject = subjects.subject
        self._pub_prefixes = subjects.prefixes  # the hot path's caches, by topic
        self._hpub_heads = subjects.heads
        self._closing = False
        self._dead = False  # nats-py gave up reconnecting
        self._js_ready = False
        self._entries: set[Entry] = set()
        self._q1_prefix = opts.qos1_prefix + "."
        self.resync_failures = 0
        """Retained resyncs after a reconnect that failed (logged; live messages went on)."""
        # The parts, bound once (no per-message wrappers).
        self._tasks = TaskSet("nats")
        self._conn = Connection(self)
        self._js = JetStream(self, opts)
        self._retained = Retained(self, self._js, opts)
        self._inflight = InFlight(self)
        self._outbox = self._inflight.outbox = Outbox(self, self._inflight)
        self._publishing = Publishing(self, self._outbox)
        self._msg_id_prefix = self._publishing.msg_id_prefix

    @property
    def buffered(self) -> int:
        """Messages held for a connection (published while disconnected)."""
        return len(self._outbox.offline)

    @property
    def client(self) -> NatsClient | None:
        """The nats-py client (None before `connect` and after `aclose`)."""
        return self._nc

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

    async def connect(self) -> None:
        """Connect (trying each server in turn), check JetStream, stream and bucket.

        Raises:
            ConnectError: no server reachable, credentials refused, TLS not offered, or
                JetStream missing (the message names the endpoint, never the password).
        """
        opts = self._opts
        nc = await open_client(opts, self.url.endpoint(), self._conn)
        self._conn.reset_backoff(nc)
        self._nc = nc
        if supported(nc):
            self._router, self._writer = Router(nc), Writer(nc)
            install_parser(nc, self._router.routes)
        else:
            log.info("nats-py %r internals differ: using its public API (slower)", nc)
            self._router, self._writer = None, PublicWriter(nc)
        self.max_payload = nc.max_payload or DEFAULT_MAX_PAYLOAD
        try:
            if opts.tls is not None and not nc._server_info.get("tls_required"):
                raise ConnectError(
                    f"{self.url.endpoint()} does not offer TLS; use nats:// for a plain connection"
                )
            ack_inbox = nc.new_inbox()
            self._inflight.ack_prefix = ack_inbox + "."
            await nsub(nc, self._router, ack_inbox + ".*", "", self._inflight.route_ack)
            if opts.jetstream:
                self._js.jsm = JetStreamManager(nc, timeout=opts.ack_timeout)
                await self._js.ensure()
        except BaseException:
            self._nc = None
            await close_quietly(nc)
            raise
        self._js_ready = True
        self._set_connected(True)

    # -- publishing: the hot path ------------------------------------------------------------

    def _check_size(self, topic: str, data: bytes, headers: Mapping[str, str]) -> None:
        size = len(data) + header_bytes(headers)
        if size > self.max_payload:
            raise too_large(topic, size, self.max_payload)

    async def _publish_slow(
        self,
        topic: str,
        data: bytes,
        qos: int,
        retain: bool,
        headers: Mapping[str, str] | None,
        reply: str,
    ) -> None:
        """`send` off the fast path; QoS 1 and retained return once JetStream acknowledged.

        While disconnected, every publish returns once the message is in the offline buffer;
        QoS-1 and retained ones are sent and confirmed after the reconnect (`flush` waits for
        them; a failure then is counted in ``stats.dropped['publish_failed']`` and logged).
        ``reply`` is a NATS reply subject (requests).

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
                    subject, data, reply=reply, headers=cast(dict[str, str] | None, headers)
                )
                return
            except GONE:
                pass  # lost it just now: hold the message like any other while disconnected
            except (nats_errors.MaxPayloadError, nats_errors.BadHeaderError) as exc:
                raise publish_error(exc, topic, len(data), nc.max_payload) from exc
        await self._publishing.publish(topic, data, qos, retain, headers, reply)

    def send(
        self,
        topic: str,
        data: bytes,
        qos: int,
        retain: bool,
        headers: Mapping[str, str] | None,
        reply_to: str | None = None,
    ) -> Awaitable[None] | None:
        """The hot path: QoS 0 while connected is queued for the socket and returns None.

        Returns an awaitable when the caller must wait (QoS 1, retained, disconnected, or the
        write buffer over ``pending_size``). A request's ``reply_to`` travels as the NATS reply
        subject, so the server answers "no responders" when nobody listens (see
        `on_no_responders`); QoS 1 requests go through JetStream, which has no reply subject.
        """
        writer = self._writer
        if (
            qos or retain or reply_to is not None or not self._connected
            or self._router is None or type(writer) is not Writer
        ):  # fmt: skip
            reply = "" if reply_to is None else _reply_subject(reply_to)
            if qos == 1 and not retain and not reply and self._opts.jetstream:
                return self._publishing.qos1_nowait(topic, data, headers)
            if qos or retain or not self._connected or self._router is None:
                return self._publish_slow(topic, data, qos, retain, headers, reply)
            return self._publish_fast(topic, data, headers, reply)
        # QoS 0 without a reply, connected: framed here and queued, no further call per message.
        if not headers:
            if len(data) > self.max_payload:
                raise too_large(topic, len(data), self.max_payload)
            prefix = self._pub_prefixes.get(topic)
            if prefix is None:
                prefix = self._subjects.pub_prefix(topic)
            pending = writer.queue(prefix + b"%d\r\n" % len(data), data)
        elif type(headers) is MappingProxyType:  # the bus's constant headers: framed once
            head = self._hpub_heads.get(topic)
            if head is None or head[0] is not headers:
                head = self._subjects.head(writer, topic, headers, self.max_payload)
            block = head[2]
            size = len(block) + len(data)
            if size > self.max_payload:
                raise too_large(topic, size, self.max_payload)
            pending = writer.queue(head[1] + b"%d\r\n" % size + block, data)
        else:
            return self._publish_fast(topic, data, headers)
        return None if pending is None else self._room(pending)

    def _publish_fast(
        self, topic: str, data: bytes, headers: Mapping[str, str] | None, reply: str = ""
    ) -> Awaitable[None] | None:
        if len(data) > self.max_payload:
            raise too_large(topic, len(data), self.max_payload)
        writer = self._writer
        assert isinstance(writer, Writer)
        if not headers and not reply:
            prefix = self._pub_prefixes.get(topic)
            if prefix is None:
                prefix = self._subjects.pub_prefix(topic)
            pending = writer.publish_plain(prefix, data)
            return None if pending is None else self._room(pending)
        kind = type(headers)
        if not reply and headers is not None and (kind is MappingProxyType or kind is WithId):
            # The bus's constant headers (and a raw message's id): framed once per topic.
            if kind is WithId:
                fixed, msg_id = cast(WithId, headers).base, cast(WithId, headers).id
            else:
                fixed, msg_id = headers, ""
            head = self._hpub_heads.get(topic)
            if head is None or head[0] is not fixed:
                head = self._subjects.head(writer, topic, fixed, self.max_payload)
            try:
                if msg_id:
                    pending = writer.publish_with_id(head, msg_id, data)
                else:
                    pending = writer.publish_constant(head, data)
            except ValueError as exc:  # TooLarge
                raise publish_error(exc, topic, len(data), self.max_payload) from exc
            return None if pending is None else self._room(pending)
        subject = self._subject(topic)
        try:
            pending = writer.publish(subject, data, headers, reply)
        except ValueError as exc:  # TooLarge, or a header name NATS cannot carry
            raise publish_error(exc, topic, len(data), self.max_payload) from exc
        return None if pending is None else self._room(pending)

    async def _room(self, pending: Awaitable[Any]) -> None:
        """Wait (bounded) for nats-py to write its full buffer to the socket."""
        try:
            async with asyncio.timeout(self._opts.ack_timeout):
                await pending
        except TimeoutError:
            log.warning("%s did not take our data for %.1fs", self.url.endpoint(),
                        self._opts.ack_timeout)  # fmt: skip

    async def flush(self, timeout: float) -> None:
        """Wait until every QoS-1 message is acknowledged and the server has everything else.

        Raises:
            TimeoutError: not done within ``timeout`` seconds.
        """
        await self._outbox.flush(timeout)

    # -- subscribing -------------------------------------------------------------------------

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
            if len(native.encode()) > MAX_SUBJECT_BYTES:
                raise SubscribeError(
                    f"pattern {pattern[:80]!r} is too long for a NATS subject", pattern=pattern
                )
        while not self._connected:
            if self._closed or self._dead:
                raise BusClosed("the NATS transport is closed")
            await self._state_changed.wait()
        nc = self._nc
        assert nc is not None
        entry = Entry(self, pattern, natives, sink, qos, queue)
        replay = self._opts.retain and queue is None
        if replay:
            entry.buffer = []
        nqueue = subject_from_topic(queue) if queue else ""
        router = self._router
        try:
            for native in natives:
                entry.nsubs.append(await nsub(nc, router, native, nqueue, entry.route_plain))
                if qos == 0 and self._opts.jetstream:
                    prefixed = self._q1_prefix + native
                    entry.nsubs.append(
                        await nsub(nc, router, prefixed, nqueue, entry.route_prefixed)
                    )
            if qos:
                for native in natives:
                    await self._js.add_consumer(entry, native, queue)
            if replay:
                await self._retained.replay(entry)
            else:
                await round_trip(nc, router is not None, self._opts.ack_timeout)
        except BaseException as exc:
            await entry.remove()
            if isinstance(exc, SubscribeError | BusClosed) or not isinstance(exc, Exception):
                raise
            opts = self._opts
            raise subscribe_error(
                exc, pattern, self.url.endpoint(), opts.password, opts.token
            ) from exc
        self._entries.add(entry)
        return entry

    def _no_responders(self, subject: str) -> None:
        """The server says our request on ``subject``'s inbox reached nobody: tell the bus."""
        hook = self.on_no_responders
        if hook is not None:
            hook(topic_from_subject(subject))

    async def aclose(self) -> None:
        """Remove this connection's consumers, drain the connection and close it. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._closing = True
        self._inflight.close()
        for entry in list(self._entries):
            await entry.remove(closing=True)
        self._conn.cancel()
        await self._tasks.aclose(timeout=2.0)
        outbox = self._outbox
        if outbox.offline or self._inflight:
            outbox.fail_waiting(BusClosed("the NATS transport was closed"))
        nc, self._nc = self._nc, None
        if nc is not None:
            if nc.is_connected:
                try:
                    async with asyncio.timeout(self._opts.drain_timeout + 1.0):
                        await nc.drain()
                except Exception as exc:
                    log.debug("draining the NATS connection: %r", exc)
            if not nc.is_closed:
                await close_quietly(nc)
        self._set_connected(False)
