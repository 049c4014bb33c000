"""The Redis transport: pub/sub for QoS 0, Streams for QoS 1 and queue groups, a hash for retained.

One transport class for a standalone server and for Redis Cluster: it composes a `Links` part
(``_node_links``: one command and one pub/sub connection; ``_cluster_*``: the cluster client and
a pub/sub link per master) and a `Publisher` part (``_publishing``: publishes batched into
EVALSHA calls of ``_script.py``; ``_cluster_publish``: cluster pipelines from a sender task).
Written once, over those parts: retained windows and resync (``_retained``), stream routes,
readers and acks (``_streams``, ``_acks``), and here connect, the `Supervisor`'s steps,
heartbeat and close; ``_errors`` translates. How and why: docs/transports/redis.md ("How it
works", "Retained messages").
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, ClassVar

from cascade_bus import BusClosed, ConnectionLost
from cascade_bus.spi import (
    BusURL,
    Capabilities,
    MessageSink,
    Supervisor,
    TransportSubscription,
)

from . import _errors as errors
from ._connection import log
from ._links import Links, Publisher
from ._node_links import NodeLinks
from ._options import DEFAULT_MAX_PAYLOAD
from ._presence import RedisPresence
from ._publishing import BatchPublisher
from ._resp import ReplyError, RespLost
from ._retained import _Sub
from ._streams import Streams

__all__ = ["RedisTransport"]

_CONNECT_TIMEOUT = 10.0


def node_parts(transport: RedisTransport) -> tuple[Links, Publisher]:
    """A standalone server's parts: command + pub/sub connections, batched script calls."""
    links = NodeLinks(transport)
    links.publisher = publisher = BatchPublisher(transport, links)
    return links, publisher


class _Handle(TransportSubscription):
    __slots__ = ("sub", "transport")

    def __init__(self, transport: RedisTransport, sub: _Sub) -> None:
        self.transport = transport
        self.sub = sub

    async def unsubscribe(self) -> None:
        await self.transport._remove(self.sub)


class RedisTransport(RedisPresence, Streams):
    """``redis://[user:pass@]host[:6379][/db]`` and ``rediss://`` (TLS).

    Options (URL query or keyword): ``db`` (or the URL path), ``username``/``password`` (or the
    userinfo; ACL users), ``ca_file``/``certfile``/``keyfile``/``tls_verify`` (rediss),
    ``prefix`` (``cascade_bus:``, for every key and control channel), ``client_id`` (names this
    bus's QoS 1 streams and consumers; given explicitly, its QoS 1 streams outlive ``close()``
    so a restarted process resumes them), ``stream_maxlen`` (100,000, ``MAXLEN ~``),
    ``stream_ttl`` (300 s lease of a stream route), ``claim_idle`` (30 s before XAUTOCLAIM takes
    a dead member's message), ``read_count`` (256 per XREADGROUP), ``queue_prefetch`` (8:
    a queue-group member with slow handlers holds this many unhandled messages at most; raise
    it together with ``max_concurrency``),
    ``reconnect`` (true),
    ``reconnect_min``/``reconnect_max`` (backoff bounds, s), ``offline_buffer`` (10,000),
    ``health_check_interval`` (10 s PING), ``max_payload`` (8 MiB), ``max_inflight`` (1,024 QoS 0
    replies outstanding).
    """

    capabilities: Capabilities = Capabilities(
        max_qos=1,
        retain=True,
        retain_emulated=True,
        wildcards=True,
        headers=False,
        queue_groups=True,
        request_reply=True,
        will=False,
        presence=True,  # leases swept by surviving buses (_presence.py)
        persistence=False,
        ordering=True,
        max_payload=DEFAULT_MAX_PAYLOAD,  # the default of the max_payload option
        emulated=frozenset({"retain", "qos1", "queue_groups", "presence"}),
    )
    package: ClassVar[str] = "cascade-bus-redis"

    #: Builds the composed parts (`Links`, `Publisher`): here a standalone server's.
    _compose: ClassVar[Callable[[RedisTransport], tuple[Links, Publisher]]] = staticmethod(
        node_parts
    )

    def __init__(self, url: BusURL, options: Mapping[str, Any]) -> None:
        super().__init__(url, options)
        self._links, self._publisher = type(self)._compose(self)
        # The hot path is the publisher's own method, bound once (no wrapper per message).
        self.send = self._publisher.send  # type: ignore[method-assign]
        self._supervisor = Supervisor(self, self, self._opts.net)

    def send(
        self,
        topic: str,
        data: bytes,
        qos: int,
        retain: bool,
        headers: Mapping[str, str] | None,
        reply_to: str | None = None,
    ) -> Awaitable[None] | None:
        """Hand one publish over; QoS 1 returns a future settled once Redis ran it.

        Replaced by the publisher's ``send`` at construction. ``reply_to`` travels in the
        envelope only (Redis has no native reply subjects).

        Raises:
            PublishError: Redis refused it (QoS 1), or the offline buffer is full (QoS 1).
            ConnectionLost: disconnected and ``reconnect`` is off.
        """
        return self._publisher.send(topic, data, qos, retain, headers, reply_to)

    # -- connecting ------------------------------------------------------------------------------

    async def connect(self) -> None:
        """Connect, load the script and start the supervisor, heartbeat (and sender).

        Raises:
            ConnectError: unreachable server, refused credentials or database (no password
                shown), or a Redis Cluster that is down.
        """
        try:
            await self._links.open()
        except BaseException:
            await self._links.close()
            raise
        self._set_connected(True)
        self._supervisor_task = self._spawn(self._supervisor.run(), "supervisor")
        self._heartbeat_task = self._spawn(self._heartbeat(), "heartbeat")
        self._publisher.start()

    def _set_connected(self, up: bool) -> None:
        super()._set_connected(up)
        self._publisher.state_changed()

    # -- the steps the kit's Supervisor drives (`Reconnectable`) ----------------------------------

    async def wait_lost(self) -> BaseException | None:
        """Return once a connection dropped; its dead connections are dropped with it."""
        await self._links.lost.wait()
        return self._links.abort()

    async def on_lost(self, cause: BaseException | None) -> None:
        """Requeue the unanswered QoS 1 publishes, fail every barrier and PING waiting."""
        self._publisher.take_inflight()
        self._fail_sync(ConnectionLost(f"lost the connection to {self.url.endpoint()}"))

    async def reopen(self) -> None:
        """Reconnect, reload the script and renew every pub/sub subscription."""
        try:
            async with asyncio.timeout(_CONNECT_TIMEOUT):
                await self._links.open()
        except (RespLost, ReplyError) as exc:
            raise errors.lost(exc) from exc
        if self._links.lost.is_set():  # lost again at once
            raise ConnectionLost(f"lost the connection to {self.url.endpoint()} again")

    async def abandon(self) -> None:
        """Drop the connections a failed attempt opened."""
        self._links.abort()

    async def restore(self) -> None:
        """Resend what was held, send the pending acks, resync retained state."""
        subs = self._open_windows()  # before anything renewed can be delivered
        self._publisher.resend_offline()
        self._set_connected(True)  # publishes during the resync go straight out
        self._schedule_acks()
        await self._resync_logged(subs)

    async def give_up(self, cause: BaseException | None) -> None:
        """``reconnect`` is off: every held publish fails."""
        self._publisher.fail_offline(
            ConnectionLost(f"lost the connection to {self.url.endpoint()}")
        )

    def _fail_sync(self, error: BaseException) -> None:
        """Fail every barrier and PING waiting (the connections they wait on are gone)."""
        self._links.fail_sync(error)
        for sub in self._subs:
            if sub.stream is not None:
                sub.stream.barriers.fail_all(error)

    async def _heartbeat(self) -> None:
        """PING every connection and refresh stream routes; a silent connection is dropped."""
        o = self._opts
        interval = max(0.05, min(o.health_check_interval, o.stream_ttl / 3))
        links = self._links
        while not self._closing:
            await asyncio.sleep(interval)
            if not self._connected or not links.ready():
                continue
            try:
                async with asyncio.timeout(max(interval, 2.0)):
                    waits = links.pings()
                    for sub in list(self._subs):
                        if sub.stream is not None and not sub.closed:
                            waits.append(self._register(sub.stream))
                    await asyncio.gather(*waits)
            except TimeoutError:
                log.warning("%s did not answer a PING; reconnecting", self.url.endpoint())
                links.abort()
            except (RespLost, ConnectionLost):
                pass
            except ReplyError as exc:
                log.warning("heartbeat on %s failed: %s", self.url.endpoint(), exc)
            links.after_heartbeat()

    async def aclose(self) -> None:
        """Ack what was handled, drop this bus's own QoS 1 streams, disconnect. Idempotent."""
        if self._closed:
            return
        self._closing = self._supervisor.closing = True
        self._closed = True
        self._publisher.state_changed()  # no more publishes from here on
        tasks = [t for t in (self._supervisor_task, self._heartbeat_task) if t]
        tasks += self._links.tasks()
        for sub in list(self._subs):
            sub.closed = True
            if sub.stream is not None and sub.stream.task is not None:
                tasks.append(sub.stream.task)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._connected and self._links.ready():
            leaves = [
                (stream.ns, self._leave_args(stream))
                for stream in (sub.stream for sub in list(self._subs))
                if stream is not None and (stream.delete_on_close or stream.queue is not None)
            ]
            try:
                async with asyncio.timeout(2.0):
                    await self._publisher.drain()
                    self._flush_acks()
                    await self._links.leave(leaves)
            except (TimeoutError, ConnectionLost, ReplyError, RespLost) as exc:
                log.debug("closing %s: %r", self.url.endpoint(), exc)
        closed = BusClosed("the Redis transport was closed")
        await self._publisher.stop(closed)  # normally nothing left: the leave waited for it
        for sub in list(self._subs):
            if sub.stream is not None and sub.stream.conn is not None:
                sub.stream.conn.abort()
        self._subs.clear()
        await self._links.close()
        self._set_connected(False)
        self._links.lost.set()
        self._fail_sync(closed)
        self._publisher.fail_offline(closed)
        await self._tasks.aclose(timeout=2.0)

    async def flush(self, timeout: float) -> None:
        """Wait until everything published so far was run by Redis (or counted as lost).

        Raises:
            TimeoutError: not done within ``timeout`` seconds.
        """
        await self._publisher.flush(timeout)

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

        QoS 0 without a queue: pub/sub. QoS 1, or any queue group: a stream route.

        Raises:
            UnsupportedFeature: Redis Cluster, ``qos=1`` or ``queue=`` with a pattern whose
                wildcards cover the shard key.
            SubscribeError: Redis refused the subscription.
            ConnectionLost: the connection dropped while subscribing.
        """
        self._links.check_subscribe(pattern, qos, queue)
        await self._wait_up()
        sub = _Sub(pattern, sink, 1 if qos else 0, queue)
        try:
            if queue is None and not qos:
                await self._subscribe_pubsub(sub)
            else:
                await self._subscribe_stream(sub)
        except ReplyError as exc:
            raise errors.subscribe_refused(self.url.endpoint(), pattern, exc) from exc
        except RespLost as exc:
            raise errors.lost(exc) from exc
        return _Handle(self, sub)
