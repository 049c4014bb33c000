"""A small pipelined RESP2 connection on asyncio, parsed by hiredis (redis-py's C parser).

Why not redis-py's client objects on the hot path: every redis-py command is its own coroutine
with its own write and read (pipelines batch, but only commands the caller collected itself),
and its PubSub reads one message per ``await``. The bus needs something else: publishes issued
by unrelated tasks in the same loop iteration must share one socket write (and one script call),
replies must resolve their waiters in FIFO order from one ``data_received`` call, and a full
subscription must be able to stop the parsing of pub/sub pushes without losing the bytes already
read (flow control). That is this class: a write buffer flushed once per loop iteration (or when
it grows large), a ``before_write`` hook through which the owner appends what it batched itself
(in order with every other command), a FIFO of reply waiters, an optional push handler for
pub/sub connections, and ``hold``/``release`` to pause parsing. docs/transports/redis.md ("Why
its own RESP client") has the measurements against redis-py's ``Connection``.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections import deque
from collections.abc import Callable
from typing import Any

import hiredis

__all__ = ["ReplyError", "RespConnection", "RespLost", "pack"]

#: Seconds a TLS handshake may take (rediss://); on loopback or a LAN it takes milliseconds.
TLS_HANDSHAKE_TIMEOUT = 3.0

_FLUSH_BYTES = 256 * 1024  # write at once when this much is buffered
_WRITE_HIGH = 4 * 1024 * 1024  # asyncio write-buffer high-water mark


class ReplyError(Exception):
    """An error reply from Redis (``-ERR ...``, ``-NOSCRIPT ...``, ``-NOPERM ...``)."""

    @property
    def code(self) -> str:
        """The error's first word (``ERR``, ``NOSCRIPT``, ``WRONGPASS``, ...)."""
        text = str(self.args[0]) if self.args else ""
        return text.split(" ", 1)[0]


class RespLost(ConnectionError):
    """The connection closed before the reply arrived."""


def pack(*args: bytes | str | int) -> bytes:
    """Encode one command in RESP2 (arguments as bytes, str or int)."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, str):
            arg = arg.encode()
        elif isinstance(arg, int):
            arg = b"%d" % arg
        out.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(out)


class _Protocol(asyncio.Protocol):
    __slots__ = ("conn",)

    def __init__(self, conn: RespConnection) -> None:
        self.conn = conn

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.conn._made(transport)

    def data_received(self, data: bytes) -> None:
        self.conn._received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.conn._lost(exc)

    def pause_writing(self) -> None:
        self.conn._write_paused = True

    def resume_writing(self) -> None:
        self.conn._resume_writing()


#: What a waiter in the FIFO may be: a future (resolved with the reply), None (the reply is
#: ignored unless it is an error, then ``on_orphan`` sees it), or any object the owner resolves
#: itself through ``on_reply``.
Waiter = Any


class RespConnection:
    """One Redis connection: pipelined commands with FIFO replies, or a pub/sub push stream.

    Args:
        name: For messages (endpoint and role, never credentials).
        on_push: Pub/sub mode: every reply goes here instead of to a waiter.
        on_push_error: Called with the reply and the exception when ``on_push`` raised; the
            connection then goes on with the next reply (one bad push never costs the link).
        on_reply: Called as ``on_reply(waiter, reply)`` for waiters that are neither futures
            nor None.
        on_orphan: Called with error replies whose waiter is None.
        on_lost: Called once with the exception (or None) when the connection is gone.
    """

    def __init__(
        self,
        name: str,
        *,
        on_push: Callable[[Any], None] | None = None,
        on_push_error: Callable[[Any, Exception], None] | None = None,
        on_reply: Callable[[Waiter, Any], None] | None = None,
        on_orphan: Callable[[ReplyError], None] | None = None,
        on_lost: Callable[[BaseException | None], None] | None = None,
    ) -> None:
        self.name = name
        self._reader = hiredis.Reader(replyError=ReplyError)
        self._waiters: deque[Waiter] = deque()
        self._out: list[bytes] = []
        self._out_size = 0
        self._flush_handle: asyncio.Handle | None = None
        self._transport: asyncio.Transport | None = None
        self._on_push: Callable[[Any], None] | None = None  # set once the handshake is done
        self._push_handler = on_push
        self._on_push_error = on_push_error
        self._on_reply = on_reply
        self._on_orphan = on_orphan
        self._on_lost = on_lost
        self._held = False
        self._write_paused = False
        self._writable: asyncio.Future[None] | None = None
        self._closed_fut: asyncio.Future[None] | None = None
        self.lost = False
        self.lost_cause: BaseException | None = None
        #: Called before anything is queued or written, so that the owner can first append the
        #: commands it batched itself (it must not recurse: clear its batch before `send`).
        self.before_write: Callable[[], None] | None = None

    def __repr__(self) -> str:
        state = "lost" if self.lost else "open" if self._transport else "new"
        return f"<RespConnection {self.name} {state} waiters={len(self._waiters)}>"

    # -- opening -------------------------------------------------------------------------------

    async def open(
        self,
        host: str,
        port: int,
        *,
        tls: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        username: str | None = None,
        password: str | None = None,
        db: int = 0,
        client_name: str | None = None,
    ) -> None:
        """Connect and run the handshake (AUTH, SELECT, CLIENT SETNAME) in one round trip.

        Raises:
            OSError: the TCP/TLS connection failed.
            ReplyError: the server refused the credentials, the database or the name.
        """
        loop = asyncio.get_running_loop()
        self._closed_fut = loop.create_future()
        transport, _ = await loop.create_connection(
            lambda: _Protocol(self),
            host,
            port,
            ssl=tls,
            server_hostname=(server_hostname or host) if tls is not None else None,
            # A plain Redis never answers a ClientHello (it waits for the rest of an inline
            # command): fail in seconds, not at the whole connect timeout.
            ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT if tls is not None else None,
        )
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            except OSError:  # pragma: no cover - exotic sockets
                pass
        calls: list[asyncio.Future[Any]] = []
        if password is not None or username is not None:
            if username:
                calls.append(self.call(b"AUTH", username, password or ""))
            else:
                calls.append(self.call(b"AUTH", password or ""))
        if db:
            calls.append(self.call(b"SELECT", db))
        if client_name:
            calls.append(self.call(b"CLIENT", b"SETNAME", client_name))
        if calls:
            results = await asyncio.gather(*calls, return_exceptions=True)
            for result in results:
                if isinstance(result, BaseException):
                    raise result
        self._on_push = self._push_handler

    def _made(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        transport.set_write_buffer_limits(high=_WRITE_HIGH)

    # -- writing -------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """True while the socket is open."""
        return self._transport is not None and not self.lost

    @property
    def pending(self) -> int:
        """Commands sent (or buffered) whose replies have not arrived yet."""
        return len(self._waiters)

    def send(self, packed: bytes, waiter: Waiter = None) -> None:
        """Queue one packed command; it is written with everything else queued this iteration.

        Raises:
            RespLost: the connection is gone.
        """
        if self.lost or self._transport is None:
            raise RespLost(f"connection to {self.name} is closed")
        if self.before_write is not None:
            self.before_write()
        self._waiters.append(waiter)
        self._out.append(packed)
        self._out_size += len(packed)
        if self._out_size >= _FLUSH_BYTES:
            self.flush()
        elif self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_soon(self.flush)

    def schedule_flush(self) -> None:
        """Make sure a flush runs at the end of this loop iteration (``before_write`` included)."""
        if self._flush_handle is None and not self.lost:
            self._flush_handle = asyncio.get_running_loop().call_soon(self.flush)

    def call(self, *args: bytes | str | int) -> asyncio.Future[Any]:
        """Send a command; the future resolves with its reply (or ReplyError / RespLost)."""
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.send(pack(*args), fut)
        return fut

    def send_raw(self, packed: bytes) -> None:
        """Write a command whose reply is not awaited in FIFO (pub/sub mode only)."""
        if self.lost or self._transport is None:
            raise RespLost(f"connection to {self.name} is closed")
        if self.before_write is not None:
            self.before_write()
        self._out.append(packed)
        self._out_size += len(packed)
        self.flush()

    def flush(self) -> None:
        """Write everything queued now (first asking the owner for its batch)."""
        if self.before_write is not None and not self.lost:
            self.before_write()
        handle = self._flush_handle
        if handle is not None:  # this call, or one `before_write` scheduled: done now
            handle.cancel()
            self._flush_handle = None
        if not self._out:
            return
        data = b"".join(self._out) if len(self._out) > 1 else self._out[0]
        self._out.clear()
        self._out_size = 0
        transport = self._transport
        if transport is not None and not self.lost:
            transport.write(data)

    @property
    def write_paused(self) -> bool:
        """True while the socket's write buffer is above its high-water mark."""
        return self._write_paused

    async def wait_writable(self) -> None:
        """Wait until the write buffer drained below its low-water mark (or the link died)."""
        if not self._write_paused or self.lost:
            return
        if self._writable is None or self._writable.done():
            self._writable = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._writable)

    def _resume_writing(self) -> None:
        self._write_paused = False
        fut = self._writable
        if fut is not None and not fut.done():
            fut.set_result(None)

    # -- reading -------------------------------------------------------------------------------

    def _received(self, data: bytes) -> None:
        self._reader.feed(data)
        if not self._held:
            self._process()

    def _process(self) -> None:
        reader = self._reader
        push = self._on_push
        if push is not None:
            while not self._held:
                reply = reader.gets()
                if reply is False:
                    return
                try:
                    push(reply)
                except Exception as exc:  # a bug or junk: never drop the link (and the rest)
                    if self._on_push_error is None:
                        raise
                    self._on_push_error(reply, exc)
            return
        waiters = self._waiters
        on_reply = self._on_reply
        while True:
            reply = reader.gets()
            if reply is False:
                break
            if not waiters:  # a reply nobody asked for: protocol confusion, drop the link
                self.abort()
                return
            waiter = waiters.popleft()
            if waiter is None:
                if type(reply) is ReplyError and self._on_orphan is not None:
                    self._on_orphan(reply)
            elif type(waiter) is asyncio.Future:
                if not waiter.done():
                    if type(reply) is ReplyError:
                        waiter.set_exception(reply)
                    else:
                        waiter.set_result(reply)
            elif on_reply is not None:
                on_reply(waiter, reply)

    def hold(self) -> None:
        """Stop parsing (and reading) until `release`; bytes already read stay buffered."""
        if self._held:
            return
        self._held = True
        transport = self._transport
        if transport is not None and not self.lost:
            transport.pause_reading()

    def release(self) -> None:
        """Resume parsing what is buffered, then reading from the socket."""
        if not self._held:
            return
        self._held = False
        self._process()
        transport = self._transport
        if not self._held and transport is not None and not self.lost:
            transport.resume_reading()

    # -- closing -------------------------------------------------------------------------------

    def take_waiters(self) -> list[Waiter]:
        """Remove and return every waiter still queued (after the connection was lost)."""
        waiters = list(self._waiters)
        self._waiters.clear()
        return waiters

    def _lost(self, exc: Exception | None) -> None:
        if self.lost:
            return
        self.lost = True
        self.lost_cause = exc
        self._out.clear()
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        error = RespLost(f"lost the connection to {self.name}" + (f": {exc}" if exc else ""))
        for waiter in self._waiters:
            if type(waiter) is asyncio.Future and not waiter.done():
                waiter.set_exception(error)
                waiter.exception()  # retrieved: whoever awaits it still gets it
        fut = self._writable
        if fut is not None and not fut.done():
            fut.set_result(None)
        if self._closed_fut is not None and not self._closed_fut.done():
            self._closed_fut.set_result(None)
        if self._on_lost is not None:
            self._on_lost(exc)

    def abort(self) -> None:
        """Drop the connection at once (no flush)."""
        transport = self._transport
        if transport is not None:
            transport.abort()
        elif not self.lost:
            self._lost(None)

    async def aclose(self, timeout: float = 2.0) -> None:
        """Write what is queued, close the socket, and wait (bounded) until it is closed."""
        transport = self._transport
        if transport is None or self.lost:
            if not self.lost:
                self._lost(None)
            return
        self.flush()
        transport.close()
        closed = self._closed_fut
        if closed is not None:
            try:
                async with asyncio.timeout(timeout):
                    await asyncio.shield(closed)
            except TimeoutError:
                transport.abort()
