"""The standalone server's publisher: publishes batched into EVALSHA calls of the script.

The publishes of one event-loop iteration (up to a quarter of ``max_inflight``, ``_BATCH_MAX``
messages or ``_BATCH_BYTES``) are packed into one call (`_Batch`), sealed when the command
connection is about to write (its ``before_write`` hook) so every other command keeps its place
in the order. The reply names the messages that failed; a NOSCRIPT reply (SCRIPT FLUSH, a
restart) loads the script again and sends the refused calls once more, in order, ahead of
anything sealed meanwhile.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Mapping
from typing import TYPE_CHECKING, Any

from cascade_bus import BusClosed
from cascade_bus.spi import DropReason, Outgoing

from . import _errors as errors
from ._connection import TOPIC_CACHE, log
from ._resp import ReplyError, RespConnection, RespLost

if TYPE_CHECKING:
    from ._node_links import NodeLinks
    from ._transport import RedisTransport

__all__ = ["BatchPublisher"]

#: Most messages, and body bytes, in one publish script call: bounds how long one call blocks
#: the server (about a microsecond per message) and how much a NOSCRIPT resend holds.
_BATCH_MAX = 512
_BATCH_BYTES = 256 * 1024


def _bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


class _Out(Outgoing):
    """A publish waiting for its reply, or for a connection (offline buffer)."""

    __slots__ = ()


class _Batch:
    """One publish script call in flight: its messages (packed) and the QoS 1 ones among them."""

    __slots__ = ("body", "n", "outs", "seq")

    def __init__(self, seq: int, n: int, body: bytes, outs: list[tuple[int, Outgoing]]) -> None:
        self.seq = seq  # issue order (NOSCRIPT resends keep it)
        self.n = n
        self.body = body  # the packed (retain, topic, body) triples
        self.outs = outs  # (1-based index in the batch, publish) of the QoS 1 publishes


class BatchPublisher:
    """The publish batches of the command connection and their replies (`Publisher`)."""

    def __init__(self, transport: RedisTransport, links: NodeLinks) -> None:
        self.t = transport
        self.links = links
        o = transport._opts
        self._opts = o
        self._stats = transport.stats
        self._offline = transport._offline
        self._endpoint = transport.url.endpoint()
        self._prefix = transport._prefix
        self._maxlen = str(o.stream_maxlen).encode()
        self._script_args = b""  # sha, numkeys, op, namespace, maxlen: packed
        # The open batch: packed (retain, topic, body) triples, their QoS 1 publishes, bytes.
        self._parts: list[bytes] = []
        self._part_outs: list[tuple[int, Outgoing]] = []
        self._parts_size = 0
        self._batch_seq = itertools.count()
        self._inflight = 0  # publishes in the open batch or unanswered
        self._capacity: asyncio.Future[None] | None = None
        self._noscript: list[_Batch] = []  # refused for NOSCRIPT: sent again once reloaded
        self._noscript_task: asyncio.Task[None] | None = None
        self._topic_heads: dict[str, bytes] = {}
        self._reported_failure = False
        # The command connection while the transport is connected and open (`state_changed`
        # keeps it current): the one check on the hot path.
        self._live: RespConnection | None = None
        self._max_inflight = o.max_inflight
        # A quarter of the in-flight window per call: later calls run while the publisher waits.
        self._batch_max = max(1, min(_BATCH_MAX, o.max_inflight // 4))

    def set_sha(self, sha: bytes) -> None:
        self._script_args = (
            _bulk(sha) + _bulk(b"0") + _bulk(b"p") + _bulk(self._prefix) + _bulk(self._maxlen)
        )

    # -- the send hot path -----------------------------------------------------------------------

    def send(
        self,
        topic: str,
        data: bytes,
        qos: int,
        retain: bool,
        headers: Mapping[str, str] | None,
        reply_to: str | None = None,
    ) -> Awaitable[None] | None:
        """Hand one publish over; QoS 1 returns a future settled once Redis replied.

        ``reply_to`` travels in the envelope only (Redis has no native reply subjects).

        Raises:
            PublishError: Redis refused it (QoS 1), or the offline buffer is full (QoS 1).
            ConnectionLost: disconnected and ``reconnect`` is off.
        """
        cmd = self._live
        if cmd is not None:
            if qos:
                fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                self._enqueue(topic, data, retain, _Out(topic, data, qos, retain, fut))
                return fut
            self._enqueue(topic, data, retain, None)
            if self._inflight >= self._max_inflight or cmd.write_paused:
                return self._backpressure(cmd)
            return None
        if self.t._closed:
            raise BusClosed("the Redis transport is closed")
        self._offline.hold(_Out(topic, data, qos, retain), reconnecting=self._opts.net.reconnect)
        return None

    async def _backpressure(self, cmd: RespConnection) -> None:
        """Wait while too many replies are outstanding or the socket's buffer is full."""
        if self._inflight >= self._opts.max_inflight:
            await self._wait_capacity(cmd)
        if cmd.write_paused:
            await cmd.wait_writable()

    def _enqueue(self, topic: str, data: bytes, retain: bool, out: Outgoing | None) -> None:
        """Add one publish to the open batch (sent at the end of this loop iteration)."""
        parts = self._parts
        if not parts:
            cmd = self.links.cmd
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
                if len(self._topic_heads) >= TOPIC_CACHE:
                    self._topic_heads.clear()
                name = topic.encode()
                head = self._topic_heads[topic] = b"$1\r\n0\r\n$%d\r\n%s\r\n" % (len(name), name)
        parts.append(b"%s$%d\r\n%s\r\n" % (head, len(data), data))
        self._inflight += 1
        self._parts_size += len(data)
        if self._parts_size >= _BATCH_BYTES or len(parts) >= self._batch_max:
            self.seal()

    def seal(self) -> None:
        """Send the open batch as one script call (the connection's ``before_write`` hook)."""
        parts = self._parts
        cmd = self.links.cmd
        if not parts or cmd is None or cmd.lost:
            return  # nothing, or `take_inflight` takes them with the lost connection
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

    def _unanswered(self) -> tuple[list[Outgoing], int]:
        """Take every publish not answered yet: its QoS 1 ones in order, and how many QoS 0."""
        batches: list[_Batch] = []
        cmd = self.links.cmd
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

    def take_inflight(self) -> None:
        """Requeue QoS 1 publishes the lost connection never answered; count lost QoS 0 ones."""
        requeue, lost_qos0 = self._unanswered()
        if lost_qos0:
            # Their fate is unknown (Redis may have run them): counted, never resent twice.
            self._stats.drop(DropReason.DISCONNECTED, lost_qos0)
        self._offline.requeue(requeue)

    # -- replies ---------------------------------------------------------------------------------

    def on_reply(self, waiter: Any, reply: Any) -> None:
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
                    self._noscript_task = self.t._spawn(self._resend_noscript(), "reload-script")
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
            error = errors.publish_refused(self._endpoint, out.topic, text)
            if out.future is None or out.future.done():  # resent from the buffer: nobody waits
                self._publish_failed(error)
            out.settle(error)
        for text in failed.values():  # QoS 0 publishes
            self._publish_failed(ReplyError(text))

    def _publish_failed(self, error: BaseException) -> None:
        """Count a publish nobody waits for that Redis refused; log the first one."""
        self._stats.drop(DropReason.PUBLISH_FAILED)
        if not self._reported_failure:
            self._reported_failure = True
            log.warning(
                "%s refused a publish (counted in stats().dropped['publish_failed']; "
                "further failures are not logged): %s",
                self._endpoint,
                error,
            )

    def on_orphan(self, error: ReplyError) -> None:
        """An error reply to a command nobody awaited (a barrier, a route left on close)."""
        self._stats.drop(DropReason.PUBLISH_FAILED)
        if error.code == "NOSCRIPT":
            self.t._spawn(self._reload_script_logged(), "reload-script")
        if not self._reported_failure:
            self._reported_failure = True
            log.warning(
                "%s refused a command (counted in stats().dropped['publish_failed']; "
                "further failures are not logged): %s",
                self._endpoint,
                error,
            )

    # -- the script ------------------------------------------------------------------------------

    async def _reload_script_logged(self) -> None:
        try:
            await self.links.reload_script()
        except (RespLost, ReplyError) as exc:
            log.info("loading the script on %s again failed: %s", self._endpoint, exc)

    async def _resend_noscript(self) -> None:
        """Load the script again (SCRIPT FLUSH, a restart), then send the refused batches again.

        Batches sealed meanwhile wait behind them, so the order of publishes holds.
        """
        try:
            await self.links.reload_script()
        except RespLost:
            return  # `take_inflight` takes the batches with the lost connection
        except ReplyError as exc:
            batches, self._noscript = self._noscript, []
            for batch in batches:
                self.on_reply(batch, ReplyError(f"loading the script failed: {exc}"))
            return
        cmd = self.links.cmd
        if cmd is None or cmd.lost:
            return
        self.seal()  # the open batch joins the queue (it is not empty), so the sends below
        # cannot let it through first (`send` seals through `before_write`)
        batches, self._noscript = sorted(self._noscript, key=lambda b: b.seq), []
        for batch in batches:
            cmd.send(self._batch_command(batch), batch)

    # -- the rest of the `Publisher` part --------------------------------------------------------

    async def flush(self, timeout: float) -> None:
        """Wait until everything published so far was answered by Redis.

        Raises:
            TimeoutError: not done within ``timeout`` seconds.
        """
        t = self.t
        async with asyncio.timeout(timeout):
            while not t._closed:
                await t._up.wait()
                cmd = self.links.cmd
                try:
                    if cmd is None:
                        raise RespLost("no command connection")
                    await cmd.call(b"PING")  # replies come in order: all earlier ones arrived
                except RespLost:
                    # Until the supervisor noticed, `_up` and `lost` are both set and waiting
                    # on them would not yield: wait for the state change itself.
                    await t.wait_disconnected()
                    continue
                reload = self._noscript_task
                if reload is None or reload.done():
                    return
                await asyncio.wait({reload})  # refused calls go again: PING after them

    def start(self) -> None:
        """Nothing runs in the background: publishes go out as the loop iteration ends."""

    def state_changed(self) -> None:
        """Send straight to the command connection only while connected and open."""
        t = self.t
        self._live = self.links.cmd if t._connected and not t._closed else None

    def resend_offline(self) -> None:
        offline = self._offline
        while offline:
            out = offline.popleft()
            self._enqueue(out.topic, out.data, out.retain, out if out.qos else None)

    def fail_offline(self, error: BaseException) -> None:
        self._offline.fail_all(error)

    async def drain(self) -> None:
        """Nothing is queued outside the connection (its final PING waits for the replies)."""

    async def stop(self, error: BaseException) -> None:
        """Settle what the closed connection never answered (normally nothing)."""
        unanswered, lost_qos0 = self._unanswered()
        if lost_qos0:
            self._stats.drop(DropReason.DISCONNECTED, lost_qos0)
        for out in unanswered:
            out.settle(error)
