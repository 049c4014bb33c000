"""The pub/sub connection: channels and globs, pushes, retained markers, barriers, flow control.

One SUBSCRIBE (exact topic) or PSUBSCRIBE (glob, exact filter in `_dispatch`) per native
subscription, shared by every subscription that needs it (`_Native.routes`). The control channel
carries the publish script's retained markers (``r<seq>`` just before a retained publish's
message, ``e`` just after it); this bus's barrier channel carries its own barrier tokens. A PING
after (P)SUBSCRIBE commands proves they took effect (its PONG comes back on this connection). A
full sink stops the parsing of the connection until it has room again (`_Flow`).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

from cascade_bus.spi import BusURL, MessageSink, topic_matches

from . import _errors as errors
from ._connection import TOPIC_CACHE, log
from ._inbound import decode_topic, parse_seq
from ._resp import RespConnection, RespLost, pack
from ._retained import Retained, _Sub
from ._topics import native_subscriptions

__all__ = ["PubSub"]


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
        spawn: Callable[[Coroutine[Any, Any, None], str], asyncio.Task[None]],
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


class PubSub(Retained):
    """The pub/sub connection's subscriptions and everything that arrives on it."""

    def __init__(self, url: BusURL, options: Mapping[str, Any]) -> None:
        super().__init__(url, options)
        self._channel_topics: dict[bytes, str] = {}
        self._channels: dict[bytes, _Native] = {}
        self._globs: dict[bytes, _Native] = {}
        self._seq: int | None = None
        self._seq_channel: bytes | None = None  # the channel the marker's message came on
        self._barriers: dict[bytes, asyncio.Future[None]] = {}
        self._pongs: dict[bytes, asyncio.Future[None]] = {}
        self._flow = _Flow()

    def _resubscribe_commands(self) -> list[bytes]:
        """The commands that renew every native subscription on a new pub/sub connection."""
        commands = [pack(b"SUBSCRIBE", self._ctl, self._barrier_channel)]
        if self._channels:
            commands.append(pack(b"SUBSCRIBE", *self._channels))
        if self._globs:
            commands.append(pack(b"PSUBSCRIBE", *self._globs))
        return commands

    # -- receiving -------------------------------------------------------------------------------

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
            if len(self._channel_topics) >= TOPIC_CACHE:
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

    # -- sync points -----------------------------------------------------------------------------

    async def _pubsub_sync(self, commands: list[bytes]) -> None:
        """Send (P)SUBSCRIBE commands, then a PING; its PONG proves they all took effect."""
        pubsub = self._pubsub
        if pubsub is None or pubsub.lost:
            raise errors.not_connected(self.url.endpoint())
        token = b"%d" % next(self._tokens)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pongs[token] = fut
        try:
            for command in commands:
                pubsub.send_raw(command)
            pubsub.send_raw(pack(b"PING", token))
            await fut
        except RespLost as exc:
            raise errors.lost(exc) from exc
        finally:
            self._pongs.pop(token, None)

    async def _ping_pubsub(self) -> None:
        await self._pubsub_sync([])

    async def _barrier(self) -> None:
        """PUBLISH a token to our own channel and wait for it: everything before has arrived."""
        cmd = self._cmd
        if cmd is None or cmd.lost:
            raise errors.not_connected(self.url.endpoint())
        token = b"%d" % next(self._tokens)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._barriers[token] = fut
        try:
            cmd.send(pack(b"PUBLISH", self._barrier_channel, token), None)
            await fut
        finally:
            self._barriers.pop(token, None)

    # -- subscribing -----------------------------------------------------------------------------

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
