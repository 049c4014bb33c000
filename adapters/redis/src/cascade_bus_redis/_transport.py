"""The Redis transport: pub/sub for QoS 0, Streams for QoS 1 and queue groups, a hash for retained.

One pipelined command connection (publishes batched into EVALSHA calls of ``_script.py``), one
pub/sub connection, one connection per stream reader; retained messages handed over race-free
(window, snapshot, barrier) and resynced after a reconnect. Layers: ``_connection`` ->
``_publishing`` -> ``_retained`` -> ``_pubsub`` -> ``_acks`` -> ``_streams`` -> this module
(connect, the `Supervisor`'s steps, heartbeat, close, the send hot path); ``_errors``
translates. How and why: docs/transports/redis.md ("How it works", "Retained messages").
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Mapping
from typing import Any, ClassVar

from cascade_bus import BusClosed, ConnectionLost
from cascade_bus.spi import (
    BusURL,
    Capabilities,
    DropReason,
    MessageSink,
    Supervisor,
    TransportSubscription,
)

from . import _errors as errors
from ._connection import log
from ._publishing import _Out
from ._resp import ReplyError, RespLost
from ._retained import _Sub
from ._script import SCRIPT
from ._streams import Streams

__all__ = ["RedisTransport"]

_CONNECT_TIMEOUT = 10.0


class _Handle(TransportSubscription):
    __slots__ = ("sub", "transport")

    def __init__(self, transport: RedisTransport, sub: _Sub) -> None:
        self.transport = transport
        self.sub = sub

    async def unsubscribe(self) -> None:
        await self.transport._remove(self.sub)


class RedisTransport(Streams):
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
        self._supervisor = Supervisor(self, self, self._opts.net)

    # -- connecting ------------------------------------------------------------------------------

    async def _open_main(self) -> None:
        """Open the command and pub/sub connections, load the script, (re)subscribe."""
        self._lost = lost = asyncio.Event()

        def on_lost(exc: BaseException | None) -> None:
            lost.set()
            if lost is self._lost:  # not an older pair's late callback
                # A resync waiting on a barrier of this pair would otherwise wait for ever
                # (the supervisor fails them only once it runs again).
                self._fail_sync(ConnectionLost(f"lost the connection to {self.url.endpoint()}"))

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
            raise errors.script_refused(self.url.endpoint(), exc) from exc
        except BaseException:
            cmd.abort()
            raise
        self._cmd, self._pubsub = cmd, pubsub
        cmd.before_write = self._seal
        self._seq = self._seq_channel = None
        try:
            await self._pubsub_sync(self._resubscribe_commands())
        except BaseException:
            cmd.abort()
            pubsub.abort()
            raise

    async def connect(self) -> None:
        """Connect both connections, load the script and start the supervisor and heartbeat.

        Raises:
            ConnectError: unreachable server, refused credentials or database (no password
                shown).
        """
        await self._open_main()
        self._set_connected(True)
        self._supervisor_task = self._spawn(self._supervisor.run(), "supervisor")
        self._heartbeat_task = self._spawn(self._heartbeat(), "heartbeat")

    # -- the steps the kit's Supervisor drives (`Reconnectable`) ----------------------------------

    async def wait_lost(self) -> BaseException | None:
        """Return once a connection dropped; its dead connections are dropped with it."""
        await self._lost.wait()
        return self._abort_connections()

    async def on_lost(self, cause: BaseException | None) -> None:
        """Requeue the unanswered QoS 1 publishes, fail every barrier and PING waiting."""
        self._take_inflight()
        self._fail_sync(ConnectionLost(f"lost the connection to {self.url.endpoint()}"))

    async def reopen(self) -> None:
        """Reconnect, reload the script and renew every pub/sub subscription."""
        try:
            async with asyncio.timeout(_CONNECT_TIMEOUT):
                await self._open_main()
        except (RespLost, ReplyError) as exc:
            raise errors.lost(exc) from exc
        if self._lost.is_set():  # lost again at once
            raise ConnectionLost(f"lost the connection to {self.url.endpoint()} again")

    async def abandon(self) -> None:
        """Drop the connections a failed attempt opened."""
        self._abort_connections()

    async def restore(self) -> None:
        """Resend what was held, send the pending acks, resync retained state."""
        subs = self._open_windows()  # before anything renewed can be delivered
        self._resend_offline()
        self._set_connected(True)  # publishes during the resync go straight out
        self._schedule_acks()
        await self._resync_logged(subs)

    async def give_up(self, cause: BaseException | None) -> None:
        """``reconnect`` is off: every held publish fails."""
        self._fail_offline(ConnectionLost(f"lost the connection to {self.url.endpoint()}"))

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
        self._offline.fail_all(error)

    def _resend_offline(self) -> None:
        offline = self._offline
        while offline:
            out = offline.popleft()
            self._enqueue(out.topic, out.data, out.retain, out if out.qos else None)

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
        self._closing = self._supervisor.closing = True
        self._closed = True
        tasks = [t for t in (self._supervisor_task, self._heartbeat_task, self._flow.task) if t]
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
        await self._tasks.aclose(timeout=2.0)

    # -- publishing (the hot path) ---------------------------------------------------------------

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

    def _buffer(self, topic: str, data: bytes, qos: int, retain: bool) -> None:
        """Disconnected: hold the publish (the kit's one policy for a full buffer)."""
        self._offline.hold(_Out(topic, data, qos, retain), reconnecting=self._opts.net.reconnect)

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

    # -- subscribing -----------------------------------------------------------------------------

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
            raise errors.subscribe_refused(self.url.endpoint(), pattern, exc) from exc
        except RespLost as exc:
            raise errors.lost(exc) from exc
        return _Handle(self, sub)
