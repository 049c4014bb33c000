"""Retained messages: the snapshot window of ``subscribe()``, the sequence diff, the resync.

``subscribe()`` subscribes live first and holds what arrives in the subscription's *window*;
reads the snapshot (HGET for an exact topic, HSCAN pages for a pattern, each body with its
sequence number); waits for a barrier; then delivers the snapshot minus the topics the window
holds a retained publish for with a sequence >= the snapshot's, then the window, then goes live.
After a reconnect the same procedure (`Retained._resync`) delivers only what changed, or was
cleared, while the subscription was away (``_Sub.seen`` holds the sequences it delivered).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from cascade_bus import ConnectionLost
from cascade_bus.spi import Message, MessageSink, topic_matches

from ._connection import RedisBase, log
from ._inbound import decode_topic, parse_seq
from ._resp import ReplyError, RespLost
from ._topics import scan_glob

if TYPE_CHECKING:
    from ._acks import _Stream

__all__ = ["Retained"]

_SCAN_COUNT = b"1000"


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


class Retained(RedisBase):
    """Snapshots of the retained hash and their merge with the live window."""

    async def _snapshot(self, pattern: str) -> dict[str, tuple[int, bytes]]:
        """Retained messages matching ``pattern``, with sequences (from every namespace)."""
        return await self._links.snapshot(pattern)

    async def _subscribe_pubsub(self, sub: _Sub) -> None:
        """Subscribe live (held in the window), read the snapshot, barrier, then deliver."""
        sub.window = deque()
        self._subs.add(sub)
        try:
            await self._links.listen(sub)
            snapshot = await self._snapshot(sub.pattern)
            await self._links.barrier(sub)
        except BaseException:
            await self._remove(sub)
            raise
        await self._drain_window(sub, snapshot, resync=False)

    async def _read_retained(
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

    def _open_windows(self) -> list[_Sub]:
        """Before a resync: hold what the renewed pub/sub subscriptions receive from now on.

        Called right after the connection was reopened, before anything could be delivered.
        """
        subs = [s for s in self._subs if s.stream is None and s.queue is None and not s.closed]
        for sub in subs:
            if sub.window is None:
                sub.window = deque()
        return subs

    async def _resync(self, subs: list[_Sub]) -> None:
        """Re-deliver retained messages that changed while the pub/sub connection was away."""
        if not subs:
            return
        try:
            snapshots = await asyncio.gather(*(self._snapshot(s.pattern) for s in subs))
            await self._links.barrier()
        except BaseException:
            for sub in subs:
                await self._drain_window(sub, {}, resync=False)
            raise
        for sub, snapshot in zip(subs, snapshots, strict=True):
            await self._drain_window(sub, snapshot, resync=True)

    async def _resync_logged(self, subs: list[_Sub]) -> None:
        """`_resync`, with a failure logged (the next reconnect resyncs again)."""
        try:
            await self._resync(subs)
        except (ConnectionLost, RespLost, ReplyError, TimeoutError) as exc:
            log.info(
                "retained resync after reconnecting to %s failed: %s", self.url.endpoint(), exc
            )
