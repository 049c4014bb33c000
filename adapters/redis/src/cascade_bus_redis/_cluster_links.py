r"""Redis Cluster: one pub/sub link per master, shard channels, frames, barriers.

Each master gets one `RespConnection` (a `_Link`) that SSUBSCRIBEs the shard channels whose slot
it owns (and, on one link, SUBSCRIBEs the classic channels of broad patterns and this bus's
barrier channel). A frame is ``<seq>\0<topic>\0<body>``; junk costs one counted drop. An
unasked SUNSUBSCRIBE (the slot moved) or a channel on an unknown master triggers a reconnect,
which subscribes everything where it lives now and resyncs retained state.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Iterable
from typing import Any

from cascade_bus import ConnectError, ConnectionLost
from cascade_bus.spi import topic_matches

from . import _errors as errors
from ._cluster_client import _FAILURES, _TOPIC_CACHE, _Channel, _Link
from ._cluster_leases import ClusterLeases
from ._connection import log
from ._inbound import decode_topic, parse_seq
from ._resp import ReplyError, pack
from ._retained import _Sub

__all__ = ["ClusterPubSub"]


class ClusterPubSub(ClusterLeases):
    """The pub/sub links to the masters and the subscriptions on them."""

    # -- connecting ------------------------------------------------------------------------------

    async def open(self) -> None:
        """Read the topology, load the script, open a link per master, resubscribe, re-lease."""
        self.lost = lost = asyncio.Event()
        rc = self._rc
        if rc is None:
            rc = self._rc = self._new_client()
        else:
            await rc.aclose()  # forget connections and slot map; initialize() reads them again
        try:
            await rc.initialize()
            await self._load_script()
            primaries = sorted(rc.get_primaries(), key=lambda n: n.name)
        except _FAILURES as exc:  # redis-py's AuthenticationError, ResponseError, OSError...
            raise errors.cluster_connect_failed(self.url.endpoint(), exc) from exc
        if not primaries:
            raise ConnectError(f"{self.url.endpoint()} reports no masters")
        self.abort()  # a previous attempt's links, if any
        links: dict[str, _Link] = {}
        try:
            for node in primaries:
                address = (node.host, int(node.port))
                links[node.name] = await self._open_link(node.name, address, lost)
        except BaseException:
            for link in links.values():
                if link.conn is not None:
                    link.conn.abort()
            raise
        self._masters = links
        self._classic_link = primaries[0].name
        try:
            await self._resubscribe()
        except BaseException:
            self.abort()
            raise

    async def _open_link(self, name: str, address: tuple[str, int], lost: asyncio.Event) -> _Link:
        link = _Link(name)

        def on_lost(exc: BaseException | None) -> None:
            lost.set()

        link.conn = await self.t._open(
            "pubsub",
            address=address,
            on_push=functools.partial(self._on_link_push, link),
            on_push_error=self._push_failed,
            on_lost=on_lost,
        )
        return link

    async def _resubscribe(self) -> None:
        """After (re)connecting: every channel on the master owning it, every lease again."""
        commands: dict[str, list[bytes]] = {name: [] for name in self._masters}
        assert self._classic_link is not None
        classic = commands[self._classic_link]
        classic.append(pack(b"SUBSCRIBE", self._barrier_channel, *self._classic))
        for ch in self._chans.values():
            ch.node, _ = self._node_address(ch.name)
            if ch.node not in self._masters:
                raise ConnectionLost(f"{ch.node} owns {ch.name!r} but is not a known master")
            commands[ch.node].append(pack(b"SSUBSCRIBE", ch.name))
        for ch in self._classic.values():
            ch.node = self._classic_link
        await asyncio.gather(
            *(self._link_sync(self._masters[name], cmds) for name, cmds in commands.items())
        )
        # A server that restarted has lost the leases (and a lease may have run out).
        await self._renew_leases(connected=False)

    def abort(self) -> BaseException | None:
        cause: BaseException | None = None
        for link in self._masters.values():
            if link.conn is not None:
                cause = cause or link.conn.lost_cause
                link.conn.abort()
        return cause

    # -- pub/sub links ---------------------------------------------------------------------------

    async def _link_sync(self, link: _Link, commands: list[bytes]) -> None:
        """Send commands on a link, then a PING; its PONG proves they took effect.

        Raises:
            ConnectionLost: the link is down.
            ReplyError: the server refused one of the commands (a MOVED SSUBSCRIBE).
        """
        conn = link.conn
        if conn is None or conn.lost:
            raise ConnectionLost(f"the pub/sub link to {link.name} is down")
        refused = len(link.errors)
        await self._sync.ping(conn, commands)
        if len(link.errors) > refused:
            error = link.errors[refused]
            del link.errors[refused:]
            raise error

    def _on_link_push(self, link: _Link, reply: Any) -> None:
        if type(reply) is list:
            kind = reply[0]
            if kind == b"smessage":
                ch = self._chans.get(reply[1])
                if ch is not None:
                    self._deliver_frame(link, ch, reply[2])
            elif kind == b"message":
                ch = self._classic.get(reply[1])
                if ch is not None:
                    self._deliver_frame(link, ch, reply[2])
                elif reply[1] == self._barrier_channel:
                    self._sync.barrier(reply[2])
            elif kind == b"pong":
                self._sync.pongs.arrived(reply[1])
            elif kind == b"sunsubscribe":
                channel = reply[1]
                pending = link.leaving.get(channel, 0)
                if pending > 1:
                    link.leaving[channel] = pending - 1
                elif pending == 1:
                    del link.leaving[channel]
                elif not self.t._closing:
                    # Unasked: the slot moved to another master (resharding or failover). A
                    # reconnect subscribes it where it lives now and resyncs retained state.
                    log.warning(
                        "%s dropped the shard channel %r (slot moved); reconnecting",
                        link.name,
                        channel,
                    )
                    self.lost.set()
        elif type(reply) is bytes:
            # PING outside subscribed mode answers with a plain bulk string.
            self._sync.pongs.arrived(reply)
        elif type(reply) is ReplyError:
            link.errors.append(reply)
            if len(link.errors) > 16:
                del link.errors[:-16]
            log.debug("%s refused a pub/sub command: %s", link.name, reply)

    def _push_failed(self, reply: Any, error: Exception) -> None:
        """A pub/sub push that could not be handled: counted, logged, the link stays up."""
        self._junk("a pub/sub message", error)
        log.debug("handling %r failed", reply, exc_info=error)

    def _deliver_frame(self, link: _Link, ch: _Channel, data: bytes) -> None:
        """Deliver one frame (``seq``, topic and body, NUL-separated); junk is counted."""
        parts = data.split(b"\x00", 2)
        if len(parts) != 3:
            self._junk(f"channel {ch.name.decode('utf-8', 'replace')}", data[:64])
            return
        seq_b, topic_b, body = parts
        seq = parse_seq(seq_b) if seq_b else None
        topic = self._frame_topics.get(topic_b)
        if topic is None:
            topic = decode_topic(topic_b)
            if topic is not None:
                if len(self._frame_topics) >= _TOPIC_CACHE:
                    self._frame_topics.clear()
                self._frame_topics[topic_b] = topic
        matched = False
        if topic is not None and (seq is not None or not seq_b):
            for pattern, sub in ch.routes:  # all with the channel's pattern
                if not topic_matches(pattern, topic):
                    break
                matched = True
                if not sub.push(topic, body, seq):
                    conn = link.conn
                    if conn is not None:
                        link.flow.hold(conn, sub.sink, self._spawn)
        if not matched and ch.routes:
            # Not one of ours (another client published on the channel): never delivered.
            self._junk(f"channel {ch.name.decode('utf-8', 'replace')}", data[:64])

    # -- subscribing -----------------------------------------------------------------------------

    async def listen(self, sub: _Sub) -> None:
        """Listen on ``sub``'s channel (the first subscription to it subscribes and leases)."""
        kind, ns, name = self._plan(sub.pattern)
        table = self._classic if kind == "b" else self._chans
        ch = table.get(name)
        created = ch is None
        if ch is None:
            field = b"%s:%d %s" % (self._id.encode(), next(self._fields), sub.pattern.encode())
            ch = table[name] = _Channel(kind, name, ns, sub.pattern, field)
            ch.ready = asyncio.get_running_loop().create_future()
        ch.routes.append((sub.pattern, sub))
        ready = ch.ready
        assert ready is not None
        if not created:
            await asyncio.shield(ready)
            return
        try:
            await self._listen(ch)
        except BaseException as exc:
            if not ready.done():
                ready.set_exception(exc)
                ready.exception()  # retrieved: other waiters re-raise it
            raise
        ready.set_result(None)

    async def _listen(self, ch: _Channel) -> None:
        """Subscribe a new channel where it lives and lease its pattern (confirmed)."""
        if ch.kind == "b":
            ch.node = self._classic_link
            link = self._masters.get(ch.node or "")
            if link is None:
                raise ConnectionLost(f"not connected to {self.url.endpoint()}")
            await self._link_sync(link, [pack(b"SUBSCRIBE", ch.name)])
            await self._lease_broad([ch.field], [ch.pattern.encode()])
            return
        for attempt in (1, 2, 3):
            ch.node, _ = self._node_address(ch.name)
            link = self._masters.get(ch.node)
            if link is None:
                # A master this bus has no link to (the cluster grew): reconnect to learn it.
                self.lost.set()
                raise ConnectionLost(f"{ch.node} is not among the masters this bus knows yet")
            try:
                await self._link_sync(link, [pack(b"SSUBSCRIBE", ch.name)])
                break
            except ReplyError as exc:
                if exc.code not in self.retry_codes or attempt == 3:
                    raise
                await self.on_redirect(exc)
        if ch.kind == "p":
            await self._lease(ch)

    async def unlisten(self, sub: _Sub) -> None:
        kind, _, name = self._plan(sub.pattern)
        table = self._classic if kind == "b" else self._chans
        ch = table.get(name)
        if ch is None:
            return
        ch.routes = [(p, s) for p, s in ch.routes if s is not sub]
        if ch.routes:
            return
        del table[name]
        link = self._masters.get(ch.node or "")
        if link is not None and link.conn is not None and not link.conn.lost:
            if kind == "b":
                link.conn.send_raw(pack(b"UNSUBSCRIBE", name))
            else:
                link.leaving[name] = link.leaving.get(name, 0) + 1
                link.conn.send_raw(pack(b"SUNSUBSCRIBE", name))
        if kind == "t" or not self.t._connected or self.t._closing:
            return
        try:
            if kind == "p":
                await self.script(b"d", ch.ns + b"patterns", ch.field, ns=ch.ns)
            else:
                await self._lease_broad([ch.field], [ch.pattern.encode()], drop=True)
        except (ConnectionLost, ReplyError) as exc:
            log.debug("dropping the lease of %r: %r (it runs out by itself)", ch.pattern, exc)

    async def _barrier_for(self, channels: Iterable[_Channel]) -> None:
        """Wait until everything executed so far reached these channels' links."""
        waits: list[Awaitable[None]] = []
        nodes: set[str] = set()
        classic = False
        for ch in channels:
            if ch.kind == "b":
                classic = True
            elif ch.node is not None:
                nodes.add(ch.node)
        for name in nodes:
            link = self._masters.get(name)
            if link is None:
                raise ConnectionLost(f"the pub/sub link to {name} is down")
            waits.append(self._link_sync(link, []))
        if classic:
            waits.append(self._classic_barrier())
        await asyncio.gather(*waits)

    async def barrier(self, sub: _Sub | None = None) -> None:
        """Wait until everything run so far reached ``sub``'s channel (or every channel)."""
        if sub is not None:
            kind, _, name = self._plan(sub.pattern)
            ch = (self._classic if kind == "b" else self._chans).get(name)
            if ch is not None:
                await self._barrier_for([ch])
                return
        await self._barrier_for([*self._chans.values(), *self._classic.values()])
