"""The AMQP 0-9-1 transport (RabbitMQ): aiormq for the connection, the kit for reliability.

`AmqpTransport` composes `_wire` (the send hot path), `_subscribe` (queues and consumers),
`_retained` (the retained log) with the adapter kit (`Supervisor`, `OfflineBuffer`,
`TaskSet`). One connection, three channels: publishing (confirm mode), consuming, and a short
one per retained replay. How and why: docs/transports/amqp.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Mapping
from typing import Any, ClassVar

import aiormq
import msgspec
from aiormq.exceptions import AMQPError

from cascade_bus import BusClosed, BusError, ConnectionLost, PayloadTooLarge
from cascade_bus.spi import (
    BusURL,
    Capabilities,
    DropReason,
    MessageSink,
    NetworkTransport,
    OfflineBuffer,
    Supervisor,
    TaskSet,
    TransportSubscription,
)

from . import _errors as errors
from ._inflight import Inflight, Out, retained_properties
from ._options import AmqpOptions
from ._retained import Replay, RetainedLog, declare_log
from ._subscribe import AmqpSub, open_subscription
from ._topics import AmqpTopicMapper, routing_key
from ._wire import Wire, to_properties

__all__ = ["AmqpTransport"]

log = logging.getLogger("cascade_bus.amqp")
#: What closing a connection or cancelling a consumer may raise (ignored: it is going anyway).
_CLOSE_ERRORS: tuple[type[BaseException], ...] = (TimeoutError, AMQPError, *errors.GONE)


class AmqpTransport(NetworkTransport):
    """``amqp://[user:pass@]host[:5672][/vhost]`` and ``amqps://`` (TLS) on RabbitMQ.

    Options (URL query or keyword; see `AmqpOptions` and docs/transports/amqp.md): ``exchange``,
    ``heartbeat``, ``prefetch``, ``client_id`` (durable QoS 1 queues), ``connect_timeout``,
    ``max_payload``, ``retained_max_bytes``, the TLS files (amqps) and the shared reconnect and
    ``offline_buffer`` options.
    """

    capabilities: Capabilities = Capabilities(
        max_qos=1,
        retain=True,
        retain_emulated=True,
        wildcards=True,
        headers=True,
        queue_groups=True,
        request_reply=True,
        no_responders=True,
        will=False,
        persistence=True,
        ordering=True,
        max_payload=None,
        emulated=frozenset({"retain"}),
    )
    mapper: ClassVar[AmqpTopicMapper] = AmqpTopicMapper()
    package: ClassVar[str] = "cascade-bus-amqp"

    def __init__(self, url: BusURL, options: Mapping[str, Any]) -> None:
        super().__init__(url, options)
        o = self._opts = AmqpOptions.parse(url, self.options)
        self.capabilities = msgspec.structs.replace(self.capabilities, max_payload=o.max_payload)
        self._tasks = TaskSet("amqp")
        self._offline = OfflineBuffer(o.network.offline_buffer, self.stats, url.endpoint())
        self._supervisor = Supervisor(self, self, o.network)
        self._conn: aiormq.abc.AbstractConnection | None = None
        self._wire: Wire | None = None
        self._sub_channel: aiormq.abc.AbstractChannel | None = None
        self._retained: RetainedLog | None = None
        self._subs: list[AmqpSub] = []
        self._inflight = Inflight(
            self._offline, self.stats, url.endpoint(), self._no_one_there, o.network.reconnect
        )
        self._log = o.retained_stream

    def _no_one_there(self, reply_to: str) -> None:
        if self.on_no_responders is not None:  # set by the bus
            self.on_no_responders(reply_to)

    @property
    def buffered(self) -> int:
        """Messages held in the offline buffer."""
        return len(self._offline)

    @property
    def max_payload(self) -> int | None:
        """The broker's ``max_message_size`` (RabbitMQ's default unless ``max_payload``)."""
        return self._opts.max_payload

    # -- connecting (the `Reconnectable` steps) ----------------------------------------------

    async def reopen(self) -> None:
        """Connect, open the channels, declare the exchange and log, resubscribe, resync."""
        o = self._opts
        endpoint = self.url.endpoint()
        with errors.connecting(endpoint):
            async with asyncio.timeout(o.connect_timeout):
                conn = aiormq.Connection(o.client_url(), context=o.network.tls)
                self._conn = conn
                await conn.connect()
                pub = await conn.channel(publisher_confirms=True)
                sub = await conn.channel(publisher_confirms=False)
                await pub.exchange_declare(o.exchange, exchange_type="topic", durable=True)
                await declare_log(pub, self._log, o.retained_max_bytes)
                await sub.basic_qos(prefetch_count=o.prefetch)
        self._wire = Wire(pub, o.exchange, self._tasks)
        self._retained = RetainedLog(conn, self._wire, self._log, self._tasks)
        self._sub_channel = sub
        subs = [s for s in self._subs if not s.closed]
        for s in subs:
            if s.replays:
                s.hold()
            await open_subscription(sub, s, o.exchange, o.client_id)
        replaying = [s for s in subs if s.replays]
        if replaying:
            state = await self._replay(replaying[0].pattern, None)
            for s in replaying:
                s.hand_over(state, resync=True)

    async def wait_lost(self) -> BaseException | None:
        """Return once the connection closed, with its cause."""
        conn = self._conn
        assert conn is not None
        await asyncio.wait({conn.closing})
        return None if conn.closing.cancelled() else conn.closing.exception()

    async def on_lost(self, cause: BaseException | None) -> None:
        """Requeue unconfirmed QoS 1 publishes, count unconfirmed QoS 0 ones, drop the link."""
        self._inflight.settle_all(self._wire, requeue=True)
        await self.abandon()

    async def abandon(self) -> None:
        """Close what a lost or failed attempt left open."""
        conn, self._conn = self._conn, None
        self._wire = None
        self._sub_channel = None
        self._retained = None
        if conn is not None and not conn.is_closed:
            with contextlib.suppress(*_CLOSE_ERRORS):
                async with asyncio.timeout(2.0):
                    await conn.close()

    async def restore(self) -> None:
        """Send what was held while down, in order (a refusal is logged and counted)."""
        offline = self._offline
        while offline and self._wire is not None:
            out = offline.popleft()
            assert isinstance(out, Out)
            pending = self._write(
                out.topic, out.data, out.qos, out.retain, out.headers, out.reply_to, out
            )
            if pending is not None:  # a full frame queue, or the public-API fallback
                try:
                    await pending
                except BusError as exc:
                    self.stats.drop(DropReason.PUBLISH_FAILED)
                    log.warning("resending a message to %r failed: %s", out.topic, exc)

    async def give_up(self, cause: BaseException | None) -> None:
        """Reconnect is off: nothing held will ever be sent."""
        self._offline.fail_all(errors.lost(self.url.endpoint(), cause))

    # -- the Transport SPI -------------------------------------------------------------------

    async def connect(self) -> None:
        """Connect and start the reconnect supervisor.

        Raises:
            ConnectError: unreachable broker or refused credentials (no password shown).
        """
        try:
            await self.reopen()
        except BaseException:
            await self.abandon()
            raise
        self._set_connected(True)
        self._tasks.spawn(self._supervisor.run(), "supervisor")

    async def aclose(self) -> None:
        """Flush (bounded), then close the connection (its consumers end with it). Idempotent."""
        if self._closed:
            return
        if self._connected:
            try:
                await self._flush(5.0, reconnects=False)
            except (TimeoutError, ConnectionLost):
                log.warning("closing %s with unconfirmed messages", self.url.endpoint())
        self._closed = self._supervisor.closing = True
        for s in self._subs:
            s.closed = True
        self._inflight.settle_all(self._wire, requeue=False)
        self._offline.fail_all(BusClosed("the AMQP transport was closed"))
        await self.abandon()
        self._subs.clear()
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
        """Publish one body: QoS 0 is handed over, QoS 1 returns the broker's confirmation.

        Raises:
            BusClosed: the transport was closed.
            PayloadTooLarge: larger than the broker's ``max_message_size``.
            PublishError: the offline buffer is full (QoS 1).
            InvalidTopic: the routing key would exceed 255 bytes.
        """
        if self._closed:
            raise BusClosed("the AMQP transport is closed")
        if len(data) > self._opts.max_payload:
            raise PayloadTooLarge(
                f"message for {topic!r} is {len(data)} bytes; the broker accepts at most "
                f"{self._opts.max_payload}",
                size=len(data),
                limit=self._opts.max_payload,
            )
        if self._wire is None or not self._connected:
            routing_key(topic)  # a bad topic fails now, not after the reconnect
            self._offline.hold(
                Out(topic, data, qos, retain, headers, reply_to),
                reconnecting=self._opts.network.reconnect,
            )
            return None
        out = None
        if qos or retain or reply_to:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            out = Out(topic, data, qos, retain, headers, reply_to, fut)
        return self._write(topic, data, qos, retain, headers, reply_to, out)

    def _write(
        self,
        topic: str,
        data: bytes,
        qos: int,
        retain: bool,
        headers: Mapping[str, str] | None,
        reply_to: str | None,
        out: Out | None,
    ) -> Awaitable[None] | None:
        """Write to the wire (connected): the hot path after `send`'s checks."""
        wire = self._wire
        assert wire is not None
        if not wire.fast:
            if out is None:
                out = Out(topic, data, qos, retain, headers, reply_to)
            return self._inflight.write_public(wire, self._log, out)
        key = routing_key(topic)
        props = to_properties(headers, qos > 0 or retain, reply_to)
        if retain:
            log_props, props = retained_properties(topic, headers, props)
            # The log first: a subscriber replaying it before the live copy still gets it.
            confirm, _ = wire.send(self._log, data, log_props, True, exchange="")
            if confirm is not None and out is not None:
                self._inflight.track(confirm, out)
        message_id = os.urandom(8).hex() if reply_to else None
        confirm, wait = wire.send(key, data, props, out is not None, message_id=message_id)
        if confirm is None or out is None:
            return wait
        self._inflight.track(confirm, out)
        return out.future if out.qos or retain else wait

    async def flush(self, timeout: float) -> None:
        """Wait until the broker confirmed everything published so far.

        Raises:
            TimeoutError: not done within ``timeout`` seconds.
        """
        await self._flush(timeout, reconnects=True)

    async def _flush(self, timeout: float, *, reconnects: bool) -> None:
        """`flush`; without ``reconnects`` (closing) a lost connection ends the wait."""
        async with asyncio.timeout(timeout):
            while True:
                if reconnects:
                    await self._offline.wait_empty()
                wire, conn = self._wire, self._conn
                if wire is None or conn is None or not self._connected:
                    if self._closed or not reconnects:
                        return
                    await self.wait_connected()
                    continue
                confirmations: dict[int, Any] = getattr(wire.channel, "confirmations", {})
                pending = {f for f in confirmations.values() if not f.done()}
                pending.update(p for _, p in wire._backlog)
                if not pending:
                    return
                closing = conn.closing
                while pending and not closing.done():
                    _, pending = await asyncio.wait(
                        pending | {closing}, return_when=asyncio.FIRST_COMPLETED
                    )
                    pending.discard(closing)
                if closing.done():  # requeued: wait for the reconnect, then for the resend
                    await self.wait_disconnected()

    # -- subscribing -------------------------------------------------------------------------

    async def subscribe(
        self,
        pattern: str,
        sink: MessageSink,
        *,
        qos: int = 0,
        queue: str | None = None,
    ) -> TransportSubscription:
        """Bind a queue for ``pattern``; retained messages are handed over before returning.

        Raises:
            SubscribeError: the broker refused the queue, binding or consumer.
            ConnectionLost: the connection dropped while subscribing.
        """
        if self._closed:
            raise BusClosed("the AMQP transport is closed")
        sub = AmqpSub(self, pattern, sink, qos, queue)
        channel = self._sub_channel
        if channel is None or not self._connected:
            await self.wait_connected()
            channel = self._sub_channel
            assert channel is not None
        if sub.replays:
            sub.hold()
        self._subs.append(sub)
        try:
            opening = open_subscription(channel, sub, self._opts.exchange, self._opts.client_id)
            if sub.replays:
                state = await self._replay(pattern, opening)
            else:
                await opening
                state = None
        except BaseException:
            sub.closed = True
            self._subs.remove(sub)
            raise
        sub.hand_over(state, resync=False)
        return sub

    async def _replay(self, pattern: str, opening: Awaitable[None] | None) -> Replay:
        """Read the retained state (see `RetainedLog.replay`)."""
        log = self._retained
        if log is None:
            raise errors.lost(self.url.endpoint(), None)
        with errors.subscribing(self.url.endpoint(), pattern):
            return await log.replay(opening, 30.0)

    async def _remove(self, sub: AmqpSub) -> None:
        """Cancel a subscription's consumer (and delete its durable queue)."""
        if sub.closed:
            return
        sub.closed = True
        if sub in self._subs:
            self._subs.remove(sub)
        channel = sub.channel
        if channel is None or channel.is_closed or sub.consumer_tag is None:
            return
        try:
            async with asyncio.timeout(5.0):
                await channel.basic_cancel(sub.consumer_tag)
                if sub.durable:
                    await channel.queue_delete(sub.queue_name)
        except _CLOSE_ERRORS as exc:
            log.debug("unsubscribe %r: %r", sub.pattern, exc)
