"""Stream subscriptions: QoS 1 and queue groups (routes, readers, acks, XAUTOCLAIM).

A QoS 1 subscription registers a *route* (pattern -> its own stream, lease refreshed by the
heartbeat) and reads that stream with XREADGROUP on a connection of its own; the bus acks (XACK,
batched per loop iteration) after the handler ran. A queue group is one route and stream per
(queue, pattern) with consumer group ``cascade_bus``: each message goes to one member; QoS 0
members read with NOACK, QoS 1 members ack, and XAUTOCLAIM hands messages a dead member left
pending (idle longer than ``claim_idle``) to a live one. A member reads only while it holds
fewer unhandled messages than its prefetch limit (``_prefetch.py``).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
from collections import deque
from collections.abc import Mapping
from typing import Any

from cascade_bus import ConnectError, ConnectionLost
from cascade_bus.spi import BusURL, backoff_delays

from ._acks import GROUP, Acks, _Stream
from ._connection import log
from ._prefetch import Prefetch
from ._resp import ReplyError, RespConnection, RespLost
from ._retained import _Sub

__all__ = ["GROUP", "Streams", "_Stream"]


class Streams(Acks):
    """Stream routes, their reader tasks and what they deliver."""

    def __init__(self, url: BusURL, options: Mapping[str, Any]) -> None:
        super().__init__(url, options)
        self._stream_names: dict[str, int] = {}
        self._queue_consumers = itertools.count(1)

    def _stream_for(self, sub: _Sub) -> _Stream:
        o = self._opts
        ns = self._links.namespace(sub.pattern)
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
                fut = stream.barriers.add(token)
                await self._call(b"XADD", stream.key, b"*", b"b", token)
                await fut
        except BaseException:
            await self._remove(sub)
            raise
        await self._drain_window(sub, snapshot, resync=False)

    # -- the reader task -------------------------------------------------------------------------

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
        backoff = functools.partial(backoff_delays, o.net.reconnect_min, o.net.reconnect_max)
        try:
            while not sub.closed:
                conn = stream.conn
                try:
                    if conn is None or conn.lost:
                        await self._wait_up()
                        conn = stream.conn = await self._links.open_stream(stream)
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
                    delays = delays or backoff()
                    await asyncio.sleep(next(delays))
                except ReplyError as exc:
                    if exc.code in self._links.retry_codes:
                        # Redis Cluster: the slot moved or the cluster is (re)configuring.
                        log.info("%s: %s; reconnecting the stream", stream.key.decode(), exc)
                        if stream.conn is not None:
                            stream.conn.abort()
                        stream.conn = None
                        await self._links.on_redirect(exc)
                        delays = delays or backoff()
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
                        delays = delays or backoff()
                        await asyncio.sleep(next(delays))
        except ReplyError as exc:
            log.error("reading %s failed: %s", stream.key.decode(), exc)
        finally:
            if sub.closed and stream.conn is not None:
                stream.conn.abort()

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

    # -- unsubscribing ---------------------------------------------------------------------------

    async def _remove(self, sub: _Sub) -> None:
        """End one subscription: its reader and its part in the route, or its pub/sub share."""
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
        await self._links.unlisten(sub)
