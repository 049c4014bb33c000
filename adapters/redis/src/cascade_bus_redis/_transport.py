"""The Redis transport: pub/sub for QoS 0, Streams for QoS 1 and queue groups, a hash for retained.

Connections. Each bus holds one *command* connection (publishes, scripts, acks; pipelined: every
command issued in one event-loop iteration shares one socket write, replies resolve in FIFO order)
and one *pub/sub* connection (SUBSCRIBE/PSUBSCRIBE, parsed straight into the subscriptions'
queues). Each stream subscription (QoS 1, or any queue group) adds one connection for its blocking
XREADGROUP. All speak RESP2 through `RespConnection` (hiredis parser).

Publishing. The publishes of one event-loop iteration (up to a quarter of ``max_inflight``,
``_BATCH_MAX`` messages or ``_BATCH_BYTES``) go as one EVALSHA of the adapter's script (see
``_script.py``), which runs them in order, each atomically: PUBLISH on the channel named exactly
like the topic (plain clients interoperate), the retained hash update when ``retain`` is set,
and an XADD to every registered stream route whose pattern matches the topic (the routes are read
once per call). The reply names the messages that failed, if any. A QoS 0 publish returns once
queued (at most ``max_inflight`` publishes unanswered, so a loop of awaited publishes is
pipelined and batched by itself); a QoS 1 publish returns when Redis replied. Any other command
on the connection first closes the open batch, so commands reach Redis in the order they were
issued. While disconnected, publishes wait in a bounded offline buffer (QoS 0 over the bound:
dropped and counted as ``offline_overflow``; QoS 1: `PublishError`); QoS 1 publishes whose reply
was lost with the connection are sent again (at least once), QoS 0 ones are counted as
``disconnected``.

QoS and queue groups. A QoS 0 subscription is a pub/sub subscription. A QoS 1 subscription
registers a *route* (pattern -> its own stream, lease refreshed by a heartbeat) and reads that
stream with XREADGROUP; the bus acks (XACK, batched) after the handler ran. Because routing
happens inside the publish script, wildcard QoS 1 subscriptions work and a QoS 1 subscriber also
receives QoS 0 publishes (delivered at least once: the subscription's QoS is what counts, as in
MQTT), while a QoS 0 subscriber still sees QoS 1 publishes over pub/sub. A queue group is one
route and stream per (queue, pattern) with consumer group ``cascade_bus``: each message goes to
one member, across processes; QoS 0 members read with NOACK, QoS 1 members ack, and XAUTOCLAIM
hands messages a dead member left pending (idle longer than ``claim_idle``) to a live one. A
member reads only while it holds fewer messages its handler has not finished than its prefetch
limit (``_prefetch.py``: about 50 ms of work at its measured rate, at least ``queue_prefetch``),
so a burst is shared by the members that have time for it instead of taken whole by the first
one to read.
Publishes by plain Redis clients (bare PUBLISH) reach pub/sub subscriptions only.

Retained messages and the subscribe race. ``subscribe()`` must hand over every retained message
matching the pattern, exactly once, and lose no message published meanwhile. The order is:

1. subscribe live first (pub/sub: SUBSCRIBE/PSUBSCRIBE confirmed by a PING on the same connection;
   streams: the route registered) and put everything that arrives into the subscription's
   *window* instead of delivering it;
2. read the snapshot: HGET for an exact topic, HSCAN pages (glob + exact filter) for a pattern,
   each body with its *sequence number*;
3. write a barrier (PUBLISH of a token to this bus's private channel, or XADD of a token to the
   subscription's stream) and wait until it comes back on the live path: from then on every
   message executed before the snapshot's last read is in the window;
4. deliver the snapshot (``retained=True``) except the topics the window holds a retained
   publish for with a sequence number >= the snapshot's (the same message or a newer one, which
   the window delivers live), then the window in arrival order, then switch to live delivery.

Every retained publish (and clear) takes a number from one INCR'd counter in the same script that
stores it. The number reaches live subscribers without changing the body: the script publishes
``r<seq>`` on the control channel just before the message and ``e`` just after it, and since a
script runs atomically those arrive around the message on every pub/sub connection; streams carry
the number as field ``s``. After a reconnect the same procedure resynchronises each pub/sub
subscription, delivering only retained messages that changed (or were cleared) while it was away.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import os
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, ClassVar

from cascade_bus import (
    BusClosed,
    ConnectError,
    ConnectionLost,
    PublishError,
    SubscribeError,
)
from cascade_bus.spi import (
    BusURL,
    Capabilities,
    DropReason,
    Message,
    MessageSink,
    NetworkTransport,
    TransportSubscription,
    backoff_delays,
    topic_matches,
)

from ._inbound import Junk, Tokens, decode_topic, parse_entry, parse_seq
from ._options import RedisOptions
from ._prefetch import Prefetch
from ._resp import ReplyError, RespConnection, RespLost, pack
from ._script import SCRIPT
from ._topics import native_subscriptions, scan_glob

__all__ = ["RedisTransport"]

log = logging.getLogger("cascade_bus.redis")

GROUP = b"cascade_bus"
_SCAN_COUNT = b"1000"
#: Most messages, and body bytes, in one publish script call: bounds how long one call blocks
#: the server (about a microsecond per message) and how much a NOSCRIPT resend holds.
_BATCH_MAX = 512
_BATCH_BYTES = 256 * 1024
_TOPIC_CACHE = 4096
_CONNECT_TIMEOUT = 10.0
_HEX = frozenset(b"0123456789abcdef")


def _bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


class _Out:
    """A publish waiting for its reply, or for a connection (offline buffer)."""

    __slots__ = ("data", "future", "qos", "retain", "topic")

    def __init__(
        self,
        topic: str,
        data: bytes,
        qos: int,
        retain: bool,
        future: asyncio.Future[None] | None,
    ) -> None:
        self.topic = topic
        self.data = data
        self.qos = qos
        self.retain = retain
        self.future = future

    def settle(self, error: BaseException | None = None) -> None:
        fut = self.future
        if fut is not None and not fut.done():
            if error is None:
                fut.set_result(None)
            else:
                fut.set_exception(error)


class _Batch:
    """One publish script call in flight: its messages (packed) and the QoS 1 ones among them."""

    __slots__ = ("body", "n", "outs", "seq")

    def __init__(self, seq: int, n: int, body: bytes, outs: list[tuple[int, _Out]]) -> None:
        self.seq = seq  # issue order (NOSCRIPT resends keep it)
        self.n = n
        self.body = body  # the packed (retain, topic, body) triples
        self.outs = outs  # (1-based index in the batch, publish) of the QoS 1 publishes


class _Item:
    """A message held in a subscription's window (or a retained one from the snapshot)."""

    __slots__ = ("ack", "data", "retained", "seq", "topic")

    def __init__(
        self,
        topic: str,
        data: bytes,
        seq: int | None,
        ack: Callable[[], Awaitable[None]] | None = None,
        retained: bool = False,
    ) -> None:
        self.topic = topic
        self.data = data
        self.seq = seq
        self.ack = ack
        self.retained = retained


class _Stream:
    """The stream side of a QoS 1 or queue subscription: key, consumer and ack bookkeeping."""

    __slots__ = (
        "acking",
        "barriers",
        "conn",
        "consumer",
        "delete_on_close",
        "inflight",
        "key",
        "noack",
        "ns",
        "pattern",
        "prefetch",
        "queue",
        "task",
        "to_ack",
        "topics",
    )

    def __init__(
        self,
        key: bytes,
        consumer: bytes,
        pattern: str,
        queue: str | None,
        noack: bool,
        ns: bytes,
        prefetch: Prefetch | None = None,
    ) -> None:
        self.key = key
        self.ns = ns  # the script namespace the stream's route lives in
        self.consumer = consumer
        self.pattern = pattern
        self.queue = queue
        self.noack = noack
        self.delete_on_close = False
        self.conn: RespConnection | None = None
        self.task: asyncio.Task[None] | None = None
        self.inflight: set[bytes] = set()  # delivered to the sink, not yet acked (handled)
        # A queue member reads only while it holds (`inflight`) fewer than its prefetch limit,
        # so a burst is shared by the members instead of taken by the first that reads.
        self.prefetch = prefetch
        self.acking: set[bytes] = set()  # ack sent (or queued), not yet confirmed
        self.to_ack: list[bytes] = []
        self.barriers: dict[bytes, asyncio.Future[None]] = {}
        self.topics: dict[bytes, str] = {}  # topics of entries checked against the pattern


class _Sub:
    """One transport-level subscription: a pattern, a sink, a window, maybe a stream."""

    __slots__ = ("closed", "pattern", "qos", "queue", "seen", "sink", "stream", "window")

    def __init__(self, pattern: str, sink: MessageSink, qos: int, queue: str | None) -> None:
        self.pattern = pattern
        self.sink = sink
        self.qos = qos
        self.queue = queue
        self.window: deque[_Item] | None = None
        # Retained sequence last delivered per topic (pub/sub subscriptions), for the resync
        # after a reconnect; 0 = cleared.
        self.seen: dict[str, int] = {}
        self.stream: _Stream | None = None
        self.closed = False

    def push(
        self,
        topic: str,
        data: bytes,
        seq: int | None,
        ack: Callable[[], Awaitable[None]] | None = None,
    ) -> bool:
        """Deliver (or hold in the window) one live message; False means the sink is full."""
        window = self.window
        if window is not None:
            window.append(_Item(topic, data, seq, ack))
            return True
        if seq is not None:
            self.seen[topic] = seq if data else 0
        return self.sink.deliver(Message(topic, data, None, qos=self.qos, ack=ack))


class _Native:
    """One SUBSCRIBE or PSUBSCRIBE on the pub/sub connection and the routes it feeds."""

    __slots__ = ("kind", "name", "routes")

    def __init__(self, kind: str, name: bytes) -> None:
        self.kind = kind
        self.name = name
        self.routes: list[tuple[str | None, _Sub]] = []


class _Flow:
    """Flow control of one pub/sub connection: stop parsing while a subscription is full."""

    __slots__ = ("full", "task")

    def __init__(self) -> None:
        self.full: list[MessageSink] = []
        self.task: asyncio.Task[None] | None = None

    def hold(
        self,
        conn: RespConnection,
        sink: MessageSink,
        spawn: Callable[[Awaitable[Any], str], asyncio.Task[Any]],
    ) -> None:
        """Stop parsing ``conn`` until ``sink`` (and every other full one) has room again."""
        conn.hold()
        if sink not in self.full:
            self.full.append(sink)
        if self.task is None or self.task.done():
            self.task = spawn(self._wait_room(conn), "flow-control")

    async def _wait_room(self, conn: RespConnection) -> None:
        # Releasing parses replies already buffered, which may fill a sink again: loop until a
        # release leaves every sink with room (this task is still running, so nobody else
        # would start another).
        while True:
            while self.full:
                await self.full[0].ready()
                self.full.pop(0)
            conn.release()
            if not self.full:
                return


class _Handle(TransportSubscription):
    __slots__ = ("sub", "transport")

    def __init__(self, transport: RedisTransport, sub: _Sub) -> None:
        self.transport = transport
        self.sub = sub

    async def unsubscribe(self) -> None:
        await self.transport._remove(self.sub)


class RedisTransport(NetworkTransport):
    """``redis://[user:pass@]host[:6379][/db]`` and ``rediss://`` (TLS).

    Options (URL query or keyword): ``db`` (or the URL path), ``username``/``password`` (or the
    userinfo; ACL users), ``ca_file``/``certfile``/``keyfile``/``tls_verify`` (rediss),
    ``prefix`` (``cascade_bus:``, for every key and control channel), ``client_id`` (names this
    bus's QoS 1 streams and consumers; given explicitly, its QoS 1 streams outlive ``close()``
    so a restarted process resumes them), ``stream_maxlen`` (100,000, ``MAXLEN ~``),
    ``stream_ttl`` (300 s lease of a stream route), ``claim_idle`` (30 s before XAUTOCLAIM takes
    a dead member's message), ``read_count`` (256 per XREADGROUP), ``queue_prefetch`` (8:
    a queue-group member with slow handlers holds this many unhandled messages at most; raise
    it together with ``max_concurrency``),
    ``reconnect`` (true),
    ``reconnect_min``/``reconnect_max`` (backoff bounds, s), ``offline_buffer`` (10,000),
    ``health_check_interval`` (10 s PING), ``max_payload`` (8 MiB), ``max_inflight`` (1,024 QoS 0
    replies outstanding).
    """

    #: Error codes after which a stream reader reconnects instead of failing (Redis Cluster).
    _RETRY_CODES: ClassVar[frozenset[str]] = frozenset()
    #: Parse the URL for Redis Cluster (several seed hosts, no database number).
    _CLUSTER: ClassVar[bool] = False

    capabilities: Capabilities = Capabilities(
        max_qos=1,
        retain=True,
        retain_emulated=True,
        wildcards=True,
        headers=False,
        queue_groups=True,
        request_reply=True,
        will=False,
        persistence=False,
        ordering=True,
        max_payload=None,
        emulated=frozenset({"retain", "qos1", "queue_groups"}),
    )
    package: ClassVar[str] = "cascade-bus-redis"

    def __init__(self, url: BusURL, options: Mapping[str, Any]) -> None:
        super().__init__(url, options)
        self._opts = o = RedisOptions.parse(url, self.options, cluster=self._CLUSTER)
        self._id = os.urandom(8).hex()
        prefix = o.prefix.encode()
        self._prefix = prefix
        self._ctl = prefix + b"ctl"
        self._barrier_channel = prefix + b"b:" + self._id.encode()
        self._maxlen = str(o.stream_maxlen).encode()
        self._ttl_ms = int(o.stream_ttl * 1000)
        self._sha = b""
        self._script_args = b""  # sha, numkeys, op, namespace, maxlen: packed
        # The open batch: packed (retain, topic, body) triples, their QoS 1 publishes, bytes.
        self._parts: list[bytes] = []
        self._part_outs: list[tuple[int, _Out]] = []
        self._parts_size = 0
        self._batch_seq = itertools.count()
        self._inflight = 0  # publishes in the open batch or unanswered
        self._capacity: asyncio.Future[None] | None = None
        self._noscript: list[_Batch] = []  # refused for NOSCRIPT: sent again once reloaded
        self._noscript_task: asyncio.Task[None] | None = None
        self._topic_heads: dict[str, bytes] = {}
        # A quarter of the in-flight window per call: later calls run while the publisher waits.
        self._batch_max = max(1, min(_BATCH_MAX, o.max_inflight // 4))
        self._channel_topics: dict[bytes, str] = {}
        self._cmd: RespConnection | None = None
        self._pubsub: RespConnection | None = None
        self._lost = asyncio.Event()
        self._closing = False
        self._supervisor: asyncio.Task[None] | None = None
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._offline: deque[_Out] = deque()
        self._subs: set[_Sub] = set()
        self._channels: dict[bytes, _Native] = {}
        self._globs: dict[bytes, _Native] = {}
        self._seq: int | None = None
        self._seq_channel: bytes | None = None  # the channel the marker's message came on
        self._tokens = Tokens()
        self._junk = Junk(self.stats, self.url.endpoint())
        self._barriers: dict[bytes, asyncio.Future[None]] = {}
        self._pongs: dict[bytes, asyncio.Future[None]] = {}
        self._flow = _Flow()
        self._ack_streams: set[_Stream] = set()
        self._ack_handle: asyncio.Handle | None = None
        self._stream_names: dict[str, int] = {}
        self._queue_consumers = itertools.count(1)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._reported_failure = False

    # -- small public helpers (tests, health checks) ---------------------------------------------

    @property
    def client_id(self) -> str:
        """The id naming this bus's QoS 1 streams and stream consumers."""
        return self._opts.client_id

    @property
    def buffered(self) -> int:
        """Messages waiting in the offline buffer for the connection to come back."""
        return len(self._offline)

    @property
    def max_payload(self) -> int | None:
        """Largest body accepted (option ``max_payload``, 8 MiB by default)."""
        return self._opts.max_payload

    def _spawn(self, coro: Awaitable[Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        task.set_name(f"cascade_bus.redis[{self._opts.client_id}].{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- connecting ------------------------------------------------------------------------------

    async def _open(
        self, role: str, *, address: tuple[str, int] | None = None, **callbacks: Any
    ) -> RespConnection:
        """Open one connection (to ``address``, by default the URL's server) and handshake."""
        o = self._opts
        host, port = address or (o.host, o.port)
        where = f"{host}:{port}" if address else self.url.endpoint()
        conn = RespConnection(f"{where} ({role})", **callbacks)
        try:
            await conn.open(
                host,
                port,
                tls=o.tls,
                username=o.username,
                password=o.password,
                db=o.db,
                client_name=f"cascade_bus:{o.client_id}:{role}",
            )
        except ReplyError as exc:
            conn.abort()
            if exc.code in ("WRONGPASS", "NOAUTH", "NOPERM") or "password" in str(exc).lower():
                raise ConnectError(f"{where} refused the credentials: {exc}") from None
            raise ConnectError(f"{where} refused the connection: {exc}") from None
        except (OSError, RespLost) as exc:
            conn.abort()
            raise ConnectError(f"could not connect to {where}: {exc}") from None
        except BaseException:
            conn.abort()
            raise
        return conn

    async def _open_main(self) -> None:
        """Open the command and pub/sub connections, load the script, (re)subscribe."""
        self._lost = lost = asyncio.Event()

        def on_lost(exc: BaseException | None) -> None:
            lost.set()

        cmd = await self._open(
            "commands", on_reply=self._on_reply, on_orphan=self._on_orphan, on_lost=on_lost
        )
        try:
            sha = await cmd.call(b"SCRIPT", b"LOAD", SCRIPT)
            self._set_sha(sha)
            pubsub = await self._open(
                "pubsub", on_push=self._on_push, on_push_error=self._push_failed, on_lost=on_lost
            )
        except ReplyError as exc:
            cmd.abort()
            raise ConnectError(
                f"{self.url.endpoint()} refused the adapter's script: {exc}"
            ) from exc
        except BaseException:
            cmd.abort()
            raise
        self._cmd, self._pubsub = cmd, pubsub
        cmd.before_write = self._seal
        self._seq = self._seq_channel = None
        try:
            commands = [pack(b"SUBSCRIBE", self._ctl, self._barrier_channel)]
            if self._channels:
                commands.append(pack(b"SUBSCRIBE", *self._channels))
            if self._globs:
                commands.append(pack(b"PSUBSCRIBE", *self._globs))
            await self._pubsub_sync(commands)
        except BaseException:
            cmd.abort()
            pubsub.abort()
            raise

    def _set_sha(self, sha: bytes) -> None:
        self._sha = sha
        self._script_args = (
            _bulk(sha) + _bulk(b"0") + _bulk(b"p") + _bulk(self._prefix) + _bulk(self._maxlen)
        )

    async def connect(self) -> None:
        """Connect both connections, load the script and start the supervisor and heartbeat.

        Raises:
            ConnectError: unreachable server, refused credentials or database (no password
                shown).
        """
        await self._open_main()
        self._set_connected(True)
        self._supervisor = self._spawn(self._supervise(), "supervisor")
        self._heartbeat_task = self._spawn(self._heartbeat(), "heartbeat")

    async def _supervise(self) -> None:
        """Wait for a connection to drop, then reconnect, resubscribe, resend and resync."""
        while not self._closing:
            await self._lost.wait()
            if self._closing:
                return
            self._set_connected(False)
            cause = self._abort_connections()
            self._take_inflight()
            self._fail_sync(ConnectionLost(f"lost the connection to {self.url.endpoint()}"))
            if not self._opts.reconnect:
                log.error("lost the connection to %s: %s", self.url.endpoint(), cause)
                self._fail_offline(ConnectionLost(f"lost the connection to {self.url.endpoint()}"))
                return
            log.warning("lost the connection to %s (%s); reconnecting", self.url.endpoint(), cause)
            await self._reconnect()

    def _abort_connections(self) -> BaseException | None:
        """Drop the command and pub/sub connections; return why the first one was lost."""
        cause = None
        for conn in (self._cmd, self._pubsub):
            if conn is not None:
                cause = cause or conn.lost_cause
                conn.abort()
        return cause

    def _take_inflight(self) -> None:
        """Requeue QoS 1 publishes the lost connection never answered; count lost QoS 0 ones."""
        requeue, lost_qos0 = self._unanswered()
        for out in requeue:
            out.settle()  # held in a buffer that survives the reconnect
        if lost_qos0:
            # Their fate is unknown (Redis may have run them): counted, never resent twice.
            self.stats.drop(DropReason.DISCONNECTED, lost_qos0)
        self._offline.extendleft(reversed(requeue))

    def _unanswered(self) -> tuple[list[_Out], int]:
        """Take every publish not answered yet: its QoS 1 ones in order, and how many QoS 0."""
        batches: list[_Batch] = []
        cmd = self._cmd
        if cmd is not None:
            batches += [w for w in cmd.take_waiters() if type(w) is _Batch]
        batches += self._noscript
        batches.sort(key=lambda b: b.seq)
        self._noscript = []
        if self._parts:  # the open batch (never sent)
            batches.append(_Batch(-1, len(self._parts), b"", self._part_outs))
            self._parts, self._part_outs, self._parts_size = [], [], 0
        self._inflight = 0
        self._release_capacity()
        outs = [out for batch in batches for _, out in batch.outs]
        return outs, sum(batch.n for batch in batches) - len(outs)

    def _fail_sync(self, error: BaseException) -> None:
        for table in (self._barriers, self._pongs):
            for fut in table.values():
                if not fut.done():
                    fut.set_exception(error)
                    fut.exception()
            table.clear()
        for sub in self._subs:
            if sub.stream is not None:
                for fut in sub.stream.barriers.values():
                    if not fut.done():
                        fut.set_exception(error)
                        fut.exception()
                sub.stream.barriers.clear()

    def _fail_offline(self, error: BaseException) -> None:
        if self._offline:
            self.stats.drop(DropReason.DISCONNECTED, len(self._offline))
        for out in self._offline:
            out.settle(error)
        self._offline.clear()

    async def _reconnect(self) -> None:
        o = self._opts
        attempt = 0
        for delay in backoff_delays(o.reconnect_min, o.reconnect_max):
            if self._closing:
                return
            attempt += 1
            await asyncio.sleep(delay)
            try:
                async with asyncio.timeout(_CONNECT_TIMEOUT):
                    await self._open_main()
            except (
                ConnectError,
                ConnectionLost,
                RespLost,
                ReplyError,
                OSError,
                TimeoutError,
            ) as exc:
                log.info("reconnect attempt %d to %s failed: %s", attempt, self.url.endpoint(), exc)
                self._abort_connections()
                continue
            if self._lost.is_set():
                self._abort_connections()  # lost again at once: drop this attempt's connections
                continue
            break
        else:  # pragma: no cover - backoff_delays never ends
            return
        self.stats.reconnects += 1
        self._resend_offline()
        self._set_connected(True)
        self._schedule_acks()
        log.warning("reconnected to %s after %d attempt(s)", self.url.endpoint(), attempt)
        try:
            await self._resync()
        except (ConnectionLost, RespLost, ReplyError, TimeoutError) as exc:
            log.info(
                "retained resync after reconnecting to %s failed: %s", self.url.endpoint(), exc
            )

    def _resend_offline(self) -> None:
        while self._offline:
            out = self._offline.popleft()
            self._enqueue(out.topic, out.data, out.retain, out if out.qos else None)

    async def _resync(self) -> None:
        """Re-deliver retained messages that changed while the pub/sub connection was away.

        The pub/sub subscriptions were renewed by `_open_main` before any of them could see a
        message, with their windows open (set here first, before the await points below).
        """
        subs = [s for s in self._subs if s.stream is None and s.queue is None and not s.closed]
        if not subs:
            return
        for sub in subs:
            if sub.window is None:
                sub.window = deque()
        try:
            snapshots = await asyncio.gather(*(self._snapshot(s.pattern) for s in subs))
            await self._barrier()
        except BaseException:
            for sub in subs:
                await self._drain_window(sub, {}, resync=False)
            raise
        for sub, snapshot in zip(subs, snapshots, strict=True):
            await self._drain_window(sub, snapshot, resync=True)

    async def _heartbeat(self) -> None:
        """PING both connections and refresh stream routes; a silent connection is dropped."""
        o = self._opts
        interval = max(0.05, min(o.health_check_interval, o.stream_ttl / 3))
        while not self._closing:
            await asyncio.sleep(interval)
            cmd, pubsub = self._cmd, self._pubsub
            if not self._connected or cmd is None or pubsub is None:
                continue
            try:
                async with asyncio.timeout(max(interval, 2.0)):
                    waits: list[Awaitable[Any]] = [cmd.call(b"PING"), self._ping_pubsub()]
                    for sub in list(self._subs):
                        if sub.stream is not None and not sub.closed:
                            waits.append(self._register(sub.stream))
                    await asyncio.gather(*waits)
            except TimeoutError:
                log.warning("%s did not answer a PING; reconnecting", self.url.endpoint())
                cmd.abort()
                pubsub.abort()
            except (RespLost, ConnectionLost):
                pass
            except ReplyError as exc:
                log.warning("heartbeat on %s failed: %s", self.url.endpoint(), exc)

    async def aclose(self) -> None:
        """Ack what was handled, drop this bus's own QoS 1 streams, disconnect. Idempotent."""
        if self._closed:
            return
        self._closing = True
        self._closed = True
        tasks = [t for t in (self._supervisor, self._heartbeat_task, self._flow.task) if t]
        for sub in list(self._subs):
            sub.closed = True
            if sub.stream is not None and sub.stream.task is not None:
                tasks.append(sub.stream.task)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        cmd = self._cmd
        if cmd is not None and self._connected and not cmd.lost:
            self._flush_acks()
            for sub in list(self._subs):
                stream = sub.stream
                if stream is not None and (stream.delete_on_close or stream.queue is not None):
                    cmd.send(self._script_packed(*self._leave_args(stream)), None)
            try:
                async with asyncio.timeout(2.0):
                    await cmd.call(b"PING")
            except (TimeoutError, RespLost, ReplyError) as exc:
                log.debug("final PING to %s: %r", self.url.endpoint(), exc)
        for sub in list(self._subs):
            if sub.stream is not None and sub.stream.conn is not None:
                sub.stream.conn.abort()
        self._subs.clear()
        for conn in (self._cmd, self._pubsub):
            if conn is not None:
                await conn.aclose()
        self._set_connected(False)
        self._lost.set()
        self._fail_sync(BusClosed("the Redis transport was closed"))
        closed = BusClosed("the Redis transport was closed")
        unanswered, lost_qos0 = self._unanswered()  # normally none: the final PING came back
        if lost_qos0:
            self.stats.drop(DropReason.DISCONNECTED, lost_qos0)
        for out in unanswered:
            out.settle(closed)
        self._fail_offline(closed)
        for task in list(self._tasks):
            task.cancel()

    # -- publishing ------------------------------------------------------------------------------

    def _enqueue(self, topic: str, data: bytes, retain: bool, out: _Out | None) -> None:
        """Add one publish to the open batch (sent at the end of this loop iteration)."""
        parts = self._parts
        if not parts:
            cmd = self._cmd
            if cmd is not None:
                cmd.schedule_flush()
        if out is not None:
            self._part_outs.append((len(parts) + 1, out))
        if retain:
            name = topic.encode()
            head = b"$1\r\n1\r\n$%d\r\n%s\r\n" % (len(name), name)
        else:
            head = self._topic_heads.get(topic)  # type: ignore[assignment]
            if head is None:
                if len(self._topic_heads) >= _TOPIC_CACHE:
                    self._topic_heads.clear()
                name = topic.encode()
                head = self._topic_heads[topic] = b"$1\r\n0\r\n$%d\r\n%s\r\n" % (len(name), name)
        parts.append(b"%s$%d\r\n%s\r\n" % (head, len(data), data))
        self._inflight += 1
        self._parts_size += len(data)
        if self._parts_size >= _BATCH_BYTES or len(parts) >= self._batch_max:
            self._seal()

    def _seal(self) -> None:
        """Send the open batch as one script call (the connection's ``before_write`` hook)."""
        parts = self._parts
        cmd = self._cmd
        if not parts or cmd is None or cmd.lost:
            return  # nothing, or `_take_inflight` takes them with the lost connection
        self._parts, outs, self._part_outs, self._parts_size = [], self._part_outs, [], 0
        batch = _Batch(next(self._batch_seq), len(parts), b"".join(parts), outs)
        if self._noscript:
            self._noscript.append(batch)  # behind the refused ones, to keep the order
            return
        cmd.send(self._batch_command(batch), batch)

    def _batch_command(self, batch: _Batch) -> bytes:
        return b"*%d\r\n$7\r\nEVALSHA\r\n%s%s" % (
            6 + 3 * batch.n,
            self._script_args,
            batch.body,
        )

    async def publish(
        self,
        topic: str,
        data: bytes,
        *,
        qos: int = 0,
        retain: bool = False,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Publish; QoS 1 returns once Redis replied (or the message is in the offline buffer).

        Raises:
            PublishError: Redis refused it (QoS 1), or the offline buffer is full (QoS 1).
            ConnectionLost: disconnected and ``reconnect`` is off.
        """
        if self._closed:
            raise BusClosed("the Redis transport is closed")
        cmd = self._cmd
        if self._connected and cmd is not None:
            if qos:
                fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                self._enqueue(topic, data, retain, _Out(topic, data, qos, retain, fut))
                await fut
                return
            self._enqueue(topic, data, retain, None)
            if self._inflight >= self._opts.max_inflight:
                await self._wait_capacity(cmd)
            if cmd.write_paused:
                await cmd.wait_writable()
            return
        self._buffer(topic, data, qos, retain)

    async def _wait_capacity(self, cmd: RespConnection) -> None:
        """Send now, then wait until at most half of ``max_inflight`` publishes are unanswered."""
        cmd.flush()
        if cmd.lost or self._inflight < self._opts.max_inflight:
            return
        fut = self._capacity
        if fut is None or fut.done():
            fut = self._capacity = asyncio.get_running_loop().create_future()
        await asyncio.shield(fut)

    def _release_capacity(self) -> None:
        fut, self._capacity = self._capacity, None
        if fut is not None and not fut.done():
            fut.set_result(None)

    def _buffer(self, topic: str, data: bytes, qos: int, retain: bool) -> None:
        if not self._opts.reconnect:
            self.stats.drop(DropReason.DISCONNECTED)
            raise ConnectionLost(f"not connected to {self.url.endpoint()} and reconnect is off")
        if len(self._offline) >= self._opts.offline_buffer:
            if qos == 0:
                self.stats.drop(DropReason.OFFLINE_OVERFLOW)
                return
            raise PublishError(
                f"offline buffer full ({self._opts.offline_buffer} messages) while "
                f"disconnected from {self.url.endpoint()}; QoS {qos} message for {topic!r} "
                "not accepted",
                topic=topic,
            )
        self._offline.append(_Out(topic, data, qos, retain, None))

    def _on_reply(self, waiter: Any, reply: Any) -> None:
        """The reply to a publish script call (a `_Batch`): settle its QoS 1 publishes."""
        if type(waiter) is not _Batch:
            return
        self._inflight -= waiter.n
        if self._capacity is not None and self._inflight < self._opts.max_inflight // 2:
            self._release_capacity()
        if type(reply) is int:  # all ran
            for _, out in waiter.outs:
                out.settle()
            return
        if type(reply) is ReplyError:
            if reply.code == "NOSCRIPT":  # none ran: send the batch again once reloaded
                self._inflight += waiter.n
                self._noscript.append(waiter)
                if self._noscript_task is None or self._noscript_task.done():
                    self._noscript_task = self._spawn(self._resend_noscript(), "reload-script")
                return
            failed = dict.fromkeys(range(1, waiter.n + 1), str(reply))
        else:  # [index, error, ...]: those failed, the others ran
            failed = {
                int(i): e.decode("utf-8", "replace")
                for i, e in zip(reply[::2], reply[1::2], strict=True)
            }
        for index, out in waiter.outs:
            text = failed.pop(index, None)
            if text is None:
                out.settle()
                continue
            error = PublishError(
                f"{self.url.endpoint()} refused the message for {out.topic!r}: {text}",
                topic=out.topic,
            )
            if out.future is None or out.future.done():  # resent from the buffer: nobody waits
                self._publish_failed(error)
            out.settle(error)
        for text in failed.values():  # QoS 0 publishes
            self._publish_failed(ReplyError(text))

    def _publish_failed(self, error: BaseException) -> None:
        """Count a publish nobody waits for that Redis refused; log the first one."""
        self.stats.drop(DropReason.PUBLISH_FAILED)
        if not self._reported_failure:
            self._reported_failure = True
            log.warning(
                "%s refused a publish (counted in stats().dropped['publish_failed']; "
                "further failures are not logged): %s",
                self.url.endpoint(),
                error,
            )

    def _on_orphan(self, error: ReplyError) -> None:
        """An error reply to a command nobody awaited (a barrier, a route left on close)."""
        self.stats.drop(DropReason.PUBLISH_FAILED)
        if error.code == "NOSCRIPT":
            self._spawn(self._reload_script(), "reload-script")
        if not self._reported_failure:
            self._reported_failure = True
            log.warning(
                "%s refused a command (counted in stats().dropped['publish_failed']; "
                "further failures are not logged): %s",
                self.url.endpoint(),
                error,
            )

    async def _reload_script(self) -> None:
        cmd = self._cmd
        if cmd is not None and not cmd.lost:
            with_sha = await cmd.call(b"SCRIPT", b"LOAD", SCRIPT)
            self._set_sha(with_sha)

    async def _resend_noscript(self) -> None:
        """Load the script again (SCRIPT FLUSH, a restart), then send the refused batches again.

        Batches sealed meanwhile wait behind them, so the order of publishes holds.
        """
        try:
            await self._reload_script()
        except RespLost:
            return  # `_take_inflight` takes the batches with the lost connection
        except ReplyError as exc:
            batches, self._noscript = self._noscript, []
            for batch in batches:
                self._on_reply(batch, ReplyError(f"loading the script failed: {exc}"))
            return
        cmd = self._cmd
        if cmd is None or cmd.lost:
            return
        self._seal()  # the open batch joins the queue (it is not empty), so the sends below
        # cannot let it through first (`send` seals through `before_write`)
        batches, self._noscript = sorted(self._noscript, key=lambda b: b.seq), []
        for batch in batches:
            cmd.send(self._batch_command(batch), batch)

    def _script_packed(self, op: bytes, *args: bytes) -> bytes:
        return pack(b"EVALSHA", self._sha, b"0", op, self._prefix, *args)

    async def _script(self, op: bytes, *args: bytes, ns: bytes | None = None) -> Any:
        """Run one script operation on the command connection (reloading it once if needed).

        ``ns`` is the script namespace; the standalone server has one, the key prefix.
        """
        for attempt in (1, 2):
            cmd = self._cmd
            if cmd is None or cmd.lost:
                raise ConnectionLost(f"not connected to {self.url.endpoint()}")
            fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            cmd.send(self._script_packed(op, *args), fut)
            try:
                return await fut
            except ReplyError as exc:
                if exc.code != "NOSCRIPT" or attempt == 2:
                    raise
                await self._reload_script()
            except RespLost as exc:
                raise ConnectionLost(str(exc)) from None
        raise AssertionError("unreachable")  # pragma: no cover

    async def flush(self, timeout: float) -> None:
        """Wait until everything published so far was answered by Redis.

        Raises:
            TimeoutError: not done within ``timeout`` seconds.
        """
        async with asyncio.timeout(timeout):
            while not self._closed:
                await self._up.wait()
                cmd = self._cmd
                try:
                    if cmd is None:
                        raise RespLost("no command connection")
                    await cmd.call(b"PING")  # replies come in order: all earlier ones arrived
                except RespLost:
                    # Until the supervisor noticed, `_up` and `_lost` are both set and waiting
                    # on them would not yield: wait for the state change itself.
                    await self.wait_disconnected()
                    continue
                reload = self._noscript_task
                if reload is None or reload.done():
                    return
                await asyncio.wait({reload})  # refused calls go again: PING after them

    # -- pub/sub receiving -----------------------------------------------------------------------

    def _on_push(self, reply: Any) -> None:
        kind = reply[0]
        if kind == b"message":
            channel = reply[1]
            if channel == self._ctl:
                self._on_marker(reply[2])
                return
            if channel == self._barrier_channel:
                self._on_barrier(reply[2])
                return
            native = self._channels.get(channel)
            if native is not None:
                self._dispatch(native, channel, reply[2])
        elif kind == b"pmessage":
            channel = reply[2]
            if channel.startswith(self._prefix):
                return  # the adapter's own control channels
            native = self._globs.get(reply[1])
            if native is not None:
                self._dispatch(native, channel, reply[3])
        elif kind == b"pong":
            fut = self._pongs.pop(reply[1], None)
            if fut is not None and not fut.done():
                fut.set_result(None)

    def _on_marker(self, marker: bytes) -> None:
        """``r<seq>`` before a retained publish's message, ``e`` after it; anything else: junk."""
        if marker == b"e":
            self._seq = None
            return
        seq = parse_seq(marker[1:]) if marker[:1] == b"r" else None
        if seq is None:
            self._junk("the control channel", marker[:64])
        else:
            self._seq, self._seq_channel = seq, None

    def _on_barrier(self, token: bytes) -> None:
        """A token on this bus's barrier channel: ours (maybe late), or junk from a client."""
        fut = self._barriers.pop(token, None)
        if fut is not None:
            if not fut.done():
                fut.set_result(None)
        elif not self._tokens.issued(token):
            self._junk("the barrier channel", token[:64])

    def _push_failed(self, reply: Any, error: Exception) -> None:
        """A pub/sub push that could not be handled: counted, logged, the link stays up."""
        self._junk("a pub/sub message", error)
        log.debug("handling %r failed", reply, exc_info=error)

    def _dispatch(self, native: _Native, channel: bytes, data: bytes) -> None:
        topic = self._channel_topics.get(channel)
        if topic is None:
            topic = decode_topic(channel)
            if topic is None:  # not a topic (bytes that are not UTF-8, or empty): junk
                self._junk("a pattern subscription", channel[:64])
                return
            if len(self._channel_topics) >= _TOPIC_CACHE:
                self._channel_topics.clear()
            self._channel_topics[channel] = topic
        seq = self._seq
        if seq is not None:
            # A script's marker covers the one PUBLISH that follows it: its channel only, so a
            # forged ``r<n>`` (junk) can tag no more than one channel's messages.
            if self._seq_channel is None:
                self._seq_channel = channel
            elif self._seq_channel != channel:
                seq = self._seq = None
        for flt, sub in native.routes:
            if flt is not None and not topic_matches(flt, topic):
                continue
            if not sub.push(topic, data, seq):
                self._hold_for(sub.sink)

    def _hold_for(self, sink: MessageSink) -> None:
        """Flow control: stop parsing pub/sub messages until the full sink has room again."""
        pubsub = self._pubsub
        if pubsub is not None:
            self._flow.hold(pubsub, sink, self._spawn)

    async def _pubsub_sync(self, commands: list[bytes]) -> None:
        """Send (P)SUBSCRIBE commands, then a PING; its PONG proves they all took effect."""
        pubsub = self._pubsub
        if pubsub is None or pubsub.lost:
            raise ConnectionLost(f"not connected to {self.url.endpoint()}")
        token = b"%d" % next(self._tokens)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pongs[token] = fut
        try:
            for command in commands:
                pubsub.send_raw(command)
            pubsub.send_raw(pack(b"PING", token))
            await fut
        except RespLost as exc:
            raise ConnectionLost(str(exc)) from None
        finally:
            self._pongs.pop(token, None)

    async def _ping_pubsub(self) -> None:
        await self._pubsub_sync([])

    async def _barrier(self) -> None:
        """PUBLISH a token to our own channel and wait for it: everything before has arrived."""
        cmd = self._cmd
        if cmd is None or cmd.lost:
            raise ConnectionLost(f"not connected to {self.url.endpoint()}")
        token = b"%d" % next(self._tokens)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._barriers[token] = fut
        try:
            cmd.send(pack(b"PUBLISH", self._barrier_channel, token), None)
            await fut
        finally:
            self._barriers.pop(token, None)

    async def _snapshot(
        self, pattern: str, ns: bytes | None = None
    ) -> dict[str, tuple[int, bytes]]:
        """Read the retained messages matching ``pattern`` (in namespace ``ns``) with sequences.

        A field that is no topic, or a sequence that is no number, was written by some other
        client: counted as junk and skipped. A body without a sequence counts as number 0.
        """
        out: dict[str, tuple[int, bytes]] = {}
        if "+" not in pattern and "#" not in pattern:
            body, seq_b = await self._script(b"g", pattern.encode(), ns=ns)
            if body:
                seq = parse_seq(seq_b) if seq_b else 0
                if seq is None:
                    self._junk("the retained sequences", pattern)
                else:
                    out[pattern] = (seq, body)
            return out
        glob = scan_glob(pattern).encode()
        cursor = b"0"
        while True:
            page = await self._script(b"s", cursor, glob, _SCAN_COUNT, ns=ns)
            cursor = page[0]
            for i in range(1, len(page), 3):
                topic = decode_topic(page[i])
                seq = parse_seq(page[i + 2])
                if topic is None or seq is None:
                    self._junk("the retained hash", page[i][:64])
                elif page[i + 1] and topic_matches(pattern, topic):
                    out[topic] = (seq, page[i + 1])
            if cursor == b"0":
                return out

    async def _drain_window(
        self, sub: _Sub, snapshot: dict[str, tuple[int, bytes]], *, resync: bool
    ) -> None:
        """Deliver the snapshot (minus what the window supersedes), the window, then go live."""
        window = sub.window
        if window is None:
            return
        latest: dict[str, int] = {}
        for item in window:
            if item.seq is not None and item.seq > latest.get(item.topic, -1):
                latest[item.topic] = item.seq
        first: list[_Item] = []
        for topic in sorted(snapshot):
            seq, body = snapshot[topic]
            if latest.get(topic, -1) >= seq:
                continue  # the window holds this very message (or a newer one): delivered live
            if resync and sub.seen.get(topic) == seq:
                continue  # unchanged while we were away
            first.append(_Item(topic, body, seq, retained=True))
        if resync:
            for topic, seen in list(sub.seen.items()):
                if seen and topic not in snapshot and topic not in latest:
                    first.append(_Item(topic, b"", None, retained=True))  # cleared meanwhile
                    sub.seen[topic] = 0
        window.extendleft(reversed(first))
        sink = sub.sink
        while window and not sub.closed:
            item = window.popleft()
            if item.seq is not None:
                sub.seen[item.topic] = item.seq if item.data else 0
            message = Message(
                item.topic, item.data, None, retained=item.retained, qos=sub.qos, ack=item.ack
            )
            if not sink.deliver(message):
                await sink.ready()
        sub.window = None

    # -- subscribing -----------------------------------------------------------------------------

    async def _wait_up(self) -> None:
        if self._closed:
            raise BusClosed("the Redis transport is closed")
        if not self._connected:
            await self._up.wait()
        if self._closed:
            raise BusClosed("the Redis transport is closed")

    async def subscribe(
        self,
        pattern: str,
        sink: MessageSink,
        *,
        qos: int = 0,
        queue: str | None = None,
    ) -> TransportSubscription:
        """Subscribe; retained messages matching are delivered before this returns.

        QoS 0 without a queue: pub/sub. QoS 1, or any queue group: a stream route.

        Raises:
            SubscribeError: Redis refused the subscription.
            ConnectionLost: the connection dropped while subscribing.
        """
        await self._wait_up()
        sub = _Sub(pattern, sink, 1 if qos else 0, queue)
        try:
            if queue is None and not qos:
                await self._subscribe_pubsub(sub)
            else:
                await self._subscribe_stream(sub)
        except ReplyError as exc:
            raise SubscribeError(
                f"{self.url.endpoint()} refused the subscription to {pattern!r}: {exc}",
                pattern=pattern,
            ) from None
        except RespLost as exc:
            raise ConnectionLost(str(exc)) from None
        return _Handle(self, sub)

    async def _subscribe_pubsub(self, sub: _Sub) -> None:
        sub.window = deque()
        commands: list[bytes] = []
        for native_sub in native_subscriptions(sub.pattern):
            name = native_sub.name.encode()
            table = self._channels if native_sub.kind == "s" else self._globs
            native = table.get(name)
            if native is None:
                native = table[name] = _Native(native_sub.kind, name)
                verb = b"SUBSCRIBE" if native_sub.kind == "s" else b"PSUBSCRIBE"
                commands.append(pack(verb, name))
            native.routes.append((native_sub.filter, sub))
        self._subs.add(sub)
        try:
            await self._pubsub_sync(commands)
            snapshot = await self._snapshot(sub.pattern)
            await self._barrier()
        except BaseException:
            await self._remove(sub)
            raise
        await self._drain_window(sub, snapshot, resync=False)

    def _namespace(self, pattern: str) -> bytes:
        """The script namespace of a stream subscription's pattern (standalone: the prefix)."""
        return self._prefix

    def _stream_for(self, sub: _Sub) -> _Stream:
        o = self._opts
        ns = self._namespace(sub.pattern)
        if sub.queue is not None:
            key = ns + f"q:{sub.queue}/{sub.pattern}".encode()
            consumer = f"{o.client_id}:{next(self._queue_consumers)}"
            prefetch = Prefetch(o.queue_prefetch, o.read_count)
            return _Stream(
                key, consumer.encode(), sub.pattern, sub.queue, not sub.qos, ns, prefetch
            )
        # The n-th QoS 1 subscription of this client to a pattern: stable across restarts of
        # a process with a fixed client_id, so it resumes its stream.
        n = self._stream_names.get(sub.pattern, 0)
        self._stream_names[sub.pattern] = n + 1
        key = ns + f"s:{o.client_id}:{n}/{sub.pattern}".encode()
        stream = _Stream(key, b"c", sub.pattern, None, False, ns)
        stream.delete_on_close = not o.client_id_given
        return stream

    def _leave_args(self, stream: _Stream) -> tuple[bytes, ...]:
        """Script arguments that end this bus's part in a stream route.

        A QoS 1 subscription's own stream goes away with it. A queue member deletes its
        consumer (unless messages are still pending with it: XAUTOCLAIM hands those on); the
        last member of a QoS 0 group also drops the group's stream, while a QoS 1 group's stream
        stays (durable work queue) until its lease (``stream_ttl``) runs out.
        """
        if stream.queue is None:
            return (b"u", stream.key, b"1")
        drop = b"1" if stream.noack else b"0"
        return (b"l", stream.key, GROUP, stream.consumer, drop)

    async def _register(self, stream: _Stream) -> None:
        await self._script(
            b"r",
            stream.key,
            GROUP,
            stream.pattern.encode(),
            str(self._ttl_ms).encode(),
            ns=stream.ns,
        )

    async def _call(self, *args: bytes) -> Any:
        """Run one command on the command connection and return its reply.

        Raises:
            ConnectionLost: not connected.
            RespLost: the connection dropped before the reply.
            ReplyError: Redis refused the command.
        """
        cmd = self._cmd
        if cmd is None or cmd.lost:
            raise ConnectionLost(f"not connected to {self.url.endpoint()}")
        return await cmd.call(*args)

    async def _subscribe_stream(self, sub: _Sub) -> None:
        stream = sub.stream = self._stream_for(sub)
        await self._register(stream)
        replay = sub.queue is None
        if replay:
            sub.window = deque()
        self._subs.add(sub)
        ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        stream.task = self._spawn(self._read_stream(sub, stream, ready), "stream-reader")
        snapshot: dict[str, tuple[int, bytes]] = {}
        try:
            await asyncio.shield(ready)
            if replay:
                snapshot = await self._snapshot(sub.pattern)
                token = b"%s:%d" % (self._id.encode(), next(self._tokens))
                fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                stream.barriers[token] = fut
                await self._call(b"XADD", stream.key, b"*", b"b", token)
                await fut
        except BaseException:
            await self._remove(sub)
            raise
        await self._drain_window(sub, snapshot, resync=False)

    # -- stream reading --------------------------------------------------------------------------

    async def _read_stream(self, sub: _Sub, stream: _Stream, ready: asyncio.Future[None]) -> None:
        """The reader task of one stream subscription (own connection, blocking XREADGROUP)."""
        o = self._opts
        claim_every = max(0.05, o.claim_idle / 2)
        block_ms = int(min(5.0, claim_every if stream.queue else 5.0) * 1000)
        delays = None
        count = str(o.read_count).encode()
        loop = asyncio.get_running_loop()
        next_claim = loop.time() + claim_every
        command: list[bytes | str | int] = [
            b"XREADGROUP", b"GROUP", GROUP, stream.consumer, b"COUNT", count, b"BLOCK", block_ms,
        ]  # fmt: skip
        if stream.noack:
            command.append(b"NOACK")
        command += [b"STREAMS", stream.key, b">"]
        try:
            while not sub.closed:
                conn = stream.conn
                try:
                    if conn is None or conn.lost:
                        await self._wait_up()
                        conn = stream.conn = await self._open_stream(stream)
                        await self._read_pending(sub, stream, conn, count)
                        delays = None
                    if not ready.done():
                        ready.set_result(None)
                    if stream.prefetch is not None:
                        room = stream.prefetch.room_for(len(stream.inflight))
                        if room <= 0:
                            await stream.prefetch.wait()
                            continue
                        command[5] = count = b"%d" % room
                    if stream.queue and not stream.noack and loop.time() >= next_claim:
                        next_claim = loop.time() + claim_every
                        await self._claim(sub, stream, conn, count)
                        continue  # the claimed ones took room: count it again
                    try:
                        async with asyncio.timeout(block_ms / 1000 + 10.0):
                            reply = await conn.call(*command)
                    except TimeoutError:
                        log.warning("%s: XREADGROUP got no answer; reconnecting", conn.name)
                        conn.abort()
                        continue
                    if reply:
                        await self._deliver_entries(sub, stream, reply[0][1], redelivered=False)
                except (ConnectError, RespLost, ConnectionLost) as exc:
                    if isinstance(exc, ConnectError) and not ready.done():
                        ready.set_exception(exc)
                        return
                    if sub.closed or self._closing:
                        return
                    if stream.conn is not None:
                        stream.conn.abort()
                    stream.conn = None
                    delays = delays or backoff_delays(o.reconnect_min, o.reconnect_max)
                    await asyncio.sleep(next(delays))
                except ReplyError as exc:
                    if exc.code in self._RETRY_CODES:
                        # Redis Cluster: the slot moved or the cluster is (re)configuring.
                        log.info("%s: %s; reconnecting the stream", stream.key.decode(), exc)
                        if stream.conn is not None:
                            stream.conn.abort()
                        stream.conn = None
                        await self._on_redirect(exc)
                        delays = delays or backoff_delays(o.reconnect_min, o.reconnect_max)
                        await asyncio.sleep(next(delays))
                        continue
                    if exc.code != "NOGROUP":
                        if not ready.done():
                            ready.set_exception(exc)
                            return
                        raise
                    # The stream (or its group) vanished: a server without persistence
                    # restarted, or the lease ran out. Register again and read on.
                    log.info("%s: %s; registering the stream again", stream.key.decode(), exc)
                    try:
                        await self._register(stream)
                    except (ConnectionLost, ReplyError) as again:
                        log.warning("re-registering %r failed: %s", stream.key, again)
                        delays = delays or backoff_delays(o.reconnect_min, o.reconnect_max)
                        await asyncio.sleep(next(delays))
        except ReplyError as exc:
            log.error("reading %s failed: %s", stream.key.decode(), exc)
        finally:
            if sub.closed and stream.conn is not None:
                stream.conn.abort()

    async def _open_stream(self, stream: _Stream) -> RespConnection:
        """Open the connection a stream subscription reads on (standalone: the server)."""
        return await self._open("stream")

    async def _on_redirect(self, error: ReplyError) -> None:
        """A stream command was redirected (Redis Cluster: MOVED, ASK...); standalone: never."""

    async def _read_pending(
        self, sub: _Sub, stream: _Stream, conn: RespConnection, count: bytes
    ) -> None:
        """After (re)connecting: deliver what this consumer was given but never acked."""
        if stream.noack:
            return
        start = b"0"
        while not sub.closed:
            reply = await conn.call(
                b"XREADGROUP", b"GROUP", GROUP, stream.consumer, b"COUNT", count,
                b"STREAMS", stream.key, start,
            )  # fmt: skip
            entries = reply[0][1] if reply else []
            if not entries:
                return
            await self._deliver_entries(sub, stream, entries, redelivered=True)
            start = entries[-1][0]

    async def _claim(self, sub: _Sub, stream: _Stream, conn: RespConnection, count: bytes) -> None:
        """XAUTOCLAIM what other (dead) members left pending longer than ``claim_idle``."""
        idle = str(int(self._opts.claim_idle * 1000)).encode()
        reply = await conn.call(
            b"XAUTOCLAIM", stream.key, GROUP, stream.consumer, idle, b"0-0", b"COUNT", count
        )
        entries = [e for e in reply[1] if e is not None]
        if entries:
            log.info("%s: claimed %d pending message(s)", stream.key.decode(), len(entries))
            await self._deliver_entries(sub, stream, entries, redelivered=True)

    async def _deliver_entries(
        self, sub: _Sub, stream: _Stream, entries: list[Any], *, redelivered: bool
    ) -> None:
        noack = stream.noack
        for entry_id, fields in entries:
            if fields is None:  # trimmed away while pending: nothing to deliver
                if not noack:
                    self._queue_ack(stream, entry_id)
                continue
            if redelivered and (entry_id in stream.inflight or entry_id in stream.acking):
                continue  # still with the handler (or its ack is on the way)
            if fields[0] == b"b" and len(fields) == 2:
                self._stream_barrier(stream, fields[1])
                if not noack:
                    self._queue_ack(stream, entry_id)
                continue
            if len(stream.topics) >= _TOPIC_CACHE:
                stream.topics.clear()
            parsed = parse_entry(fields, stream.pattern, stream.topics)
            if parsed is None:  # written by another client: one counted drop
                self._junk(f"stream {stream.key.decode('utf-8', 'replace')}", entry_id)
                if not noack:
                    self._queue_ack(stream, entry_id)
                continue
            topic, data, seq = parsed
            if redelivered:
                self.stats.duplicates += 1
            ack = None
            if stream.prefetch is not None:
                if not stream.inflight:
                    stream.prefetch.started()
                ack = functools.partial(self._ack if not noack else self._done, stream, entry_id)
                stream.inflight.add(entry_id)
            elif not noack:
                stream.inflight.add(entry_id)
                ack = functools.partial(self._ack, stream, entry_id)
            if not sub.push(topic, data, seq, ack):
                await sub.sink.ready()

    def _stream_barrier(self, stream: _Stream, token: bytes) -> None:
        """A barrier entry: this subscriber's own (maybe late), or junk from another client.

        A token of the adapter's shape from another bus is a stale one (a process with the
        same ``client_id`` that stopped before reading it back): ignored, not counted.
        """
        fut = stream.barriers.pop(token, None)
        if fut is not None:
            if not fut.done():
                fut.set_result(None)
            return
        bus, _, number = token.partition(b":")
        if len(bus) != 16 or not _HEX.issuperset(bus) or parse_seq(number) is None:
            self._junk(f"stream {stream.key.decode('utf-8', 'replace')}", token[:64])

    async def _ack(self, stream: _Stream, entry_id: bytes) -> None:
        """Message.ack: queue an XACK (sent batched with every other ack of this iteration)."""
        self._queue_ack(stream, entry_id)

    async def _done(self, stream: _Stream, entry_id: bytes) -> None:
        """Message.ack of a QoS 0 queue member (NOACK, nothing to send): the handler is done."""
        inflight = stream.inflight
        if entry_id in inflight and stream.prefetch is not None:
            inflight.discard(entry_id)
            stream.prefetch.finished(len(inflight))

    def _queue_ack(self, stream: _Stream, entry_id: bytes) -> None:
        inflight = stream.inflight
        if stream.prefetch is not None and entry_id in inflight:
            inflight.discard(entry_id)
            stream.prefetch.finished(len(inflight))
        else:
            inflight.discard(entry_id)
        stream.acking.add(entry_id)
        stream.to_ack.append(entry_id)
        self._ack_streams.add(stream)
        self._schedule_acks()

    def _schedule_acks(self) -> None:
        if self._ack_handle is None and self._ack_streams:
            self._ack_handle = asyncio.get_running_loop().call_soon(self._flush_acks)

    def _flush_acks(self) -> None:
        self._ack_handle = None
        cmd = self._cmd
        if cmd is None or cmd.lost or not self._connected:
            return  # sent after the reconnect (`_reconnect` schedules them)
        streams, self._ack_streams = self._ack_streams, set()
        for stream in streams:
            ids, stream.to_ack = stream.to_ack, []
            if not ids:
                continue
            fut = cmd.call(b"XACK", stream.key, GROUP, *ids)
            fut.add_done_callback(functools.partial(self._acked, stream, ids))

    def _acked(self, stream: _Stream, ids: list[bytes], fut: asyncio.Future[Any]) -> None:
        if fut.cancelled() or fut.exception() is None:
            stream.acking.difference_update(ids)
            return
        if isinstance(fut.exception(), RespLost):
            stream.to_ack.extend(ids)  # again after the reconnect
            self._ack_streams.add(stream)
        else:
            stream.acking.difference_update(ids)
            log.warning("XACK on %s failed: %s", stream.key.decode(), fut.exception())

    # -- unsubscribing ---------------------------------------------------------------------------

    async def _remove(self, sub: _Sub) -> None:
        if sub.closed and sub not in self._subs:
            return
        sub.closed = True
        self._subs.discard(sub)
        if sub.window is not None:
            sub.window.clear()
        stream = sub.stream
        if stream is not None:
            task = stream.task
            if task is not None and task is not asyncio.current_task() and not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            if stream.conn is not None:
                stream.conn.abort()
            if self._connected:
                try:
                    self._flush_acks()
                    await self._script(*self._leave_args(stream), ns=stream.ns)
                except (ConnectionLost, ReplyError) as exc:
                    log.debug("removing the route %r: %r", stream.key, exc)
            return
        await self._remove_pubsub(sub)

    async def _remove_pubsub(self, sub: _Sub) -> None:
        """Drop a pub/sub subscription's share of its native subscriptions."""
        unsubscribe: dict[bytes, list[bytes]] = {b"UNSUBSCRIBE": [], b"PUNSUBSCRIBE": []}
        for native_sub in native_subscriptions(sub.pattern):
            name = native_sub.name.encode()
            table = self._channels if native_sub.kind == "s" else self._globs
            native = table.get(name)
            if native is None:
                continue
            native.routes = [(f, s) for f, s in native.routes if s is not sub]
            if not native.routes:
                del table[name]
                verb = b"UNSUBSCRIBE" if native_sub.kind == "s" else b"PUNSUBSCRIBE"
                unsubscribe[verb].append(name)
        pubsub = self._pubsub
        if pubsub is not None and not pubsub.lost:
            for verb, names in unsubscribe.items():
                if names:
                    pubsub.send_raw(pack(verb, *names))
