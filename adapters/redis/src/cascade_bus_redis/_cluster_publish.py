"""Redis Cluster publishing: one sender task, cluster pipelines, in order per master.

The cluster's `Publisher` part. Publishes queue up (`PipelinePublisher._queue`); the sender
takes up to ``_BATCH`` of them into one cluster pipeline of publish-script calls (one round
trip per master), settles QoS 1 ones from the results, requeues what a lost connection left
unanswered (QoS 1; QoS 0 is counted as ``disconnected``) and reloads the script after NOSCRIPT.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Mapping
from typing import TYPE_CHECKING, Any

from cascade_bus import BusClosed, ConnectionLost, PublishError
from cascade_bus.spi import DropReason, Outgoing

from ._cluster_client import (
    _BATCH,
    _TOPIC_CACHE,
    _TRANSIENT,
    NoScriptError,
    ResponseError,
    key_slot,
)
from ._connection import log
from ._publishing import _Out
from ._topics import shard_key

if TYPE_CHECKING:
    from ._cluster_links import ClusterPubSub
    from ._transport import RedisTransport

__all__ = ["PipelinePublisher"]


class PipelinePublisher:
    """The publish queue, its sender task and flush (`Publisher`)."""

    def __init__(self, transport: RedisTransport, links: ClusterPubSub) -> None:
        self.t = transport
        self.links = links
        self._opts = transport._opts
        self._stats = transport.stats
        self._offline = transport._offline
        self._endpoint = transport.url.endpoint()
        self._prefix = transport._prefix
        self._levels = transport._opts.shard_levels
        self._reported_failure = False
        self._queue: deque[Outgoing] = deque()
        self._batch: list[Outgoing] | None = None
        self._send_wake = asyncio.Event()
        self._progress = asyncio.Event()
        self._sender: asyncio.Task[None] | None = None
        self._topic_keys: dict[str, tuple[bytes, bytes, bytes, bytes]] = {}
        self._maxlen_b = str(self._opts.stream_maxlen).encode()

    def _publish_keys(self, topic: str) -> tuple[bytes, bytes, bytes, bytes]:
        """``(retained key, broad key, namespace, topic)`` of a topic, cached."""
        keys = self._topic_keys.get(topic)
        if keys is None:
            if len(self._topic_keys) >= _TOPIC_CACHE:
                self._topic_keys.clear()
            key = shard_key(topic, self._levels)
            assert key is not None  # a topic has no wildcards
            ns = self.links._ns(key)
            broad = self.links._slot_ns(key_slot(ns)) + b"broad"
            keys = self._topic_keys[topic] = (ns + b"retained", broad, ns, topic.encode())
        return keys

    def _publish_call(self, out: Outgoing) -> tuple[Any, ...]:
        retained_key, broad, ns, name = self._publish_keys(out.topic)
        return (
            b"EVALSHA", self.links._sha, 2, retained_key, broad,
            b"P", ns, name, out.data, b"1" if out.retain else b"0", self._maxlen_b, broad,
            self._prefix,
        )  # fmt: skip

    def send(
        self,
        topic: str,
        data: bytes,
        qos: int,
        retain: bool,
        headers: Mapping[str, str] | None,
        reply_to: str | None = None,
    ) -> Awaitable[None] | None:
        """Queue one publish; QoS 1 returns a future settled once the owning master ran it.

        Raises:
            PublishError: Redis refused it (QoS 1), or the offline buffer is full (QoS 1).
            ConnectionLost: disconnected and ``reconnect`` is off.
        """
        if self.t._closed:
            raise BusClosed("the Redis Cluster transport is closed")
        if not self.t._connected:
            self._offline.hold(
                _Out(topic, data, qos, retain), reconnecting=self._opts.net.reconnect
            )
            return None
        if qos:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._queue.append(_Out(topic, data, qos, retain, fut))
            self._send_wake.set()
            return fut
        self._queue.append(_Out(topic, data, qos, retain, None))
        self._send_wake.set()
        if len(self._queue) >= self._opts.max_inflight:
            return self._wait_queue()
        return None

    async def _wait_queue(self) -> None:
        """Wait until the queue is below ``max_inflight`` again (or the connection dropped)."""
        limit = self._opts.max_inflight
        while len(self._queue) >= limit and self.t._connected and not self.t._closed:
            await self._wait_progress()

    async def _send_loop(self) -> None:
        """Send queued publishes as cluster pipelines, one batch at a time (in order per node)."""
        while True:  # until `stop` cancels it
            if not self._queue or not self.t._connected:
                self._send_wake.clear()
                await self._send_wake.wait()
                continue
            batch = [self._queue.popleft() for _ in range(min(len(self._queue), _BATCH))]
            self._batch = batch
            lost_event = self.links.lost  # this connection's; a reconnect meanwhile replaces it
            try:
                results: list[Any] = await self.links._pipeline(
                    self._publish_call(o) for o in batch
                )
            except ConnectionLost as exc:
                results = [exc] * len(batch)
            except Exception as exc:  # a bug here must not leave publishers waiting forever
                log.exception("publishing a batch to %s failed", self._endpoint)
                results = [ResponseError(f"cascade_bus: {exc!r}")] * len(batch)
            finally:
                self._batch = None
            lost = await self._settle(batch, results)
            self._notify_progress()
            if lost is not None and lost_event is self.links.lost:
                log.warning("publishing to %s failed: %s", self._endpoint, lost)
                lost_event.set()
                await self.t.wait_disconnected()

    async def _settle(self, batch: list[Outgoing], results: list[Any]) -> BaseException | None:
        """Settle a batch's publishes; requeue what must be sent again; return a lost cause."""
        again: list[Outgoing] = []
        lost: BaseException | None = None
        noscript = False
        dropped = 0
        for out, result in zip(batch, results, strict=True):
            if not isinstance(result, BaseException):
                out.settle()
            elif isinstance(result, NoScriptError):
                noscript = True
                again.append(out)
            elif isinstance(result, ResponseError) and not isinstance(result, _TRANSIENT):
                error = PublishError(
                    f"{self._endpoint} refused the message for {out.topic!r}: {result}",
                    topic=out.topic,
                )
                if out.future is None or out.future.done():
                    self._stats.drop(DropReason.PUBLISH_FAILED)
                    if not self._reported_failure:
                        self._reported_failure = True
                        log.warning(
                            "%s (counted in stats().dropped['publish_failed']; further "
                            "failures are not logged)",
                            error,
                        )
                out.settle(error)
            else:
                lost = result
                if out.qos:
                    again.append(out)
                    out.settle()  # held in a queue that survives the reconnect
                else:
                    dropped += 1  # Redis may or may not have run it: never sent twice
        if dropped:
            self._stats.drop(DropReason.DISCONNECTED, dropped)
        self._queue.extendleft(reversed(again))
        if noscript and lost is None:
            try:
                await self.links.reload_script()
            except ConnectionLost as exc:
                lost = exc
        return lost

    def resend_offline(self) -> None:
        self._queue.extend(self._offline.take_all())
        self._send_wake.set()

    def fail_offline(self, error: BaseException) -> None:
        queued = list(self._queue)  # accepted, never sent: lost like the held ones
        self._queue.clear()
        for out in queued:
            out.settle(error)
        if queued:
            self._stats.drop(DropReason.DISCONNECTED, len(queued))
        self._offline.fail_all(error)

    def _notify_progress(self) -> None:
        changed, self._progress = self._progress, asyncio.Event()
        changed.set()

    async def _wait_progress(self) -> None:
        await self._progress.wait()

    async def flush(self, timeout: float) -> None:
        """Wait until every publish so far was run by its master (or counted as lost).

        Raises:
            TimeoutError: not done within ``timeout`` seconds.
        """
        async with asyncio.timeout(timeout):
            while not self.t._closed:
                if self.t._connected and not (self._queue or self._batch or self._offline):
                    return
                await self._wait_progress()

    def start(self) -> None:
        """Start the sender task."""
        self._sender = self.t._spawn(self._send_loop(), "sender")

    def state_changed(self) -> None:
        self._notify_progress()
        self._send_wake.set()

    def take_inflight(self) -> None:
        """Nothing to do: the sender requeues what a failed batch left unanswered itself."""

    async def drain(self) -> None:
        while self._queue or self._batch:
            await self._wait_progress()

    async def stop(self, error: BaseException) -> None:
        """Stop the sender (what is still queued fails with ``fail_offline``)."""
        if self._sender is not None:
            self._sender.cancel()
            await asyncio.gather(self._sender, return_exceptions=True)
