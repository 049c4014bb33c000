"""Stream entries in, acks out: what a stream reader delivers and how its acks are batched.

An entry becomes a `Message` whose ``ack`` queues an XACK; the acks of one event-loop iteration
go out together (one XACK per stream), after the reconnect if the connection is down. A queue
member's unhandled entries (``_Stream.inflight``) bound what it reads next (``_prefetch.py``).
Barrier entries (field ``b``) end a subscribe's snapshot window; junk entries cost one counted
drop and are acked away.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Mapping
from typing import Any

from cascade_bus.spi import BusURL, Waiters

from ._connection import TOPIC_CACHE, log
from ._inbound import parse_entry, parse_seq
from ._prefetch import Prefetch
from ._resp import RespConnection, RespLost
from ._retained import Retained, _Sub

__all__ = ["GROUP", "Acks"]

GROUP = b"cascade_bus"
_HEX = frozenset(b"0123456789abcdef")


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
        self.barriers = Waiters()  # this subscriber's barrier entries
        self.topics: dict[bytes, str] = {}  # topics of entries checked against the pattern


class Acks(Retained):
    """Delivery of stream entries and the batched XACKs of the handled ones."""

    def __init__(self, url: BusURL, options: Mapping[str, Any]) -> None:
        super().__init__(url, options)
        self._ack_streams: set[_Stream] = set()
        self._ack_handle: asyncio.Handle | None = None

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
            if len(stream.topics) >= TOPIC_CACHE:
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
        if stream.barriers.arrived(token):
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
        links = self._links
        if not self._connected or not links.ready():
            return  # sent after the reconnect (`restore` schedules them)
        streams, self._ack_streams = self._ack_streams, set()
        for stream in streams:
            ids, stream.to_ack = stream.to_ack, []
            if not ids:
                continue
            fut = links.xack(stream.key, ids)
            fut.add_done_callback(functools.partial(self._acked, stream, ids))

    def _acked(self, stream: _Stream, ids: list[bytes], fut: asyncio.Future[Any]) -> None:
        """An XACK ended: done, again after the reconnect (connection lost), or failed."""
        if fut.cancelled():
            error = None
        else:
            error = fut.exception()
            if error is None and isinstance(fut.result(), BaseException):
                error = fut.result()  # a cluster XACK task returns its failure
        if error is None:
            stream.acking.difference_update(ids)
            return
        if isinstance(error, RespLost):
            stream.to_ack.extend(ids)  # again after the reconnect
            self._ack_streams.add(stream)
        else:
            stream.acking.difference_update(ids)
            log.warning("XACK on %s failed: %s", stream.key.decode(), error)
