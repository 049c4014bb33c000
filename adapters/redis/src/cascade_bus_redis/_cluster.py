r"""The Redis Cluster transport: ``redis+cluster://host:port,host:port`` (``rediss+cluster://``).

It is the standalone transport (`RedisTransport`) with the connection layer swapped; the same
Lua script, retained-message procedure (window, snapshot, barrier), stream routes, consumer
groups, acks and claims run unchanged, each inside one *namespace* per shard key.

Sharding. The first ``shard_levels`` levels of a topic (default 1: ``cascade`` for
``cascade/telemetry/...``) are its *shard key*. Every key the adapter keeps for a topic — its
retained body and sequence, the stream routes and QoS 1 / queue streams whose pattern fixes those
levels, the pattern leases — is named ``<prefix>{<shard key>}...``, so Redis hashes them all to
one slot and one atomic script per publish still works. Different shard keys spread over the
slots and so over the masters.

Clients. Commands go through redis-py's asyncio ``RedisCluster`` (topology discovery, MOVED and
ASK redirects, a refreshed slot map after a failover): publishes are batched by one sender task
into cluster pipelines (one round trip per node per batch, in order per node), everything else
is one command. Pub/sub does *not* use redis-py's ``ClusterPubSub``: its ``get_sharded_message``
polls one node after the other, it reconnects and resubscribes on its own, and it has no way to
order a PING after the messages of one node's connection, all of which the race-free retained
procedure and flow control need. Instead the adapter opens one `RespConnection` per master (the
same pipelined RESP2 client as standalone), subscribes each shard channel on the master that owns
its slot (as the cluster client's slot map says) and parses pushes straight into the
subscriptions. Each QoS 1 / queue stream is read on its own connection to the owning master.

Live delivery (QoS 0). The publish script (``P``) SPUBLISHes a frame ``<seq>\0<topic>\0<body>``
on ``<ns>t:<topic>`` (exact subscriptions listen there) and on ``<ns>p:<pattern>`` for every
pattern leased in ``<ns>patterns`` that matches (pattern subscriptions lease theirs; the server
filters exactly, so a subscriber gets only what it asked for however coarse the shard key). A
*broad* pattern — one whose wildcards fall inside the shard-key levels (``+/x``, ``#``, or
``a/#`` with ``shard_levels=2``) — can match topics in every slot, so its lease is written into
every one of the 16,384 slots (``<prefix>{<slot tag>}broad``, one hash per slot) and the script
publishes its matches with a classic PUBLISH, which the cluster broadcasts to every node; the
subscriber listens with SUBSCRIBE on one node. QoS 1 and queue subscriptions need one stream in
one slot, so a broad pattern with ``qos=1`` or ``queue=`` raises `UnsupportedFeature`.

The subscribe race, per kind (see `RedisTransport` for the procedure): the live subscription is
confirmed by a PING on its connection (and, for patterns, the lease written) before the snapshot
is read; the barrier afterwards is a PING on the same connection (SPUBLISH delivery is
synchronous on the owning master, so everything executed before the PING is in the window) or,
for broad patterns, a classic PUBLISH of a token on every master (the cluster bus keeps each
node's messages in order), waited for on the subscriber's connection.
"""

from __future__ import annotations

import asyncio
import binascii
import functools
import itertools
import logging
from collections import deque
from collections.abc import Awaitable, Iterable, Mapping
from typing import Any, ClassVar

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
        f"redis+cluster:// needs redis-py ({exc}): pip install 'cascade-bus-redis[cluster]'"
    ) from exc

from cascade_bus import BusClosed, ConnectError, ConnectionLost, PublishError, UnsupportedFeature
from cascade_bus.spi import (
    BusURL,
    DropReason,
    MessageSink,
    TransportSubscription,
    topic_matches,
)

from ._inbound import decode_topic, parse_seq
from ._resp import ReplyError, RespConnection, RespLost, pack
from ._script import BROAD_SCRIPT, SCRIPT
from ._topics import hash_tag, shard_key
from ._transport import (
    _CONNECT_TIMEOUT,
    GROUP,
    RedisTransport,
    _Flow,
    _Out,
    _Stream,
    _Sub,
)

__all__ = ["RedisClusterTransport", "slot_tags"]

log = logging.getLogger("cascade_bus.redis")

SLOTS = 16384
_BATCH = 1024  # publishes per cluster pipeline
_LEASE_BATCH = 4096  # slot leases per cluster pipeline
_COMMAND_TIMEOUT = 10.0
_TOPIC_CACHE = 4096
#: What the cluster client raises when a node, the network or the cluster fails.
_FAILURES = (RedisError, RedisClusterException, OSError)
#: Words of a refused AUTH in redis-py's messages.
_AUTH_WORDS = ("username-password", "authentication", "noauth", "wrongpass", "noperm")
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
        self.flow = _Flow()
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


class RedisClusterTransport(RedisTransport):
    """``redis+cluster://[user:pass@]host:port[,host:port...]`` and ``rediss+cluster://`` (TLS).

    The hosts are seed nodes: the rest of the cluster is discovered. Options are those of
    ``redis://`` (no ``db``: a cluster has database 0 only) plus ``shard_levels`` (1): how many
    leading topic levels form the shard key that decides a topic's hash slot. See the module
    docstring for how topics, patterns and streams map onto slots and channels.
    """

    _CLUSTER: ClassVar[bool] = True
    _RETRY_CODES: ClassVar[frozenset[str]] = frozenset(
        {"MOVED", "ASK", "TRYAGAIN", "CLUSTERDOWN", "LOADING", "MASTERDOWN"}
    )
    package: ClassVar[str] = "cascade-bus-redis"

    def __init__(self, url: BusURL, options: Mapping[str, Any]) -> None:
        super().__init__(url, options)
        o = self._opts
        self._levels = o.shard_levels
        self._rc: RedisCluster | None = None
        self._links: dict[str, _Link] = {}
        self._classic_link: str | None = None
        self._chans: dict[bytes, _Channel] = {}  # shard channels (kinds t, p)
        self._classic: dict[bytes, _Channel] = {}  # classic channels (kind b)
        self._fields = itertools.count(1)
        self._queue: deque[_Out] = deque()
        self._batch: list[_Out] | None = None
        self._send_wake = asyncio.Event()
        self._progress = asyncio.Event()
        self._sender: asyncio.Task[None] | None = None
        self._lease_task: asyncio.Task[None] | None = None
        self._ack_tasks: set[asyncio.Task[Any]] = set()
        self._topic_keys: dict[str, tuple[bytes, bytes, bytes, bytes]] = {}
        self._frame_topics: dict[bytes, str] = {}
        self._maxlen_b = str(o.stream_maxlen).encode()
        self._broad_sha = b""

    # -- naming ----------------------------------------------------------------------------------

    def _ns(self, key: str) -> bytes:
        """The namespace (key prefix with hash tag) of a shard key."""
        return self._prefix + hash_tag(key).encode()

    def _namespace(self, pattern: str) -> bytes:
        key = shard_key(pattern, self._levels)
        if key is None:  # pragma: no cover - subscribe() refuses these first
            raise UnsupportedFeature(self.url.scheme, "streams for a broad pattern")
        return self._ns(key)

    def shard_key(self, topic: str) -> str | None:
        """The shard key of a topic or pattern (None: a broad pattern, spread over all slots)."""
        return shard_key(topic, self._levels)

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
            raise ReplyError(f"NOSCRIPT {exc}") from None
        except _TRANSIENT as exc:
            raise RespLost(f"{self.url.endpoint()}: {type(exc).__name__}: {exc}") from None
        except ResponseError as exc:
            raise ReplyError(str(exc)) from None
        except _FAILURES as exc:
            raise RespLost(f"{self.url.endpoint()}: {type(exc).__name__}: {exc}") from None

    async def _call(self, *args: bytes) -> Any:
        return await self._rc_call(*args)

    async def _load_script(self) -> None:
        rc = self._client()
        sha = await rc.script_load(SCRIPT)  # on every master
        self._sha = sha.encode() if isinstance(sha, str) else sha
        sha = await rc.script_load(BROAD_SCRIPT)
        self._broad_sha = sha.encode() if isinstance(sha, str) else sha

    async def _reload_script(self) -> None:
        """Load the script again (a master restarted or took over without it).

        Raises:
            ConnectionLost: the cluster could not be reached.
        """
        try:
            await self._load_script()
        except _FAILURES as exc:
            raise ConnectionLost(f"loading the script into {self.url.endpoint()}: {exc}") from None

    async def _script(self, op: bytes, *args: bytes, ns: bytes | None = None) -> Any:
        """Run one script operation in namespace ``ns`` (routed to the slot's master)."""
        ns = ns or self._prefix
        for attempt in (1, 2):
            try:
                return await self._rc_call(b"EVALSHA", self._sha, 1, ns + b"seq", op, ns, *args)
            except ReplyError as exc:
                if exc.code != "NOSCRIPT" or attempt == 2:
                    raise
                await self._reload_script()
            except RespLost as exc:
                raise ConnectionLost(str(exc)) from None
        raise AssertionError("unreachable")  # pragma: no cover

    async def _on_redirect(self, error: ReplyError) -> None:
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
            raise ConnectionLost(f"no master for {key!r}: {exc}") from None
        if node is None:
            raise ConnectionLost(f"no master for {key!r}")
        return node.name, (node.host, int(node.port))

    async def _open_stream(self, stream: _Stream) -> RespConnection:
        _, address = self._node_address(stream.key)
        return await self._open("stream", address=address)

    # -- connecting ------------------------------------------------------------------------------

    async def _open_main(self) -> None:
        """Read the topology, load the script, open a link per master, resubscribe, re-lease."""
        self._lost = lost = asyncio.Event()
        rc = self._rc
        if rc is None:
            rc = self._rc = self._new_client()
        else:
            await rc.aclose()  # forget connections and slot map; initialize() reads them again
        try:
            await rc.initialize()
            await self._load_script()
            primaries = sorted(rc.get_primaries(), key=lambda n: n.name)
        except (AuthenticationError, AuthorizationError) as exc:
            raise ConnectError(f"{self.url.endpoint()} refused the credentials: {exc}") from None
        except ResponseError as exc:
            if "WRONGPASS" in str(exc) or "NOAUTH" in str(exc) or "NOPERM" in str(exc):
                raise ConnectError(
                    f"{self.url.endpoint()} refused the credentials: {exc}"
                ) from None
            raise ConnectError(f"{self.url.endpoint()} refused the adapter: {exc}") from None
        except _FAILURES as exc:
            # redis-py wraps a refused AUTH into "Redis Cluster cannot be connected: ...".
            if any(word in str(exc).lower() for word in _AUTH_WORDS):
                raise ConnectError(
                    f"{self.url.endpoint()} refused the credentials: {exc}"
                ) from None
            raise ConnectError(f"could not connect to {self.url.endpoint()}: {exc}") from None
        if not primaries:
            raise ConnectError(f"{self.url.endpoint()} reports no masters")
        self._abort_connections()  # a previous attempt's links, if any
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
        self._links = links
        self._classic_link = primaries[0].name
        try:
            await self._resubscribe()
        except BaseException:
            self._abort_connections()
            raise

    async def _open_link(self, name: str, address: tuple[str, int], lost: asyncio.Event) -> _Link:
        link = _Link(name)

        def on_lost(exc: BaseException | None) -> None:
            lost.set()

        link.conn = await self._open(
            "pubsub",
            address=address,
            on_push=functools.partial(self._on_link_push, link),
            on_push_error=self._push_failed,
            on_lost=on_lost,
        )
        return link

    async def _resubscribe(self) -> None:
        """After (re)connecting: every channel on the master owning it, every lease again."""
        commands: dict[str, list[bytes]] = {name: [] for name in self._links}
        assert self._classic_link is not None
        classic = commands[self._classic_link]
        classic.append(pack(b"SUBSCRIBE", self._barrier_channel, *self._classic))
        for ch in self._chans.values():
            ch.node, _ = self._node_address(ch.name)
            if ch.node not in self._links:
                raise ConnectionLost(f"{ch.node} owns {ch.name!r} but is not a known master")
            commands[ch.node].append(pack(b"SSUBSCRIBE", ch.name))
        for ch in self._classic.values():
            ch.node = self._classic_link
        await asyncio.gather(
            *(self._link_sync(self._links[name], cmds) for name, cmds in commands.items())
        )
        # A server that restarted has lost the leases (and a lease may have run out).
        await self._renew_leases(connected=False)

    async def connect(self) -> None:
        """Discover the cluster, open a pub/sub link per master and start the sender.

        Raises:
            ConnectError: no seed node reachable, refused credentials, or the cluster is down.
        """
        try:
            await super().connect()
        except BaseException:
            await self._close_client()
            raise
        self._sender = self._spawn(self._send_loop(), "sender")

    def _abort_connections(self) -> BaseException | None:
        cause: BaseException | None = None
        for link in self._links.values():
            if link.conn is not None:
                cause = cause or link.conn.lost_cause
                link.conn.abort()
        return cause

    def _take_inflight(self) -> None:
        """Nothing to do: the sender requeues what a failed batch left unanswered itself."""

    def _set_connected(self, up: bool) -> None:
        super()._set_connected(up)
        self._notify_progress()
        self._send_wake.set()

    async def _close_client(self) -> None:
        rc, self._rc = self._rc, None
        if rc is not None:
            try:
                await rc.aclose()
            except _FAILURES as exc:  # pragma: no cover - best effort
                log.debug("closing the cluster client: %r", exc)

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
        token = b"%d" % next(self._tokens)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pongs[token] = fut
        errors = len(link.errors)
        try:
            for command in commands:
                conn.send_raw(command)
            conn.send_raw(pack(b"PING", token))
            await fut
        except RespLost as exc:
            raise ConnectionLost(str(exc)) from None
        finally:
            self._pongs.pop(token, None)
        if len(link.errors) > errors:
            error = link.errors[errors]
            del link.errors[errors:]
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
                    self._on_barrier(reply[2])
            elif kind == b"pong":
                self._pong(reply[1])
            elif kind == b"sunsubscribe":
                channel = reply[1]
                pending = link.leaving.get(channel, 0)
                if pending > 1:
                    link.leaving[channel] = pending - 1
                elif pending == 1:
                    del link.leaving[channel]
                elif not self._closing:
                    # Unasked: the slot moved to another master (resharding or failover). A
                    # reconnect subscribes it where it lives now and resyncs retained state.
                    log.warning(
                        "%s dropped the shard channel %r (slot moved); reconnecting",
                        link.name,
                        channel,
                    )
                    self._lost.set()
        elif type(reply) is bytes:
            self._pong(reply)  # PING outside subscribed mode answers with a plain bulk string
        elif type(reply) is ReplyError:
            link.errors.append(reply)
            if len(link.errors) > 16:
                del link.errors[:-16]
            log.debug("%s refused a pub/sub command: %s", link.name, reply)

    def _pong(self, token: bytes) -> None:
        fut = self._pongs.pop(token, None)
        if fut is not None and not fut.done():
            fut.set_result(None)

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

    async def subscribe(
        self,
        pattern: str,
        sink: MessageSink,
        *,
        qos: int = 0,
        queue: str | None = None,
    ) -> TransportSubscription:
        """Subscribe; retained messages matching are delivered before this returns.

        Raises:
            UnsupportedFeature: ``qos=1`` or ``queue=`` with a broad pattern (wildcards inside
                the shard-key levels): its stream would have to live in every slot.
            SubscribeError: Redis refused the subscription.
            ConnectionLost: the connection dropped while subscribing.
        """
        if (qos or queue is not None) and shard_key(pattern, self._levels) is None:
            what = "queue-group" if queue is not None else "QoS 1"
            raise UnsupportedFeature(
                self.url.scheme,
                f"{what} subscriptions to {pattern!r}",
                f"its wildcards cover the shard key (the first {self._levels} topic level(s), "
                "option shard_levels), so its messages live in every hash slot, and a stream "
                "lives in one; fix those levels in the pattern (QoS 0 without queue= works)",
            )
        return await super().subscribe(pattern, sink, qos=qos, queue=queue)

    async def _subscribe_pubsub(self, sub: _Sub) -> None:
        sub.window = deque()
        kind, ns, name = self._plan(sub.pattern)
        table = self._classic if kind == "b" else self._chans
        ch = table.get(name)
        created = ch is None
        if ch is None:
            field = b"%s:%d %s" % (self._id.encode(), next(self._fields), sub.pattern.encode())
            ch = table[name] = _Channel(kind, name, ns, sub.pattern, field)
            ch.ready = asyncio.get_running_loop().create_future()
        ch.routes.append((sub.pattern, sub))
        self._subs.add(sub)
        try:
            ready = ch.ready
            assert ready is not None
            if created:
                try:
                    await self._listen(ch)
                except BaseException as exc:
                    if not ready.done():
                        ready.set_exception(exc)
                        ready.exception()  # retrieved: other waiters re-raise it
                    raise
                ready.set_result(None)
            else:
                await asyncio.shield(ready)
            snapshot = await self._snapshot(sub.pattern)
            await self._barrier_for([ch])
        except BaseException:
            await self._remove(sub)
            raise
        await self._drain_window(sub, snapshot, resync=False)

    async def _listen(self, ch: _Channel) -> None:
        """Subscribe a new channel where it lives and lease its pattern (confirmed)."""
        if ch.kind == "b":
            ch.node = self._classic_link
            link = self._links.get(ch.node or "")
            if link is None:
                raise ConnectionLost(f"not connected to {self.url.endpoint()}")
            await self._link_sync(link, [pack(b"SUBSCRIBE", ch.name)])
            await self._lease_broad([ch.field], [ch.pattern.encode()])
            return
        for attempt in (1, 2, 3):
            ch.node, _ = self._node_address(ch.name)
            link = self._links.get(ch.node)
            if link is None:
                # A master this bus has no link to (the cluster grew): reconnect to learn it.
                self._lost.set()
                raise ConnectionLost(f"{ch.node} is not among the masters this bus knows yet")
            try:
                await self._link_sync(link, [pack(b"SSUBSCRIBE", ch.name)])
                break
            except ReplyError as exc:
                if exc.code not in self._RETRY_CODES or attempt == 3:
                    raise
                await self._on_redirect(exc)
        if ch.kind == "p":
            await self._lease(ch)

    async def _lease(self, ch: _Channel) -> None:
        ttl = str(self._ttl_ms).encode()
        await self._script(b"a", ch.ns + b"patterns", ch.field, ch.pattern.encode(), ttl, ns=ch.ns)

    async def _lease_broad(
        self, fields: list[bytes], patterns: list[bytes], *, drop: bool = False
    ) -> None:
        """Write (or drop) broad-pattern leases in every slot's ``broad`` hash.

        One call per master (`BROAD_SCRIPT` over the slots the slot map says it owns); a master
        that refuses it (a slot migrating) gets the slower per-slot pipeline instead.
        """
        rc = self._client()
        by_node: dict[str, list[int]] = {}
        for slot, nodes in rc.nodes_manager.slots_cache.items():
            if nodes:
                by_node.setdefault(nodes[0].name, []).append(slot)
        head: list[bytes] = [b"d" if drop else b"a", str(self._ttl_ms).encode()]
        head.append(b"%d" % len(fields))
        for field, pattern in zip(fields, patterns, strict=True):
            head += [field, pattern]

        async def per_node(name: str, slots: list[int]) -> list[int]:
            node = rc.get_node(node_name=name)
            try:
                if node is None:
                    raise ReplyError(f"NODE {name} left the slot map")
                keys = [self._slot_ns(slot) + b"broad" for slot in slots]
                await self._rc_call(b"EVALSHA", self._broad_sha, 0, *head, *keys, target_nodes=node)
                return []
            except (ReplyError, RespLost) as exc:
                log.info("broad leases on %s: %s; writing them slot by slot", name, exc)
                return slots

        done = [s for slots in by_node.values() for s in slots]
        left = sorted(set(range(SLOTS)) - set(done))
        for slots in await asyncio.gather(*(per_node(n, s) for n, s in by_node.items())):
            left += slots
        if left:
            await self._lease_slots(sorted(left), fields, patterns, drop=drop)

    async def _lease_slots(
        self, slots: list[int], fields: list[bytes], patterns: list[bytes], *, drop: bool
    ) -> None:
        """Broad leases slot by slot through cluster pipelines (redirects followed)."""
        ttl = str(self._ttl_ms).encode()
        calls: list[tuple[Any, ...]] = []
        for slot in slots:
            ns = self._slot_ns(slot)
            key = ns + b"broad"
            for field, pattern in zip(fields, patterns, strict=True):
                if drop:
                    calls.append((b"EVALSHA", self._sha, 1, key, b"d", ns, key, field))
                else:
                    calls.append(
                        (b"EVALSHA", self._sha, 1, key, b"a", ns, key, field, pattern, ttl)
                    )
        for start in range(0, len(calls), _LEASE_BATCH):
            chunk = calls[start : start + _LEASE_BATCH]
            results = await self._pipeline(chunk)
            if any(isinstance(r, NoScriptError) for r in results):
                await self._reload_script()
                results = await self._pipeline(chunk)
            for result in results:
                if isinstance(result, ResponseError) and not isinstance(result, _TRANSIENT):
                    raise ReplyError(str(result))
                if isinstance(result, BaseException):
                    raise ConnectionLost(f"leasing a broad pattern failed: {result}")

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
            raise ConnectionLost(f"{self.url.endpoint()}: {type(exc).__name__}: {exc}") from None

    async def _renew_leases(self, *, connected: bool = True) -> None:
        """Write every lease of this bus again (after a reconnect, and every stream_ttl / 3)."""
        if connected and not self._connected:
            return
        narrow = [ch for ch in self._chans.values() if ch.kind == "p"]
        await asyncio.gather(*(self._lease(ch) for ch in narrow))
        broad = list(self._classic.values())
        if broad:
            await self._lease_broad(
                [ch.field for ch in broad], [ch.pattern.encode() for ch in broad]
            )

    async def _remove_pubsub(self, sub: _Sub) -> None:
        kind, _, name = self._plan(sub.pattern)
        table = self._classic if kind == "b" else self._chans
        ch = table.get(name)
        if ch is None:
            return
        ch.routes = [(p, s) for p, s in ch.routes if s is not sub]
        if ch.routes:
            return
        del table[name]
        link = self._links.get(ch.node or "")
        if link is not None and link.conn is not None and not link.conn.lost:
            if kind == "b":
                link.conn.send_raw(pack(b"UNSUBSCRIBE", name))
            else:
                link.leaving[name] = link.leaving.get(name, 0) + 1
                link.conn.send_raw(pack(b"SUNSUBSCRIBE", name))
        if kind == "t" or not self._connected or self._closing:
            return
        try:
            if kind == "p":
                await self._script(b"d", ch.ns + b"patterns", ch.field, ns=ch.ns)
            else:
                await self._lease_broad([ch.field], [ch.pattern.encode()], drop=True)
        except (ConnectionLost, ReplyError) as exc:
            log.debug("dropping the lease of %r: %r (it runs out by itself)", ch.pattern, exc)

    # -- retained snapshot and barriers ----------------------------------------------------------

    async def _snapshot(
        self, pattern: str, ns: bytes | None = None
    ) -> dict[str, tuple[int, bytes]]:
        if ns is not None:
            return await super()._snapshot(pattern, ns)
        kind, ns, _ = self._plan(pattern)
        if kind != "b":
            return await super()._snapshot(pattern, ns)
        # A broad pattern: every namespace that holds retained messages, on every master.
        out: dict[str, tuple[int, bytes]] = {}
        for key in await self._retained_keys():
            out.update(await super()._snapshot(pattern, key[: -len(b"retained")]))
        return out

    async def _retained_keys(self) -> list[bytes]:
        """Every ``<prefix>{...}retained`` hash in the cluster (SCAN on every master)."""
        rc = self._client()
        glob = self._prefix + b"{*}retained"
        keys: list[bytes] = []
        for node in rc.get_primaries():
            cursor: Any = 0
            while True:
                reply = await self._rc_call(
                    b"SCAN", cursor, b"MATCH", glob, b"COUNT", 1000, b"TYPE", b"hash",
                    target_nodes=node,
                )  # fmt: skip
                cursor, page = reply
                if isinstance(cursor, dict):  # redis-py keys the cursor by node name
                    cursor = next(iter(cursor.values()))
                keys.extend(page)
                if int(cursor) == 0:
                    break
        return keys

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
            link = self._links.get(name)
            if link is None:
                raise ConnectionLost(f"the pub/sub link to {name} is down")
            waits.append(self._link_sync(link, []))
        if classic:
            waits.append(self._classic_barrier())
        await asyncio.gather(*waits)

    async def _barrier(self) -> None:
        await self._barrier_for([*self._chans.values(), *self._classic.values()])

    async def _classic_barrier(self) -> None:
        """PUBLISH a token on every master; all of them arriving means all earlier ones did."""
        rc = self._client()
        loop = asyncio.get_running_loop()
        tokens: list[tuple[Any, bytes, asyncio.Future[None]]] = []
        for node in rc.get_primaries():
            token = b"%d" % next(self._tokens)
            fut: asyncio.Future[None] = loop.create_future()
            self._barriers[token] = fut
            tokens.append((node, token, fut))
        try:
            await asyncio.gather(
                *(
                    self._rc_call(b"PUBLISH", self._barrier_channel, token, target_nodes=node)
                    for node, token, _ in tokens
                )
            )
            await asyncio.gather(*(fut for _, _, fut in tokens))
        except RespLost as exc:
            raise ConnectionLost(str(exc)) from None
        finally:
            for _, token, _ in tokens:
                self._barriers.pop(token, None)

    # -- acks ------------------------------------------------------------------------------------

    def _flush_acks(self) -> None:
        self._ack_handle = None
        if self._rc is None or not self._connected:
            return  # sent after the reconnect (`_reconnect` schedules them)
        streams, self._ack_streams = self._ack_streams, set()
        for stream in streams:
            ids, stream.to_ack = stream.to_ack, []
            if not ids:
                continue
            task = self._spawn(self._rc_call(b"XACK", stream.key, GROUP, *ids), "ack")
            self._ack_tasks.add(task)
            task.add_done_callback(self._ack_tasks.discard)
            task.add_done_callback(functools.partial(self._acked, stream, ids))

    # -- publishing ------------------------------------------------------------------------------

    def _publish_keys(self, topic: str) -> tuple[bytes, bytes, bytes, bytes]:
        """``(retained key, broad key, namespace, topic)`` of a topic, cached."""
        keys = self._topic_keys.get(topic)
        if keys is None:
            if len(self._topic_keys) >= _TOPIC_CACHE:
                self._topic_keys.clear()
            key = shard_key(topic, self._levels)
            assert key is not None  # a topic has no wildcards
            ns = self._ns(key)
            broad = self._slot_ns(key_slot(ns)) + b"broad"
            keys = self._topic_keys[topic] = (ns + b"retained", broad, ns, topic.encode())
        return keys

    def _publish_call(self, out: _Out) -> tuple[Any, ...]:
        retained_key, broad, ns, name = self._publish_keys(out.topic)
        return (
            b"EVALSHA", self._sha, 2, retained_key, broad,
            b"P", ns, name, out.data, b"1" if out.retain else b"0", self._maxlen_b, broad,
            self._prefix,
        )  # fmt: skip

    async def publish(
        self,
        topic: str,
        data: bytes,
        *,
        qos: int = 0,
        retain: bool = False,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Publish; QoS 1 returns once the owning master ran the script (or it is buffered).

        Raises:
            PublishError: Redis refused it (QoS 1), or the offline buffer is full (QoS 1).
            ConnectionLost: disconnected and ``reconnect`` is off.
        """
        if self._closed:
            raise BusClosed("the Redis Cluster transport is closed")
        if not self._connected:
            self._buffer(topic, data, qos, retain)
            return
        if qos:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._queue.append(_Out(topic, data, qos, retain, fut))
            self._send_wake.set()
            await fut
            return
        self._queue.append(_Out(topic, data, qos, retain, None))
        self._send_wake.set()
        limit = self._opts.max_inflight
        while len(self._queue) >= limit and self._connected and not self._closed:
            await self._wait_progress()

    async def _send_loop(self) -> None:
        """Send queued publishes as cluster pipelines, one batch at a time (in order per node)."""
        while not self._closed:
            if not self._queue or not self._connected:
                self._send_wake.clear()
                await self._send_wake.wait()
                continue
            batch = [self._queue.popleft() for _ in range(min(len(self._queue), _BATCH))]
            self._batch = batch
            lost_event = self._lost  # this connection's; a reconnect meanwhile replaces it
            try:
                results: list[Any] = await self._pipeline(self._publish_call(o) for o in batch)
            except ConnectionLost as exc:
                results = [exc] * len(batch)
            except Exception as exc:  # a bug here must not leave publishers waiting forever
                log.exception("publishing a batch to %s failed", self.url.endpoint())
                results = [ResponseError(f"cascade_bus: {exc!r}")] * len(batch)
            finally:
                self._batch = None
            lost = await self._settle(batch, results)
            self._notify_progress()
            if lost is not None and lost_event is self._lost:
                log.warning("publishing to %s failed: %s", self.url.endpoint(), lost)
                lost_event.set()
                await self.wait_disconnected()

    async def _settle(self, batch: list[_Out], results: list[Any]) -> BaseException | None:
        """Settle a batch's publishes; requeue what must be sent again; return a lost cause."""
        again: list[_Out] = []
        lost: BaseException | None = None
        noscript = False
        dropped = 0
        for out, result in zip(batch, results, strict=True):
            if not isinstance(result, BaseException):
                out.settle()
            elif isinstance(result, NoScriptError):
                noscript = True
                again.append(out)
            elif isinstance(result, ResponseError) and not isinstance(result, _TRANSIENT):
                error = PublishError(
                    f"{self.url.endpoint()} refused the message for {out.topic!r}: {result}",
                    topic=out.topic,
                )
                if out.future is None or out.future.done():
                    self.stats.drop(DropReason.PUBLISH_FAILED)
                    if not self._reported_failure:
                        self._reported_failure = True
                        log.warning(
                            "%s (counted in stats().dropped['publish_failed']; further "
                            "failures are not logged)",
                            error,
                        )
                out.settle(error)
            else:
                lost = result
                if out.qos:
                    again.append(out)
                    out.settle()  # held in a queue that survives the reconnect
                else:
                    dropped += 1  # Redis may or may not have run it: never sent twice
        if dropped:
            self.stats.drop(DropReason.DISCONNECTED, dropped)
        self._queue.extendleft(reversed(again))
        if noscript and lost is None:
            try:
                await self._reload_script()
            except ConnectionLost as exc:
                lost = exc
        return lost

    def _resend_offline(self) -> None:
        self._queue.extend(self._offline)
        self._offline.clear()
        self._send_wake.set()

    def _fail_offline(self, error: BaseException) -> None:
        self._offline.extendleft(reversed(self._queue))
        self._queue.clear()
        super()._fail_offline(error)

    def _notify_progress(self) -> None:
        changed, self._progress = self._progress, asyncio.Event()
        changed.set()

    async def _wait_progress(self) -> None:
        await self._progress.wait()

    async def flush(self, timeout: float) -> None:
        """Wait until every publish so far was run by its master (or counted as lost).

        Raises:
            TimeoutError: not done within ``timeout`` seconds.
        """
        async with asyncio.timeout(timeout):
            while not self._closed:
                if self._connected and not (self._queue or self._batch or self._offline):
                    return
                await self._wait_progress()

    # -- heartbeat and closing -------------------------------------------------------------------

    async def _heartbeat(self) -> None:
        """PING every link, refresh stream routes; renew pattern leases every stream_ttl / 3."""
        o = self._opts
        interval = max(0.05, min(o.health_check_interval, o.stream_ttl / 3))
        loop = asyncio.get_running_loop()
        renew_at = loop.time() + o.stream_ttl / 3
        while not self._closing:
            await asyncio.sleep(interval)
            if not self._connected:
                continue
            links = list(self._links.values())
            try:
                async with asyncio.timeout(max(interval, 2.0)):
                    waits: list[Awaitable[Any]] = [self._link_sync(link, []) for link in links]
                    for sub in list(self._subs):
                        if sub.stream is not None and not sub.closed:
                            waits.append(self._register(sub.stream))
                    await asyncio.gather(*waits)
            except TimeoutError:
                log.warning("%s: a master did not answer a PING; reconnecting", self.url.endpoint())
                self._abort_connections()
            except (RespLost, ConnectionLost):
                pass
            except ReplyError as exc:
                log.warning("heartbeat on %s failed: %s", self.url.endpoint(), exc)
            if loop.time() >= renew_at and (self._lease_task is None or self._lease_task.done()):
                renew_at = loop.time() + o.stream_ttl / 3
                self._lease_task = self._spawn(self._renew_leases_logged(), "leases")

    async def _renew_leases_logged(self) -> None:
        try:
            await self._renew_leases()
        except (ConnectionLost, ReplyError) as exc:
            log.info("renewing the pattern leases on %s failed: %s", self.url.endpoint(), exc)

    async def aclose(self) -> None:
        """Send what is queued, ack what was handled, drop this bus's leases, disconnect.

        Idempotent.
        """
        if self._closed:
            return
        self._closing = True
        tasks = [t for t in (self._supervisor, self._heartbeat_task, self._lease_task) if t]
        tasks += [link.flow.task for link in self._links.values() if link.flow.task]
        for sub in list(self._subs):
            sub.closed = True
            if sub.stream is not None and sub.stream.task is not None:
                tasks.append(sub.stream.task)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._connected:
            try:
                async with asyncio.timeout(2.0):
                    await self._finish()
            except (TimeoutError, ConnectionLost, ReplyError, RespLost) as exc:
                log.debug("closing %s: %r", self.url.endpoint(), exc)
        self._closed = True
        if self._sender is not None:
            self._sender.cancel()
            await asyncio.gather(self._sender, return_exceptions=True)
        for sub in list(self._subs):
            if sub.stream is not None and sub.stream.conn is not None:
                sub.stream.conn.abort()
        self._subs.clear()
        for link in self._links.values():
            if link.conn is not None:
                await link.conn.aclose()
        await self._close_client()
        self._set_connected(False)
        self._lost.set()
        self._fail_sync(BusClosed("the Redis Cluster transport was closed"))
        self._fail_offline(BusClosed("the Redis Cluster transport was closed"))
        for task in list(self._tasks):
            task.cancel()

    async def _finish(self) -> None:
        """While closing and still connected: drain the queue, acks, routes and leases."""
        while self._queue or self._batch:
            await self._wait_progress()
        self._flush_acks()
        if self._ack_tasks:
            await asyncio.gather(*self._ack_tasks, return_exceptions=True)
        leave = [
            self._script(*self._leave_args(sub.stream), ns=sub.stream.ns)
            for sub in list(self._subs)
            if sub.stream is not None
            and (sub.stream.delete_on_close or sub.stream.queue is not None)
        ]
        leave += [
            self._script(b"d", ch.ns + b"patterns", ch.field, ns=ch.ns)
            for ch in self._chans.values()
            if ch.kind == "p"
        ]
        broad = list(self._classic.values())
        if broad:
            fields, patterns = [ch.field for ch in broad], [ch.pattern.encode() for ch in broad]
            leave.append(self._lease_broad(fields, patterns, drop=True))
        await asyncio.gather(*leave, return_exceptions=True)
