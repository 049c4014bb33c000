"""`TcpProxy`: an asyncio TCP proxy on 127.0.0.1 that cuts and refuses connections on demand."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self
from urllib.parse import urlsplit, urlunsplit

from ._addresses import LOCALHOST

__all__ = ["TcpProxy"]


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close a connection at once, with a TCP reset where possible."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError, ValueError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, OSError):
        while True:
            data = await reader.read(65536)
            if not data:
                return
            writer.write(data)
            await writer.drain()


@dataclass(eq=False)
class _Link:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter
    done: asyncio.Event = field(default_factory=asyncio.Event)


class TcpProxy:
    """An asyncio TCP proxy on 127.0.0.1 that can cut and refuse connections.

    Each accepted connection is forwarded to ``target_host:target_port``.
    ``cut()`` resets every current connection on both sides; while
    ``pause()`` is in effect new connections are accepted and immediately
    reset (existing ones keep working); ``resume()`` ends that.

    Attributes:
        target_host: Host the proxy forwards to.
        target_port: Port the proxy forwards to.
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        listen_port: int = 0,
        connect_timeout: float = 5.0,
    ) -> None:
        """Describe a proxy; call ``start()`` to listen.

        Args:
            target_host: Host to forward to.
            target_port: Port to forward to.
            listen_port: Port to listen on; 0 picks a free one.
            connect_timeout: Seconds allowed for connecting upstream.
        """
        self.target_host = target_host
        self.target_port = target_port
        self._listen_port = listen_port
        self._connect_timeout = connect_timeout
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._paused = False
        self._closing = False
        self.accepted = 0
        """Number of connections forwarded so far (refused ones excluded)."""

    @property
    def host(self) -> str:
        """Return the address the proxy listens on."""
        return LOCALHOST

    @property
    def port(self) -> int:
        """Return the port the proxy listens on.

        Raises:
            RuntimeError: If the proxy has not been started.
        """
        if self._server is None or not self._server.sockets:
            raise RuntimeError("TcpProxy is not started")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def paused(self) -> bool:
        """Return whether new connections are being refused."""
        return self._paused

    @property
    def connections(self) -> int:
        """Return the number of currently forwarded connections."""
        return len(self._links)

    def url_for(self, scheme: str) -> str:
        """Return ``scheme://127.0.0.1:<proxy port>``.

        Args:
            scheme: URL scheme, e.g. ``mqtt``.

        Returns:
            The URL pointing at the proxy.
        """
        return f"{scheme}://{self.host}:{self.port}"

    def rewrite(self, url: str) -> str:
        """Return ``url`` with its host and port replaced by the proxy's.

        Scheme, user info, path and query are kept.

        Args:
            url: A broker URL, e.g. ``redis://user:pw@127.0.0.1:6379/0``.

        Returns:
            The same URL pointing at the proxy.
        """
        parts = urlsplit(url)
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = f"{userinfo}@" if userinfo else ""
        netloc += f"{self.host}:{self.port}"
        return urlunsplit(parts._replace(netloc=netloc))

    def __repr__(self) -> str:
        """Return a short description of the proxy."""
        where = f"{self.host}:{self.port}" if self._server is not None else "not started"
        state = " paused" if self._paused else ""
        return (
            f"<TcpProxy {where} -> {self.target_host}:{self.target_port}"
            f" connections={self.connections}{state}>"
        )

    async def start(self) -> Self:
        """Start listening.

        Returns:
            The proxy itself.
        """
        if self._server is None:
            self._closing = False
            self._server = await asyncio.start_server(self._handle, LOCALHOST, self._listen_port)
        return self

    def pause(self) -> None:
        """Reset every new connection until ``resume()``; current ones stay up."""
        self._paused = True

    def resume(self) -> None:
        """Forward new connections again."""
        self._paused = False

    async def cut(self) -> int:
        """Reset all current connections on both sides.

        Waits (at most 5 s) until the forwarding tasks have noticed.

        Returns:
            How many connections were cut.
        """
        links = list(self._links)
        for link in links:
            _abort(link.client)
            _abort(link.upstream)
        if links:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*(link.done.wait() for link in links)), 5.0)
        return len(links)

    async def aclose(self) -> None:
        """Stop listening and reset all connections."""
        self._closing = True
        server, self._server = self._server, None
        if server is not None:
            server.close()
        await self.cut()
        handlers = list(self._handlers)
        for task in handlers:
            task.cancel()
        if handlers:
            await asyncio.wait(handlers, timeout=5.0)
        if server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), 5.0)

    async def __aenter__(self) -> Self:
        """Start the proxy and return it."""
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the proxy."""
        await self.aclose()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        try:
            await self._forward(reader, writer)
        finally:
            if task is not None:
                self._handlers.discard(task)

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._paused or self._closing:
            _abort(writer)
            return
        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection(self.target_host, self.target_port),
                self._connect_timeout,
            )
        except (OSError, TimeoutError):
            _abort(writer)
            return
        if self._paused or self._closing:
            _abort(writer)
            _abort(up_writer)
            return
        with contextlib.suppress(OSError):
            for w in (writer, up_writer):
                sock = w.get_extra_info("socket")
                if sock is not None:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        link = _Link(writer, up_writer)
        self._links.add(link)
        self.accepted += 1
        pumps = [
            asyncio.create_task(_pump(reader, up_writer)),
            asyncio.create_task(_pump(up_reader, writer)),
        ]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            for w in (writer, up_writer):
                if not w.transport.is_closing():
                    w.close()
            self._links.discard(link)
            link.done.set()
