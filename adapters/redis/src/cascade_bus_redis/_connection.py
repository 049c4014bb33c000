"""The Redis transport's base: options, connection handshakes, the kit objects, shared state.

`RedisBase` is the bottom of the transport's layers (``_retained`` -> ``_acks`` -> ``_streams``
-> ``_transport``); each layer adds one concern and its own state, and reaches Redis through the
two composed parts (`Links`, `Publisher`: standalone or cluster, see ``_links``). The kit objects
(`OfflineBuffer`, `TaskSet`; the `Supervisor` in ``_transport``) are created once, at
construction, and used directly on the hot paths.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Coroutine, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from cascade_bus import BusClosed
from cascade_bus.spi import (
    BusURL,
    NetworkTransport,
    OfflineBuffer,
    TaskSet,
)

from . import _errors as errors
from ._inbound import Junk, Tokens
from ._options import RedisOptions
from ._resp import ReplyError, RespConnection, RespLost

if TYPE_CHECKING:
    from ._links import Links, Publisher
    from ._retained import _Sub

__all__ = ["RedisBase", "log"]

log = logging.getLogger("cascade_bus.redis")
_T = TypeVar("_T")

#: Most topics (and channels) whose encoded form is cached.
TOPIC_CACHE = 4096


class RedisBase(NetworkTransport):
    """Options, connections and the kit objects every layer of the Redis transport uses."""

    #: Parse the URL for Redis Cluster (several seed hosts, no database number).
    _CLUSTER: ClassVar[bool] = False

    def __init__(self, url: BusURL, options: Mapping[str, Any]) -> None:
        super().__init__(url, options)
        self._opts = o = RedisOptions.parse(url, self.options, cluster=self._CLUSTER)
        self._id = os.urandom(8).hex()
        prefix = o.prefix.encode()
        self._prefix = prefix
        self._ctl = prefix + b"ctl"
        self._barrier_channel = prefix + b"b:" + self._id.encode()
        self._closing = False
        self._offline = OfflineBuffer(o.net.offline_buffer, self.stats, url.endpoint())
        self._tasks = TaskSet("redis")
        self._supervisor_task: asyncio.Task[None] | None = None
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._subs: set[_Sub] = set()
        self._tokens = Tokens()
        self._ttl_ms = int(o.stream_ttl * 1000)  # a stream route's lease
        self._junk = Junk(self.stats, self.url.endpoint())
        # The composed parts (set by the transport: standalone or cluster ones).
        self._links: Links
        self._publisher: Publisher

    # -- small public helpers (tests, health checks) ---------------------------------------------

    @property
    def client_id(self) -> str:
        """The id naming this bus's QoS 1 streams and stream consumers."""
        return self._opts.client_id

    @property
    def buffered(self) -> int:
        """Messages waiting in the offline buffer for the connection to come back."""
        return len(self._offline)

    @property
    def max_payload(self) -> int | None:
        """Largest body accepted (option ``max_payload``, 8 MiB by default)."""
        return self._opts.max_payload

    def _spawn(self, coro: Coroutine[Any, Any, _T], name: str) -> asyncio.Task[_T]:
        """Start a background task ``cascade_bus.redis.<name>`` (stopped by ``aclose``)."""
        return self._tasks.spawn(coro, name)

    # -- connecting ------------------------------------------------------------------------------

    async def _open(
        self, role: str, *, address: tuple[str, int] | None = None, **callbacks: Any
    ) -> RespConnection:
        """Open one connection (to ``address``, by default the URL's server) and handshake.

        Raises:
            ConnectError: unreachable, or the credentials or database refused.
        """
        o = self._opts
        host, port = address or (o.host, o.port)
        where = f"{host}:{port}" if address else self.url.endpoint()
        conn = RespConnection(f"{where} ({role})", **callbacks)
        try:
            await conn.open(
                host,
                port,
                tls=o.tls,
                username=o.username,
                password=o.password,
                db=o.db,
                client_name=f"cascade_bus:{o.client_id}:{role}",
            )
        except (ReplyError, OSError, RespLost) as exc:
            conn.abort()
            raise errors.connect_failed(where, exc) from exc
        except BaseException:
            conn.abort()
            raise
        return conn

    async def _call(self, *args: bytes) -> Any:
        """Run one command (on the command connection, or routed by the cluster client).

        Raises:
            ConnectionLost: not connected.
            RespLost: the connection dropped before the reply.
            ReplyError: Redis refused the command.
        """
        return await self._links.call(*args)

    async def _script(self, op: bytes, *args: bytes, ns: bytes | None = None) -> Any:
        """Run one operation of the adapter's script in namespace ``ns`` (default: the prefix).

        Raises:
            ConnectionLost: not connected, or the connection dropped before the reply.
            ReplyError: Redis refused it.
        """
        return await self._links.script(op, *args, ns=ns)

    async def _wait_up(self) -> None:
        """Wait for the connection (subscribing while reconnecting waits for it)."""
        if self._closed:
            raise self._closed_error()
        if not self._connected:
            await self._up.wait()
        if self._closed:
            raise self._closed_error()

    def _closed_error(self) -> BusClosed:
        return BusClosed("the Redis transport is closed")

    if TYPE_CHECKING:  # implemented by upper layers; declared for the type checker only

        async def _remove(self, sub: _Sub) -> None:
            """End one subscription (``_streams``)."""
