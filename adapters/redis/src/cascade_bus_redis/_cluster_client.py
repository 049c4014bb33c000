"""Redis Cluster links, the base layer: naming (shard keys, namespaces, slots), the client.

Every command but pub/sub and stream reads goes through redis-py's ``RedisCluster`` (topology,
MOVED/ASK redirects); `ClusterClient.call` turns its exceptions into the RESP client's
(`ReplyError`, `RespLost`) so the transport's layers handle both alike. The records of the
pub/sub side (`_Link` per master, `_Channel` per channel listened on) live here too. Layers of
the cluster's `Links` part: this module -> ``_cluster_leases`` -> ``_cluster_links``. See
``_cluster.py`` for the design.
"""

from __future__ import annotations

import asyncio
import binascii
import functools
import itertools
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from cascade_bus import ConnectionLost, UnsupportedFeature
from cascade_bus.spi import install_command

from . import _errors as errors
from ._connection import log
from ._links import Flow, SyncPoints
from ._resp import ReplyError, RespConnection, RespLost
from ._script import BROAD_SCRIPT, SCRIPT
from ._topics import hash_tag, shard_key
from ._transport import _CONNECT_TIMEOUT

if TYPE_CHECKING:
    from ._acks import _Stream
    from ._retained import _Sub
    from ._transport import RedisTransport

try:
    from redis.asyncio.cluster import ClusterNode, RedisCluster
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
    from redis.crc import key_slot
    from redis.exceptions import (
        AskError,
        AuthenticationError,
        AuthorizationError,
        ClusterDownError,
        NoScriptError,
        RedisClusterException,
        RedisError,
        ResponseError,
        TryAgainError,
    )
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ImportError(
        f"redis+cluster:// needs redis-py ({exc}): {install_command('cascade-bus-redis[cluster]')}"
    ) from exc

__all__ = [
    "SLOTS",
    "AuthenticationError",
    "AuthorizationError",
    "ClusterClient",
    "NoScriptError",
    "ResponseError",
    "key_slot",
    "slot_tags",
]

SLOTS = 16384
_BATCH = 1024  # publishes per cluster pipeline
_LEASE_BATCH = 4096  # slot leases per cluster pipeline
_COMMAND_TIMEOUT = 10.0
_TOPIC_CACHE = 4096
#: What the cluster client raises when a node, the network or the cluster fails.
_FAILURES = (RedisError, RedisClusterException, OSError)
#: Error replies that mean "not now" (slot moving, cluster reconfiguring): retried, never final.
_TRANSIENT = (AskError, TryAgainError, ClusterDownError)


def _named(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """redis-py looks commands up by name: the first argument must be a str."""
    name = args[0]
    return (name.decode(), *args[1:]) if isinstance(name, bytes) else args


@functools.cache
def slot_tags() -> tuple[bytes, ...]:
    """Return one short hash tag per cluster slot (``key_slot(b"{%s}" % tag) == slot``).

    Computed once (about 110,000 CRC16s, ~40 ms): the broad-pattern lease of slot ``s`` is the
    hash ``<prefix>{<slot_tags()[s]>}broad``, which the publish script of any topic in that slot
    may read.
    """
    tags: list[bytes | None] = [None] * SLOTS
    missing = SLOTS
    crc = binascii.crc_hqx
    for n in itertools.count():
        tag = b"%d" % n
        slot = crc(tag, 0) % SLOTS
        if tags[slot] is None:
            tags[slot] = tag
            missing -= 1
            if not missing:
                break
    return tuple(t for t in tags if t is not None)


class _Link:
    """One pub/sub connection to one master: flow control, unsubscribes in flight, errors."""

    __slots__ = ("conn", "errors", "flow", "leaving", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self.conn: RespConnection | None = None
        self.flow = Flow()
        self.leaving: dict[bytes, int] = {}  # SUNSUBSCRIBEs sent and not yet confirmed
        self.errors: list[ReplyError] = []  # error replies (a refused SSUBSCRIBE)


class _Channel:
    """One channel this bus listens on and the subscriptions it feeds.

    ``kind``: ``t`` an exact topic's shard channel, ``p`` a pattern's shard channel (leased in
    its namespace), ``b`` a broad pattern's classic channel (leased in every slot).
    """

    __slots__ = ("field", "kind", "name", "node", "ns", "pattern", "ready", "routes")

    def __init__(self, kind: str, name: bytes, ns: bytes, pattern: str, field: bytes) -> None:
        self.kind = kind
        self.name = name
        self.ns = ns
        self.pattern = pattern
        self.field = field  # the lease's hash field, unique to this channel object
        self.node: str | None = None
        self.routes: list[tuple[str, _Sub]] = []
        self.ready: asyncio.Future[None] | None = None


class ClusterClient:
    """Naming, the cluster client and the shared state of the Redis Cluster links."""

    retry_codes: frozenset[str] = frozenset(
        {"MOVED", "ASK", "TRYAGAIN", "CLUSTERDOWN", "LOADING", "MASTERDOWN"}
    )

    def __init__(self, transport: RedisTransport) -> None:
        self.t = transport
        self.url = transport.url
        self._opts = o = transport._opts
        self._prefix = transport._prefix
        self._id = transport._id
        self._barrier_channel = transport._barrier_channel
        self._tokens = transport._tokens
        self._junk = transport._junk
        self._spawn = transport._spawn
        self._sync = SyncPoints(transport._tokens, transport._junk)
        self._ttl_ms = int(o.stream_ttl * 1000)
        self._levels = o.shard_levels
        self.lost = asyncio.Event()
        self._rc: RedisCluster | None = None
        self._masters: dict[str, _Link] = {}
        self._classic_link: str | None = None
        self._chans: dict[bytes, _Channel] = {}  # shard channels (kinds t, p)
        self._classic: dict[bytes, _Channel] = {}  # classic channels (kind b)
        self._fields = itertools.count(1)
        self._lease_task: asyncio.Task[None] | None = None
        self._renew_at: float | None = None
        self._ack_tasks: set[asyncio.Task[Any]] = set()
        self._frame_topics: dict[bytes, str] = {}
        self._sha = b""
        self._broad_sha = b""

    # -- naming ----------------------------------------------------------------------------------

    def _ns(self, key: str) -> bytes:
        """The namespace (key prefix with hash tag) of a shard key."""
        return self._prefix + hash_tag(key).encode()

    def namespace(self, pattern: str) -> bytes:
        """The namespace of a stream subscription's pattern (its shard key's)."""
        key = shard_key(pattern, self._levels)
        if key is None:  # pragma: no cover - subscribe() refuses these first
            raise UnsupportedFeature(self.url.scheme, "streams for a broad pattern")
        return self._ns(key)

    def _plan(self, pattern: str) -> tuple[str, bytes, bytes]:
        """``(kind, namespace, channel)`` of a pub/sub subscription to ``pattern``."""
        key = shard_key(pattern, self._levels)
        name = pattern.encode()
        if key is None:
            return "b", self._prefix, self._prefix + b"p:" + name
        ns = self._ns(key)
        if "+" in pattern or "#" in pattern:
            return "p", ns, ns + b"p:" + name
        return "t", ns, ns + b"t:" + name

    def _slot_ns(self, slot: int) -> bytes:
        return self._prefix + b"{" + slot_tags()[slot] + b"}"

    # -- the cluster client ----------------------------------------------------------------------

    def _new_client(self) -> RedisCluster:
        o = self._opts
        kwargs: dict[str, Any] = {}
        if o.tls is not None:
            ca_file, certfile, keyfile, verify = o.tls_files
            kwargs.update(
                ssl=True,
                ssl_ca_certs=ca_file,
                ssl_certfile=certfile,
                ssl_keyfile=keyfile,
                ssl_cert_reqs="required" if verify else "none",
                ssl_check_hostname=verify,
            )
        if o.address_map:
            remap = o.address_map
            # Every node redis-py learns (slot map, redirects) is reached at its mapped address;
            # the pub/sub links and stream readers take their addresses from those nodes.
            kwargs["address_remap"] = lambda address: remap.get(address, address)
        return RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in o.hosts],
            username=o.username,
            password=o.password,
            protocol=2,
            # No retries inside redis-py: a failed command surfaces at once and the transport's
            # own reconnect (backoff, topology refresh, resubscribe, resync) takes over.
            retry=Retry(NoBackoff(), 0),
            client_name=f"cascade_bus:{o.client_id}:commands",
            socket_connect_timeout=_CONNECT_TIMEOUT,
            socket_timeout=_COMMAND_TIMEOUT,
            **kwargs,
        )

    def _client(self) -> RedisCluster:
        rc = self._rc
        if rc is None:
            raise ConnectionLost(f"not connected to {self.url.endpoint()}")
        return rc

    async def _rc_call(self, *args: Any, **kwargs: Any) -> Any:
        """One command through the cluster client, with errors translated once.

        Raises:
            ConnectionLost: not connected.
            ReplyError: Redis refused the command (``NOSCRIPT ...`` for a missing script).
            RespLost: the connection failed or the cluster is down.
        """
        rc = self._client()
        try:
            return await rc.execute_command(*_named(args), **kwargs)
        except NoScriptError as exc:
            raise ReplyError(f"NOSCRIPT {exc}") from exc
        except _TRANSIENT as exc:
            raise RespLost(f"{self.url.endpoint()}: {type(exc).__name__}: {exc}") from exc
        except ResponseError as exc:
            raise ReplyError(str(exc)) from exc
        except _FAILURES as exc:
            raise RespLost(f"{self.url.endpoint()}: {type(exc).__name__}: {exc}") from exc

    async def call(self, *args: bytes) -> Any:
        return await self._rc_call(*args)

    def ready(self) -> bool:
        return self._rc is not None

    async def _pipeline(self, calls: Iterable[tuple[Any, ...]]) -> list[Any]:
        """Run commands as one cluster pipeline; results (exceptions included) in order.

        Raises:
            ConnectionLost: the pipeline as a whole failed (a node unreachable).
        """
        rc = self._rc
        if rc is None:
            raise ConnectionLost(f"not connected to {self.url.endpoint()}")
        pipe = rc.pipeline(transaction=False)
        for call in calls:
            pipe.execute_command(*_named(call))
        try:
            return list(await pipe.execute(raise_on_error=False))
        except _FAILURES as exc:
            raise ConnectionLost(f"{self.url.endpoint()}: {type(exc).__name__}: {exc}") from exc

    async def _close_client(self) -> None:
        rc, self._rc = self._rc, None
        if rc is not None:
            try:
                await rc.aclose()
            except _FAILURES as exc:  # pragma: no cover - best effort
                log.debug("closing the cluster client: %r", exc)

    async def _load_script(self) -> None:
        rc = self._client()
        sha = await rc.script_load(SCRIPT)  # on every master
        self._sha = sha.encode() if isinstance(sha, str) else sha
        sha = await rc.script_load(BROAD_SCRIPT)
        self._broad_sha = sha.encode() if isinstance(sha, str) else sha

    async def reload_script(self) -> None:
        """Load the script again (a master restarted or took over without it).

        Raises:
            ConnectionLost: the cluster could not be reached.
        """
        try:
            await self._load_script()
        except _FAILURES as exc:
            raise ConnectionLost(f"loading the script into {self.url.endpoint()}: {exc}") from exc

    async def script(self, op: bytes, *args: bytes, ns: bytes | None = None) -> Any:
        """Run one script operation in namespace ``ns`` (routed to the slot's master)."""
        ns = ns or self._prefix
        for attempt in (1, 2):
            try:
                return await self._rc_call(b"EVALSHA", self._sha, 1, ns + b"seq", op, ns, *args)
            except ReplyError as exc:
                if exc.code != "NOSCRIPT" or attempt == 2:
                    raise
                await self.reload_script()
            except RespLost as exc:
                raise errors.lost(exc) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    async def on_redirect(self, error: ReplyError) -> None:
        """A stream reader was redirected: read the slot map again before reconnecting."""
        rc = self._rc
        if rc is not None:
            try:
                await rc.nodes_manager.initialize()
            except _FAILURES as exc:
                log.info("refreshing the cluster topology failed: %s", exc)

    def _node_address(self, key: bytes) -> tuple[str, tuple[str, int]]:
        """The master owning ``key``'s slot: ``(name, (host, port))``."""
        rc = self._rc
        if rc is None:
            raise ConnectionLost(f"not connected to {self.url.endpoint()}")
        try:
            node = rc.get_node_from_key(key)  # type: ignore[arg-type]  # bytes work too
        except _FAILURES as exc:
            raise ConnectionLost(f"no master for {key!r}: {exc}") from exc
        if node is None:
            raise ConnectionLost(f"no master for {key!r}")
        return node.name, (node.host, int(node.port))

    async def open_stream(self, stream: _Stream) -> RespConnection:
        _, address = self._node_address(stream.key)
        return await self.t._open("stream", address=address)
