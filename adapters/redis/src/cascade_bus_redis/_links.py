"""The two parts a Redis transport composes, and what both kinds of links share.

`RedisTransport` holds one `Links` (its connections: the standalone server's command and
pub/sub pair, or a Redis Cluster's client and pub/sub link per master) and one `Publisher` (how
publishes reach Redis: batched script calls on the command connection, or cluster pipelines
from a sender task). Everything else (retained windows, streams, acks, reconnect) is written once
in the transport's layers and reaches Redis through these two. `Flow` and `SyncPoints` are the
pub/sub mechanisms both links share.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, Protocol

from cascade_bus.spi import MessageSink, Waiters

from . import _errors as errors
from ._inbound import Junk, Tokens
from ._resp import RespConnection, RespLost, pack

if TYPE_CHECKING:
    from ._acks import _Stream
    from ._resp import ReplyError
    from ._retained import _Sub

__all__ = ["Flow", "Links", "Publisher", "SyncPoints"]


class Links(Protocol):
    """The connections of one transport and the subscriptions that live on them."""

    lost: asyncio.Event
    """Set once a connection of the current set dropped (replaced by each `open`)."""
    retry_codes: frozenset[str]
    """Error codes after which a stream reader reconnects instead of failing."""

    async def open(self) -> None:
        """Connect (again), load the script, renew every native subscription (and lease)."""

    def abort(self) -> BaseException | None:
        """Drop every connection; return why the first lost one was lost."""

    def ready(self) -> bool:
        """True while commands can be sent."""

    async def close(self) -> None:
        """Close every connection (``aclose``, or a failed first ``connect``)."""

    async def call(self, *args: bytes) -> Any:
        """Run one command; its reply."""

    async def script(self, op: bytes, *args: bytes, ns: bytes | None = None) -> Any:
        """Run one operation of the adapter's script in namespace ``ns``."""

    async def reload_script(self) -> None:
        """Load the script again (a restart or SCRIPT FLUSH dropped it)."""

    def namespace(self, pattern: str) -> bytes:
        """The script namespace of a stream subscription's pattern."""

    async def open_stream(self, stream: _Stream) -> RespConnection:
        """Open the connection a stream subscription reads on."""

    async def on_redirect(self, error: ReplyError) -> None:
        """A stream command was redirected (MOVED, ASK...)."""

    def check_subscribe(self, pattern: str, qos: int, queue: str | None) -> None:
        """Refuse (`UnsupportedFeature`) a subscription these links cannot serve."""

    async def listen(self, sub: _Sub) -> None:
        """Subscribe ``sub`` natively; return once the server confirmed it."""

    async def unlisten(self, sub: _Sub) -> None:
        """Drop ``sub``'s share of its native subscriptions."""

    async def snapshot(self, pattern: str) -> dict[str, tuple[int, bytes]]:
        """The retained messages matching ``pattern``, with their sequence numbers."""

    async def barrier(self, sub: _Sub | None = None) -> None:
        """Wait until everything published before reached ``sub``'s (or every) connection."""

    def pings(self) -> list[Awaitable[Any]]:
        """One heartbeat's PINGs (a silent connection fails them)."""

    def after_heartbeat(self) -> None:
        """Periodic upkeep after a heartbeat (renewing pattern leases)."""

    def xack(self, key: bytes, ids: list[bytes]) -> asyncio.Future[Any]:
        """Send one XACK; its future (a failure may be its result or its exception)."""

    async def leave(self, stream_leaves: list[tuple[bytes, tuple[bytes, ...]]]) -> None:
        """While closing: end these stream routes ``(namespace, script args)`` and leases."""

    def fail_sync(self, error: BaseException) -> None:
        """Fail every barrier and PING waiting on these connections."""

    def tasks(self) -> list[asyncio.Task[Any]]:
        """The background tasks ``aclose`` cancels first (flow control, lease renewal)."""


class Publisher(Protocol):
    """How publishes reach Redis (the send hot path) and what happens to them on a loss."""

    def send(
        self,
        topic: str,
        data: bytes,
        qos: int,
        retain: bool,
        headers: Any,
        reply_to: str | None = None,
    ) -> Awaitable[None] | None:
        """`Transport.send` (bound as the transport's ``send`` at construction)."""

    async def flush(self, timeout: float) -> None:
        """`Transport.flush`."""

    def start(self) -> None:
        """Connected for the first time: start the background work (a sender task)."""

    def state_changed(self) -> None:
        """The connection state changed: wake whoever waits on it."""

    def take_inflight(self) -> None:
        """The connection dropped: requeue the unanswered QoS 1 publishes, count QoS 0 ones."""

    def resend_offline(self) -> None:
        """Reconnected: send what the offline buffer holds, in order."""

    def fail_offline(self, error: BaseException) -> None:
        """No reconnect will come: every held (and queued) publish fails."""

    async def drain(self) -> None:
        """While closing and connected: wait until everything queued was sent."""

    async def stop(self, error: BaseException) -> None:
        """Closed: stop the background work; settle what was never answered with ``error``."""


class Flow:
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


class SyncPoints:
    """Our own tokens coming back (barrier messages, PONGs), each awaited in a `Waiters`."""

    __slots__ = ("barriers", "junk", "pongs", "tokens")

    def __init__(self, tokens: Tokens, junk: Junk) -> None:
        self.tokens = tokens
        self.junk = junk
        self.barriers = Waiters()
        self.pongs = Waiters()

    def expect(self, waiters: Waiters) -> tuple[bytes, asyncio.Future[None]]:
        """A new token and the future its return settles (`discard` it when done waiting)."""
        token = b"%d" % next(self.tokens)
        return token, waiters.add(token)

    async def ping(self, conn: RespConnection, commands: list[bytes]) -> None:
        """Send ``commands`` on a pub/sub connection, then a PING: its PONG proves they ran.

        Raises:
            ConnectionLost: the connection dropped first.
        """
        token, fut = self.expect(self.pongs)
        try:
            for command in commands:
                conn.send_raw(command)
            conn.send_raw(pack(b"PING", token))
            await fut
        except RespLost as exc:
            raise errors.lost(exc) from exc
        finally:
            self.pongs.discard(token)

    def barrier(self, token: bytes) -> None:
        """A token on this bus's barrier channel: ours (maybe late), or junk from a client."""
        if not self.barriers.arrived(token) and not self.tokens.issued(token):
            self.junk("the barrier channel", token[:64])

    def fail(self, error: BaseException) -> None:
        """Fail every waiter (the connection they wait on is gone)."""
        self.barriers.fail_all(error)
        self.pongs.fail_all(error)
