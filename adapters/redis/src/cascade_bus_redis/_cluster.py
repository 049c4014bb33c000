"""The Redis Cluster transport: ``redis+cluster://host:port,host:port`` (``rediss+cluster://``).

The standalone transport's script, retained procedure, routes and acks, each inside one
namespace per *shard key* (a topic's first ``shard_levels`` levels, one hash slot); commands
through redis-py's ``RedisCluster``, pub/sub on one own RESP connection per master. Layers:
``_cluster_client`` -> ``_cluster_leases`` -> ``_cluster_links`` -> ``_cluster_publish`` -> this
module (connect, subscribe, acks, heartbeat, close). How and why: docs/transports/redis.md
("Redis Cluster": sharding rule, patterns and delivery, connections and faults).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable
from typing import Any, ClassVar

from cascade_bus import BusClosed, ConnectionLost, UnsupportedFeature
from cascade_bus.spi import MessageSink, TransportSubscription

from ._acks import GROUP
from ._cluster_client import slot_tags
from ._cluster_publish import ClusterPublishing
from ._connection import log
from ._resp import ReplyError, RespLost
from ._topics import shard_key

__all__ = ["RedisClusterTransport", "slot_tags"]


class RedisClusterTransport(ClusterPublishing):
    """``redis+cluster://[user:pass@]host:port[,host:port...]`` and ``rediss+cluster://`` (TLS).

    The hosts are seed nodes: the rest of the cluster is discovered. Options are those of
    ``redis://`` (no ``db``: a cluster has database 0 only) plus ``shard_levels`` (1): how many
    leading topic levels form the shard key that decides a topic's hash slot. See the module
    docstring for how topics, patterns and streams map onto slots and channels.
    """

    package: ClassVar[str] = "cascade-bus-redis"

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

    def _set_connected(self, up: bool) -> None:
        super()._set_connected(up)
        self._notify_progress()
        self._send_wake.set()

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

    # -- acks ------------------------------------------------------------------------------------

    def _flush_acks(self) -> None:
        self._ack_handle = None
        if self._rc is None or not self._connected:
            return  # sent after the reconnect (`restore` schedules them)
        streams, self._ack_streams = self._ack_streams, set()
        for stream in streams:
            ids, stream.to_ack = stream.to_ack, []
            if not ids:
                continue
            task = self._spawn(self._xack(stream.key, ids), "ack")
            self._ack_tasks.add(task)
            task.add_done_callback(self._ack_tasks.discard)
            task.add_done_callback(functools.partial(self._acked, stream, ids))

    async def _xack(self, key: bytes, ids: list[bytes]) -> BaseException | None:
        """One XACK through the cluster client; its failure is the result (see `_acked`)."""
        try:
            await self._rc_call(b"XACK", key, GROUP, *ids)
        except (ConnectionLost, ReplyError, RespLost) as exc:
            return exc
        return None

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

    async def aclose(self) -> None:
        """Send what is queued, ack what was handled, drop this bus's leases, disconnect.

        Idempotent.
        """
        if self._closed:
            return
        self._closing = self._supervisor.closing = True
        tasks = [t for t in (self._supervisor_task, self._heartbeat_task, self._lease_task) if t]
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
        await self._tasks.aclose(timeout=2.0)

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
