"""A standalone server's links: one command connection and one pub/sub connection.

One SUBSCRIBE (exact topic) or PSUBSCRIBE (glob, exact filter in `_dispatch`) per native
subscription, shared by every subscription that needs it (`_Native.routes`). The control channel
carries the publish script's retained markers (``r<seq>`` just before a retained publish's
message, ``e`` just after it); this bus's barrier channel carries its own barrier tokens. A PING
after (P)SUBSCRIBE commands proves they took effect (its PONG comes back on this connection). A
full sink stops the parsing of the connection until it has room again (`Flow`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

from cascade_bus import ConnectionLost
from cascade_bus.spi import MessageSink, topic_matches

from . import _errors as errors
from ._acks import GROUP
from ._connection import TOPIC_CACHE, log
from ._inbound import decode_topic, parse_seq
from ._links import Flow, SyncPoints
from ._resp import ReplyError, RespConnection, RespLost, pack
from ._script import SCRIPT
from ._topics import native_subscriptions

if TYPE_CHECKING:
    from ._acks import _Stream
    from ._publishing import BatchPublisher
    from ._retained import _Sub
    from ._transport import RedisTransport

__all__ = ["NodeLinks"]


class _Native:
    """One SUBSCRIBE or PSUBSCRIBE on the pub/sub connection and the routes it feeds."""

    __slots__ = ("kind", "name", "routes")

    def __init__(self, kind: str, name: bytes) -> None:
        self.kind = kind
        self.name = name
        self.routes: list[tuple[str | None, _Sub]] = []


class NodeLinks:
    """The command and pub/sub connections to one server, and what arrives on them."""

    retry_codes: frozenset[str] = frozenset()

    def __init__(self, transport: RedisTransport) -> None:
        self.t = transport
        self.publisher: BatchPublisher | None = None  # set by the transport
        self.cmd: RespConnection | None = None
        self.pubsub: RespConnection | None = None
        self.lost = asyncio.Event()
        self.sha = b""
        self._endpoint = transport.url.endpoint()
        self._prefix = transport._prefix
        self._ctl = transport._ctl
        self._barrier_channel = transport._barrier_channel
        self._junk = transport._junk
        self._sync = SyncPoints(transport._tokens, transport._junk)
        self._channel_topics: dict[bytes, str] = {}
        self._channels: dict[bytes, _Native] = {}
        self._globs: dict[bytes, _Native] = {}
        self._seq: int | None = None
        self._seq_channel: bytes | None = None  # the channel the marker's message came on
        self._flow = Flow()

    # -- connections -----------------------------------------------------------------------------

    async def open(self) -> None:
        """Open the command and pub/sub connections, load the script, (re)subscribe."""
        t, publisher = self.t, self.publisher
        assert publisher is not None
        self.lost = lost = asyncio.Event()

        def on_lost(exc: BaseException | None) -> None:
            lost.set()
            if lost is self.lost:  # not an older pair's late callback
                # A resync waiting on a barrier of this pair would otherwise wait for ever
                # (the supervisor fails them only once it runs again).
                t._fail_sync(ConnectionLost(f"lost the connection to {self._endpoint}"))

        cmd = await t._open(
            "commands", on_reply=publisher.on_reply, on_orphan=publisher.on_orphan, on_lost=on_lost
        )
        try:
            self.set_sha(await cmd.call(b"SCRIPT", b"LOAD", SCRIPT))
            pubsub = await t._open(
                "pubsub", on_push=self._on_push, on_push_error=self._push_failed, on_lost=on_lost
            )
        except ReplyError as exc:
            cmd.abort()
            raise errors.script_refused(self._endpoint, exc) from exc
        except BaseException:
            cmd.abort()
            raise
        self.cmd, self.pubsub = cmd, pubsub
        cmd.before_write = publisher.seal
        self._seq = self._seq_channel = None
        try:
            await self._pubsub_sync(self._resubscribe_commands())
        except BaseException:
            cmd.abort()
            pubsub.abort()
            raise

    def set_sha(self, sha: bytes) -> None:
        self.sha = sha
        if self.publisher is not None:
            self.publisher.set_sha(sha)

    def abort(self) -> BaseException | None:
        cause = None
        for conn in (self.cmd, self.pubsub):
            if conn is not None:
                cause = cause or conn.lost_cause
                conn.abort()
        return cause

    def ready(self) -> bool:
        return self.cmd is not None and not self.cmd.lost and self.pubsub is not None

    async def close(self) -> None:
        for conn in (self.cmd, self.pubsub):
            if conn is not None:
                await conn.aclose()

    def tasks(self) -> list[asyncio.Task[Any]]:
        return [self._flow.task] if self._flow.task else []

    def fail_sync(self, error: BaseException) -> None:
        self._sync.fail(error)

    # -- commands --------------------------------------------------------------------------------

    async def call(self, *args: bytes) -> Any:
        """Run one command on the command connection and return its reply.

        Raises:
            ConnectionLost: not connected.
            RespLost: the connection dropped before the reply.
            ReplyError: Redis refused the command.
        """
        cmd = self.cmd
        if cmd is None or cmd.lost:
            raise errors.not_connected(self._endpoint)
        return await cmd.call(*args)

    def script_packed(self, op: bytes, *args: bytes) -> bytes:
        return pack(b"EVALSHA", self.sha, b"0", op, self._prefix, *args)

    async def script(self, op: bytes, *args: bytes, ns: bytes | None = None) -> Any:
        """Run one script operation on the command connection (reloading it once if needed).

        The standalone server has one namespace, the key prefix (``ns`` is ignored).

        Raises:
            ConnectionLost: not connected, or the connection dropped before the reply.
            ReplyError: Redis refused it.
        """
        for attempt in (1, 2):
            cmd = self.cmd
            if cmd is None or cmd.lost:
                raise errors.not_connected(self._endpoint)
            fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            cmd.send(self.script_packed(op, *args), fut)
            try:
                return await fut
            except ReplyError as exc:
                if exc.code != "NOSCRIPT" or attempt == 2:
                    raise
                await self.reload_script()
            except RespLost as exc:
                raise errors.lost(exc) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    async def reload_script(self) -> None:
        cmd = self.cmd
        if cmd is not None and not cmd.lost:
            self.set_sha(await cmd.call(b"SCRIPT", b"LOAD", SCRIPT))

    def namespace(self, pattern: str) -> bytes:
        return self._prefix

    async def open_stream(self, stream: _Stream) -> RespConnection:
        return await self.t._open("stream")

    async def on_redirect(self, error: ReplyError) -> None:
        """Never on a standalone server."""

    def check_subscribe(self, pattern: str, qos: int, queue: str | None) -> None:
        """A standalone server serves every subscription."""

    def xack(self, key: bytes, ids: list[bytes]) -> asyncio.Future[Any]:
        assert self.cmd is not None
        return self.cmd.call(b"XACK", key, GROUP, *ids)

    async def leave(self, stream_leaves: list[tuple[bytes, tuple[bytes, ...]]]) -> None:
        """Send the leave scripts, then a PING: its reply means every earlier one ran."""
        cmd = self.cmd
        if cmd is None or cmd.lost:
            return
        for _, args in stream_leaves:
            cmd.send(self.script_packed(*args), None)
        await cmd.call(b"PING")

    def pings(self) -> list[Awaitable[Any]]:
        assert self.cmd is not None
        return [self.cmd.call(b"PING"), self._pubsub_sync([])]

    def after_heartbeat(self) -> None:
        """Nothing to renew on a standalone server."""

    # -- receiving -------------------------------------------------------------------------------

    def _on_push(self, reply: Any) -> None:
        kind = reply[0]
        if kind == b"message":
            channel = reply[1]
            if channel == self._ctl:
                self._on_marker(reply[2])
                return
            if channel == self._barrier_channel:
                self._sync.barrier(reply[2])
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
            self._sync.pongs.arrived(reply[1])

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
        pubsub = self.pubsub
        if pubsub is not None:
            self._flow.hold(pubsub, sink, self.t._spawn)

    # -- sync points -----------------------------------------------------------------------------

    async def _pubsub_sync(self, commands: list[bytes]) -> None:
        """Send (P)SUBSCRIBE commands, then a PING; its PONG proves they all took effect."""
        pubsub = self.pubsub
        if pubsub is None or pubsub.lost:
            raise errors.not_connected(self._endpoint)
        await self._sync.ping(pubsub, commands)

    async def barrier(self, sub: _Sub | None = None) -> None:
        """PUBLISH a token to our own channel and wait for it: everything before has arrived."""
        cmd = self.cmd
        if cmd is None or cmd.lost:
            raise errors.not_connected(self._endpoint)
        token, fut = self._sync.expect(self._sync.barriers)
        try:
            cmd.send(pack(b"PUBLISH", self._barrier_channel, token), None)
            await fut
        finally:
            self._sync.barriers.discard(token)

    # -- subscribing -----------------------------------------------------------------------------

    def _resubscribe_commands(self) -> list[bytes]:
        """The commands that renew every native subscription on a new pub/sub connection."""
        commands = [pack(b"SUBSCRIBE", self._ctl, self._barrier_channel)]
        if self._channels:
            commands.append(pack(b"SUBSCRIBE", *self._channels))
        if self._globs:
            commands.append(pack(b"PSUBSCRIBE", *self._globs))
        return commands

    async def listen(self, sub: _Sub) -> None:
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
        await self._pubsub_sync(commands)

    async def unlisten(self, sub: _Sub) -> None:
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
        pubsub = self.pubsub
        if pubsub is not None and not pubsub.lost:
            for verb, names in unsubscribe.items():
                if names:
                    pubsub.send_raw(pack(verb, *names))

    async def snapshot(self, pattern: str) -> dict[str, tuple[int, bytes]]:
        return await self.t._read_retained(pattern, None)
