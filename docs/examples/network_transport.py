"""A toy network transport on the adapter kit: Redis pub/sub, spoken directly (``resptoy://``).

It writes only what is particular to its broker (two connections, the RESP wire); reconnecting,
the offline buffer, owned tasks and option parsing come from `cascade_bus.spi`, so it keeps the
same guarantees as the first-party transports and passes the shared fault suite.
"""

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Mapping
from typing import Any, ClassVar
from urllib.parse import urlsplit

import cascade_bus
from cascade_bus import ConnectError, ConnectionLost, InvalidURL
from cascade_bus.spi import (
    NETWORK_OPTIONS,
    BusURL,
    Capabilities,
    Message,
    MessageSink,
    NetworkOptions,
    NetworkTransport,
    OfflineBuffer,
    Outgoing,
    Supervisor,
    TaskSet,
    TransportSubscription,
)

PREFIX = "resptoy:"  # channel = prefix + portable topic
_GLOB_SPECIAL = str.maketrans({c: "\\" + c for c in "*?[]\\"})


def glob_for(pattern: str) -> str:
    """A Redis glob at least as broad as a portable pattern (the bus filters exactly)."""
    levels = [
        "*" if level in ("+", "#") else level.translate(_GLOB_SPECIAL)
        for level in pattern.split("/")
    ]
    glob = "/".join(levels)
    if pattern.endswith("/#"):  # `a/#` also matches `a` itself
        glob = glob[: -len("/*")] + "*"
    return PREFIX + glob


def command(*parts: str | bytes) -> bytes:
    """Encode one RESP command (an array of bulk strings)."""
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


async def read_reply(reader: asyncio.StreamReader) -> Any:
    """Read one RESP2 reply: simple string, error, integer, bulk string or array."""
    line = await reader.readuntil(b"\r\n")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest
    if kind == b"-":
        raise ConnectionLost(f"the server answered an error: {rest.decode(errors='replace')}")
    if kind == b":":
        return int(rest)
    if kind == b"$":
        size = int(rest)
        return None if size < 0 else (await reader.readexactly(size + 2))[:-2]
    if kind == b"*":
        return [await read_reply(reader) for _ in range(int(rest))]
    raise ConnectionLost(f"unexpected RESP reply {line[:20]!r}")


class ToySubscription(TransportSubscription):
    """One sink on one pattern."""

    def __init__(self, transport: "RespToyTransport", pattern: str, sink: MessageSink) -> None:
        self._transport, self._pattern, self._sink = transport, pattern, sink

    async def unsubscribe(self) -> None:
        """Stop delivering to the sink (the glob stays subscribed: harmless); idempotent."""
        sinks = self._transport._sinks.get(self._pattern, [])
        if self._sink in sinks:
            sinks.remove(self._sink)


class RespToyTransport(NetworkTransport):
    """QoS 0 pub/sub over a Redis server, reconnecting through the kit."""

    capabilities = Capabilities(max_qos=0, retain=False, wildcards=True, headers=False)
    package: ClassVar[str] = "resptoy-transport"
    filters_exactly: ClassVar[bool] = False  # Redis globs are broader than `+`: the bus filters

    def __init__(self, url: BusURL, options: Mapping[str, Any]) -> None:
        super().__init__(url, options)
        unknown = set(self.options) - NETWORK_OPTIONS
        if unknown:
            raise InvalidURL(f"unknown resptoy option(s): {', '.join(sorted(unknown))}")
        self._net = NetworkOptions.parse(self.options, scheme=url.scheme, tls=False)
        self._offline = OfflineBuffer(self._net.offline_buffer, self.stats, url.endpoint())
        self._tasks = TaskSet("resptoy")
        self._supervisor = Supervisor(self, self, self._net)
        self._sinks: dict[str, list[MessageSink]] = {}  # portable pattern -> sinks
        self._patterns: dict[bytes, str] = {}  # Redis glob -> portable pattern
        self._pub: asyncio.StreamWriter | None = None
        self._sub: asyncio.StreamWriter | None = None
        self._lost: asyncio.Future[BaseException | None] | None = None
        self._confirmed: asyncio.Queue[None] = asyncio.Queue()
        self._pongs: list[asyncio.Future[None]] = []  # flush(): replies come in order

    # -- the steps the kit's Supervisor drives (the `Reconnectable` protocol) ------------------

    async def reopen(self) -> None:
        """Open both connections and subscribe every channel again."""
        host, port = self.url.host or "127.0.0.1", self.url.port or 6379
        try:
            pub_reader, self._pub = await asyncio.open_connection(host, port)
            sub_reader, self._sub = await asyncio.open_connection(host, port)
        except OSError as exc:
            raise ConnectError(f"could not connect to {self.url.endpoint()}: {exc}") from exc
        # One future per connection pair: a reader of an older pair cannot end this one.
        self._lost = lost = asyncio.get_running_loop().create_future()
        self._confirmed = asyncio.Queue()
        self._pongs = []  # a flush() waiting on the old connection times out
        self._tasks.spawn(self._drain_replies(pub_reader, lost), "replies")
        self._tasks.spawn(self._receive(sub_reader, lost), "receive")
        for pattern in self._sinks:
            await self._subscribe_pattern(pattern)

    async def wait_lost(self) -> BaseException | None:
        """Return when a reader found its connection gone."""
        assert self._lost is not None
        return await asyncio.shield(self._lost)

    async def on_lost(self, cause: BaseException | None) -> None:
        """Close what is left of both connections."""
        await self.abandon()

    async def abandon(self) -> None:
        """Close the connections of a failed or lost attempt."""
        for writer in (self._pub, self._sub):
            if writer is not None:
                writer.close()
        self._pub = self._sub = None

    async def restore(self) -> None:
        """Send what was published while down, in order."""
        while self._offline and self._pub is not None:
            out = self._offline.popleft()
            self._pub.write(command("PUBLISH", PREFIX + out.topic, out.data))

    async def give_up(self, cause: BaseException | None) -> None:
        """Reconnect is off: nothing held will ever be sent."""
        self._offline.fail_all(ConnectionLost(f"lost {self.url.endpoint()} for good"))

    # -- the Transport SPI ---------------------------------------------------------------------

    async def connect(self) -> None:
        """Connect, then let the supervisor watch the connection."""
        await self.reopen()
        self._set_connected(True)
        self._tasks.spawn(self._supervisor.run(), "supervisor")

    async def aclose(self) -> None:
        """Stop the supervisor and the readers; idempotent."""
        if self.connected and not self._closed:
            with contextlib.suppress(OSError, TimeoutError):
                await self.flush(5.0)  # everything published so far reaches the server
        self._closed = self._supervisor.closing = True
        await self.abandon()
        await self._tasks.aclose()
        self._set_connected(False)

    def send(
        self,
        topic: str,
        data: bytes,
        qos: int,
        retain: bool,
        headers: Mapping[str, str] | None,
        reply_to: str | None = None,
    ) -> Awaitable[None] | None:
        """Write a PUBLISH, or hold it while disconnected (the kit's one policy); never waits."""
        if not self.connected or self._pub is None:
            self._offline.hold(Outgoing(topic, data, qos, retain), reconnecting=self._net.reconnect)
            return None
        self._pub.write(command("PUBLISH", PREFIX + topic, data))
        return None

    async def subscribe(
        self, pattern: str, sink: MessageSink, *, qos: int = 0, queue: str | None = None
    ) -> TransportSubscription:
        """PSUBSCRIBE the pattern's glob (once per pattern) and wait for the confirmation."""
        first = pattern not in self._sinks
        self._sinks.setdefault(pattern, []).append(sink)
        self._patterns[glob_for(pattern).encode()] = pattern
        if first and self.connected:
            await self._subscribe_pattern(pattern)
        return ToySubscription(self, pattern, sink)

    async def flush(self, timeout: float) -> None:
        """Wait until the server answered everything published so far (a PING behind it)."""
        async with asyncio.timeout(timeout):
            await self._offline.wait_empty()
            if self._pub is not None:
                pong = asyncio.get_running_loop().create_future()
                self._pongs.append(pong)
                self._pub.write(command("PING"))
                await pong

    # -- the wire ------------------------------------------------------------------------------

    async def _subscribe_pattern(self, pattern: str) -> None:
        assert self._sub is not None
        self._sub.write(command("PSUBSCRIBE", glob_for(pattern)))
        async with asyncio.timeout(5.0):
            await self._confirmed.get()

    @staticmethod
    def _gone(lost: "asyncio.Future[BaseException | None]", exc: BaseException) -> None:
        if not lost.done():
            lost.set_result(exc)

    async def _drain_replies(
        self, reader: asyncio.StreamReader, lost: "asyncio.Future[BaseException | None]"
    ) -> None:
        try:
            while True:
                if await read_reply(reader) == b"PONG" and self._pongs:  # else a PUBLISH count
                    pong = self._pongs.pop(0)
                    if not pong.done():
                        pong.set_result(None)
        except (OSError, asyncio.IncompleteReadError, ConnectionLost) as exc:
            self._gone(lost, exc)

    async def _receive(
        self, reader: asyncio.StreamReader, lost: "asyncio.Future[BaseException | None]"
    ) -> None:
        try:
            while True:
                reply = await read_reply(reader)
                if reply[0] == b"psubscribe":
                    self._confirmed.put_nowait(None)
                elif reply[0] == b"pmessage" and reply[2].startswith(PREFIX.encode()):
                    topic = reply[2][len(PREFIX) :].decode()
                    pattern = self._patterns.get(reply[1], "")
                    for sink in list(self._sinks.get(pattern, ())):
                        if not sink.deliver(Message(topic, reply[3])):
                            await sink.ready()  # flow control
        except (OSError, asyncio.IncompleteReadError, ConnectionLost) as exc:
            self._gone(lost, exc)


async def main() -> None:
    """Register ``resptoy://`` and use it on the Redis server of ``CASCADE_BUS_REDIS_URL``."""
    redis_url = urlsplit(os.environ.get("CASCADE_BUS_REDIS_URL", "redis://127.0.0.1:6379"))
    cascade_bus.register_transport("resptoy", RespToyTransport)
    try:
        url = f"resptoy://{redis_url.hostname}:{redis_url.port or 6379}"
        async with cascade_bus.connect(url) as bus:
            async with bus.subscribe("toy/+/state") as sub:
                await bus.publish("toy/run-1/state", {"state": "running"})
                env = await sub.get(timeout=5.0)
                print("resptoy delivered:", env.topic, env.payload)
            print("reconnects so far:", bus.stats().reconnects)
    finally:
        cascade_bus.unregister_transport("resptoy")


if __name__ == "__main__":
    asyncio.run(main())
