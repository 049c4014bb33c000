"""Retained messages: the KV bucket's snapshot, revision checks, hand-over and resync.

A new subscription buffers what arrives live, reads the snapshot, hands it over oldest revision
first, then replays the buffer minus the live copies the snapshot covered (`Entry.stale`); after
a reconnect `Retained.resync` does the same between ``resync_begin``/``resync_end``. The full
story: docs/transports/nats.md, "What is emulated, and how".
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from typing import TYPE_CHECKING

import msgspec
import nats.errors as nats_errors
import nats.js.errors as js_errors
from nats.aio.msg import Msg
from nats.js import api as js_api

from cascade_bus import SubscribeError
from cascade_bus.spi import Message

from ._errors import describe
from ._jetstream import JetStream
from ._mapper import topic_from_subject
from ._options import NatsOptions
from ._routing import Entry
from ._wire import JS_ACK, KV_OP, STATUS, ack_reply_fields, stored_headers, subjects_info

if TYPE_CHECKING:
    from ._transport import NatsTransport

__all__ = ["LISTED_MAX", "Retained", "Stored"]

log = logging.getLogger("cascade_bus.nats")
#: Up to this many keys matching a wildcard are read one by one, more through a consumer.
LISTED_MAX = 256
#: One retained value read back: (topic, KV revision, body, headers, deleted).
Stored = tuple[str, int, bytes, "dict[str, str] | None", bool]


class Retained:
    """The retained state of one transport: the bucket's key prefix and the snapshot reads.

    Args:
        transport: The transport it serves (connection, subscriptions, tasks).
        js: Its JetStream state (manager, bucket name, how to read it).
        opts: The transport's options.
    """

    def __init__(self, transport: NatsTransport, js: JetStream, opts: NatsOptions) -> None:
        self.t = transport
        self.js = js
        self.opts = opts
        self.prefix = f"$KV.{opts.retain_bucket}."

    def hold_live(self) -> None:
        """The connection is gone: buffer what arrives next until the retained resync is done.

        (The transport cancels a resync still reading the previous connection's snapshot: the
        next reconnect starts it over; a sink never hears `resync_end` for an incomplete one.)
        """
        if not self.opts.retain:
            return
        for entry in self.t._entries:
            if entry.queue is None and not entry.closed:
                entry.resync = True
                if entry.buffer is None:
                    entry.buffer = []

    async def resync(self) -> None:
        """Bring every replaying subscription to the retained state after a reconnect.

        Each gets the bucket's current snapshot for its pattern exactly as `subscribe` hands
        it over (live messages buffered since the connection dropped, then replayed minus the
        copies the snapshot covers), bracketed by ``sink.resync_begin()`` / ``resync_end()``:
        the sink drops the values it already had and reports the topics cleared meanwhile.
        """
        while True:
            entries = [entry for entry in self.t._entries if entry.resync]
            if not entries:
                return
            await asyncio.gather(*(self._resync_entry(entry) for entry in entries))

    async def _resync_entry(self, entry: Entry) -> None:
        try:
            snapshot = await self.read_snapshot(entry)
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
            self.t.resync_failures += 1
            log.warning(
                "could not resync the retained messages of %r after reconnecting to %s (%s); "
                "live messages go on, the next reconnect tries again",
                entry.pattern,
                self.t.url.endpoint(),
                describe(exc, self.opts.password, self.opts.token),
            )
            entry.release()
            return
        if entry.closed or not entry.resync:
            return
        entry.resync = False
        self._hand_over(entry, snapshot, resync=True)

    async def replay(self, entry: Entry) -> None:
        """Deliver the retained snapshot, then the buffered live messages not already in it."""
        self._hand_over(entry, await self.read_snapshot(entry), resync=False)

    async def read_snapshot(self, entry: Entry) -> list[list[Stored]]:
        return await asyncio.gather(
            *(self.js.retry(functools.partial(self._snapshot, native)) for native in entry.natives)
        )

    def _hand_over(self, entry: Entry, snapshot: list[list[Stored]], *, resync: bool) -> None:
        """Hand the snapshot to the sink (oldest revision first), then what ``buffer`` holds.

        A buffered live copy at or below the snapshot's revision of its topic is dropped
        (`Entry.stale`): the snapshot delivered it or a newer value. With ``resync`` the
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

    async def _snapshot(self, native: str) -> list[Stored]:
        """The last KV entry of every key matching ``native``: (topic, revision, data, ...)."""
        key = self.prefix + native
        if not any(token in ("*", ">") for token in native.split(".")):
            return await self._read_key(key)
        listed = await self._snapshot_listed(key)
        if listed is not None:
            return listed
        return await self._snapshot_consumer(key)

    async def _snapshot_listed(self, key_filter: str) -> list[Stored] | None:
        """The keys matching a wildcard, listed by the bucket's leader, then read one by one.

        Cheaper than a consumer for a few keys, and it needs no consumer created (in a cluster
        that is a proposal to the meta group, whose leader may be re-elected after a node
        failure). None when more than `LISTED_MAX` keys match: a consumer streams them.
        """
        nc = self.t._nc
        assert nc is not None
        reply = await nc.request(
            f"$JS.API.STREAM.INFO.{self.js.kv_stream}",
            msgspec.json.encode({"subjects_filter": key_filter}),
            timeout=self.opts.ack_timeout,
        )
        info = subjects_info.decode(reply.data)
        error = info.error
        if error is not None:
            raise js_errors.APIError(
                code=error.code, description=error.description, err_code=error.err_code
            )
        subjects = info.state.subjects or {}
        if len(subjects) > LISTED_MAX or (info.limit and len(subjects) >= info.limit):
            return None
        found = await asyncio.gather(*(self._read_key(subject) for subject in subjects))
        return [entry for entries in found for entry in entries]

    async def _read_key(self, key: str) -> list[Stored]:
        """The last KV entry of one key (none if it has none).

        A direct get when the bucket is not replicated, else a get through its leader
        (``STREAM.MSG.GET``), which has every acknowledged write (see `_set_kv_reads`).
        """
        topic = topic_from_subject(key[len(self.prefix) :])
        if not self.js.kv_direct:
            jsm = self.js.jsm
            assert jsm is not None
            try:
                stored = await jsm.get_msg(self.js.kv_stream, subject=key)
            except js_errors.NotFoundError:
                return []
            headers = stored.headers or {}
            deleted = headers.get(KV_OP) in ("DEL", "PURGE")
            data = stored.data or b""
            return [(topic, stored.seq or 0, data, stored_headers(headers), deleted)]
        nc = self.t._nc
        assert nc is not None
        reply = await nc.request(
            f"$JS.API.DIRECT.GET.{self.js.kv_stream}.{key}",
            b"",
            timeout=self.opts.ack_timeout,
        )
        headers = reply.headers or {}
        if headers.get(STATUS):
            if headers[STATUS] == "404":
                return []
            raise SubscribeError(
                f"reading the retained message of {topic!r} failed: "
                f"{headers.get('Description', headers[STATUS])}",
                pattern=topic,
            )
        rev = int(headers.get("Nats-Sequence", "0"))
        deleted = headers.get(KV_OP) in ("DEL", "PURGE")
        return [(topic, rev, reply.data, stored_headers(headers), deleted)]

    async def _snapshot_consumer(self, filter_subject: str) -> list[Stored]:
        nc = self.t._nc
        jsm = self.js.jsm
        assert nc is not None
        assert jsm is not None
        cut = len(self.prefix)
        found: list[Stored] = []
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        expected: list[int] = []

        async def collect(msg: Msg) -> None:
            if not msg.reply.startswith(JS_ACK):
                return
            _, rev, pending = ack_reply_fields(msg.reply)
            headers = msg.headers
            deleted = headers is not None and headers.get(KV_OP) in ("DEL", "PURGE")
            found.append(
                (
                    topic_from_subject(msg.subject[cut:]),
                    rev,
                    msg.data,
                    stored_headers(headers),
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
                self.js.kv_stream,
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
            async with asyncio.timeout(self.opts.ack_timeout):
                await done
        finally:
            with contextlib.suppress(nats_errors.Error):
                await sub.unsubscribe()
            if name:
                self.t._tasks.spawn(
                    self.js.delete_consumer(self.js.kv_stream, name), "snapshot-cleanup"
                )
        return found
