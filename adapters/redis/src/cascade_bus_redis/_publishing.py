"""Publishing: publishes batched into EVALSHA calls of the adapter's script, and their replies.

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
from collections.abc import Mapping
from typing import Any

from cascade_bus.spi import BusURL, DropReason, Outgoing

from . import _errors as errors
from ._connection import TOPIC_CACHE, RedisBase, log
from ._resp import ReplyError, RespConnection, RespLost, pack
from ._script import SCRIPT

__all__ = ["Publishing"]

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


class Publishing(RedisBase):
    """The publish batches of the command connection, the script, and their replies."""

    def __init__(self, url: BusURL, options: Mapping[str, Any]) -> None:
        super().__init__(url, options)
        o = self._opts
        self._maxlen = str(o.stream_maxlen).encode()
        self._ttl_ms = int(o.stream_ttl * 1000)
        self._sha = b""
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
        # A quarter of the in-flight window per call: later calls run while the publisher waits.
        self._batch_max = max(1, min(_BATCH_MAX, o.max_inflight // 4))

    def _set_sha(self, sha: bytes) -> None:
        self._sha = sha
        self._script_args = (
            _bulk(sha) + _bulk(b"0") + _bulk(b"p") + _bulk(self._prefix) + _bulk(self._maxlen)
        )

    # -- the open batch (the send hot path calls `_enqueue`) -------------------------------------

    def _enqueue(self, topic: str, data: bytes, retain: bool, out: Outgoing | None) -> None:
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
                if len(self._topic_heads) >= TOPIC_CACHE:
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

    def _take_inflight(self) -> None:
        """Requeue QoS 1 publishes the lost connection never answered; count lost QoS 0 ones."""
        requeue, lost_qos0 = self._unanswered()
        if lost_qos0:
            # Their fate is unknown (Redis may have run them): counted, never resent twice.
            self.stats.drop(DropReason.DISCONNECTED, lost_qos0)
        self._offline.requeue(requeue)

    # -- replies ---------------------------------------------------------------------------------

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
            error = errors.publish_refused(self.url.endpoint(), out.topic, text)
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
            self._spawn(self._reload_script_logged(), "reload-script")
        if not self._reported_failure:
            self._reported_failure = True
            log.warning(
                "%s refused a command (counted in stats().dropped['publish_failed']; "
                "further failures are not logged): %s",
                self.url.endpoint(),
                error,
            )

    # -- the script ------------------------------------------------------------------------------

    async def _reload_script(self) -> None:
        cmd = self._cmd
        if cmd is not None and not cmd.lost:
            with_sha = await cmd.call(b"SCRIPT", b"LOAD", SCRIPT)
            self._set_sha(with_sha)

    async def _reload_script_logged(self) -> None:
        try:
            await self._reload_script()
        except (RespLost, ReplyError) as exc:
            log.info("loading the script on %s again failed: %s", self.url.endpoint(), exc)

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

        Raises:
            ConnectionLost: not connected, or the connection dropped before the reply.
            ReplyError: Redis refused it.
        """
        for attempt in (1, 2):
            cmd = self._cmd
            if cmd is None or cmd.lost:
                raise errors.not_connected(self.url.endpoint())
            fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            cmd.send(self._script_packed(op, *args), fut)
            try:
                return await fut
            except ReplyError as exc:
                if exc.code != "NOSCRIPT" or attempt == 2:
                    raise
                await self._reload_script()
            except RespLost as exc:
                raise errors.lost(exc) from exc
        raise AssertionError("unreachable")  # pragma: no cover
