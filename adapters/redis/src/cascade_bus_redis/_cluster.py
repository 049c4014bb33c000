"""The Redis Cluster transport: ``redis+cluster://host:port,host:port`` (``rediss+cluster://``).

The standalone transport's script, retained procedure, routes and acks, each inside one
namespace per *shard key* (a topic's first ``shard_levels`` levels, one hash slot); commands
through redis-py's ``RedisCluster``, pub/sub on one own RESP connection per master. The
transport is `RedisTransport` composed with other parts: `ClusterLinks` (``_cluster_client`` ->
``_cluster_leases`` -> ``_cluster_links`` -> this module: heartbeat, acks, close) and
`PipelinePublisher` (``_cluster_publish``). How and why: docs/transports/redis.md
("Redis Cluster": sharding rule, patterns and delivery, connections and faults).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

from cascade_bus import ConnectionLost, UnsupportedFeature

from ._acks import GROUP
from ._cluster_client import slot_tags
from ._cluster_links import ClusterPubSub
from ._cluster_publish import PipelinePublisher
from ._links import Links, Publisher
from ._resp import ReplyError, RespLost
from ._topics import shard_key
from ._transport import RedisTransport

__all__ = ["ClusterLinks", "RedisClusterTransport", "cluster_parts", "slot_tags"]


class ClusterLinks(ClusterPubSub):
    """The cluster's `Links` part: the client, a pub/sub link per master, leases, acks."""

    def check_subscribe(self, pattern: str, qos: int, queue: str | None) -> None:
        """Refuse a stream subscription whose pattern spans every slot.

        Raises:
            UnsupportedFeature: ``qos=1`` or ``queue=`` with a broad pattern (wildcards inside
                the shard-key levels): its stream would have to live in every slot.
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

    # -- acks ------------------------------------------------------------------------------------

    def xack(self, key: bytes, ids: list[bytes]) -> asyncio.Future[Any]:
        """One XACK through the cluster client, as a task whose result is its failure."""
        task = self._spawn(self._xack(key, ids), "ack")
        self._ack_tasks.add(task)
        task.add_done_callback(self._ack_tasks.discard)
        return task

    async def _xack(self, key: bytes, ids: list[bytes]) -> BaseException | None:
        try:
            await self._rc_call(b"XACK", key, GROUP, *ids)
        except (ConnectionLost, ReplyError, RespLost) as exc:
            return exc
        return None

    # -- heartbeat and closing -------------------------------------------------------------------

    def pings(self) -> list[Awaitable[Any]]:
        """A PING on every link."""
        return [self._link_sync(link, []) for link in list(self._masters.values())]

    def after_heartbeat(self) -> None:
        """Renew the pattern leases every ``stream_ttl / 3``."""
        loop = asyncio.get_running_loop()
        every = self._opts.stream_ttl / 3
        if self._renew_at is None:
            self._renew_at = loop.time() + every
        if loop.time() >= self._renew_at and (self._lease_task is None or self._lease_task.done()):
            self._renew_at = loop.time() + every
            self._lease_task = self._spawn(self._renew_leases_logged(), "leases")

    def tasks(self) -> list[asyncio.Task[Any]]:
        tasks: list[asyncio.Task[Any]] = [self._lease_task] if self._lease_task else []
        return tasks + [link.flow.task for link in self._masters.values() if link.flow.task]

    def fail_sync(self, error: BaseException) -> None:
        self._sync.fail(error)

    async def leave(self, stream_leaves: list[tuple[bytes, tuple[bytes, ...]]]) -> None:
        """While closing: wait for the acks, end the stream routes, drop this bus's leases."""
        if self._ack_tasks:
            await asyncio.gather(*self._ack_tasks, return_exceptions=True)
        leave = [self.script(*args, ns=ns) for ns, args in stream_leaves]
        leave += [
            self.script(b"d", ch.ns + b"patterns", ch.field, ns=ch.ns)
            for ch in self._chans.values()
            if ch.kind == "p"
        ]
        broad = list(self._classic.values())
        if broad:
            fields, patterns = [ch.field for ch in broad], [ch.pattern.encode() for ch in broad]
            leave.append(self._lease_broad(fields, patterns, drop=True))
        await asyncio.gather(*leave, return_exceptions=True)

    async def close(self) -> None:
        for link in self._masters.values():
            if link.conn is not None:
                await link.conn.aclose()
        await self._close_client()


def cluster_parts(transport: RedisTransport) -> tuple[Links, Publisher]:
    """A Redis Cluster's parts: the client and per-master links, pipelines from a sender."""
    links = ClusterLinks(transport)
    return links, PipelinePublisher(transport, links)


class RedisClusterTransport(RedisTransport):
    """``redis+cluster://[user:pass@]host:port[,host:port...]`` and ``rediss+cluster://`` (TLS).

    The hosts are seed nodes: the rest of the cluster is discovered. Options are those of
    ``redis://`` (no ``db``: a cluster has database 0 only) plus ``shard_levels`` (1): how many
    leading topic levels form the shard key that decides a topic's hash slot. See the module
    docstring for how topics, patterns and streams map onto slots and channels. (For tests,
    ``address_map=host:port=host:port,...`` reaches each node at another address, a proxy.)
    """

    _CLUSTER: ClassVar[bool] = True
    _compose: ClassVar[Callable[[RedisTransport], tuple[Links, Publisher]]] = staticmethod(
        cluster_parts
    )

    def shard_key(self, topic: str) -> str | None:
        """The shard key of a topic or pattern (None: a broad pattern, spread over all slots)."""
        return shard_key(topic, self._opts.shard_levels)
