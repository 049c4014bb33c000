"""Subscriptions: one queue per subscription bound to the exchange, consumed on one channel.

QoS 0: an exclusive, auto-delete, server-named queue consumed without acks. QoS 1: manual acks
after the handler ran (`Message.ack`); with a ``client_id`` the queue is durable and named, so
it keeps messages across reconnects and restarts. Queue groups: one shared named queue per
group and pattern (competing consumers). Retained replays are merged with live messages that
arrive meanwhile: live ones are held until the replay was handed over, and live copies of a
retained publish the replay already contained are dropped.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Awaitable, Callable, Coroutine
from functools import partial
from typing import TYPE_CHECKING, Any

import aiormq
from aiormq.abc import DeliveredMessage
from pamqp import commands as spec

from cascade_bus.spi import Message, MessageSink, TransportSubscription, topic_matches

from . import _errors as errors
from ._retained import RETAIN_ID, Replay
from ._topics import binding_key, topic_from_key
from ._wire import from_properties

if TYPE_CHECKING:
    from ._transport import AmqpTransport

__all__ = ["AmqpSub", "open_subscription"]


class AmqpSub(TransportSubscription):
    """One subscription: its pattern, sink, queue and consumer on the current connection."""

    def __init__(
        self,
        transport: AmqpTransport,
        pattern: str,
        sink: MessageSink,
        qos: int,
        group: str | None,
    ) -> None:
        self.transport = transport
        self.pattern = pattern
        self.sink = sink
        self.qos = 1 if qos else 0
        self.group = group
        self.key = binding_key(pattern)
        self.dollar_guard = pattern[0] in "+#"  # MQTT: a leading wildcard never matches "$..."
        self.durable = False
        self.queue_name = ""
        self.consumer_tag: str | None = None
        self.channel: aiormq.abc.AbstractChannel | None = None
        self.held: list[tuple[Message, str | None]] | None = None
        self.closed = False
        self.handler: Callable[[DeliveredMessage], Coroutine[Any, Any, None]] = self._on_message

    @property
    def replays(self) -> bool:
        """True when this subscription gets retained replays (queue groups do not)."""
        return self.group is None

    def named_queue(self, exchange: str, client_id: str | None) -> tuple[str, bool]:
        """``(queue name, durable)``: named for groups and client ids, else server-named."""
        digest = hashlib.sha1(self.pattern.encode()).hexdigest()[:16]
        if self.group is not None:
            return f"{exchange}.group.{self.group}.q{self.qos}.{digest}", False
        if self.qos and client_id is not None:
            return f"{exchange}.durable.{client_id}.{digest}", True
        return "", False

    async def unsubscribe(self) -> None:
        """Cancel the consumer and delete a durable queue; idempotent, never raises."""
        await self.transport._remove(self)

    # -- receiving ---------------------------------------------------------------------------

    async def _on_message(self, message: DeliveredMessage) -> None:
        """Aiormq's consumer callback (a task per message): hand the message to the sink."""
        delivery: Any = message.delivery
        channel = message.channel
        tag = delivery.delivery_tag
        topic = topic_from_key(delivery.routing_key)
        if self.closed or (self.dollar_guard and topic.startswith("$")):
            if self.qos:
                await _settle(channel, tag)
            return
        transport = self.transport
        if delivery.redelivered:
            transport.stats.duplicates += 1
        props = message.header.properties
        table = props.headers
        rid = table.get(RETAIN_ID) if table else None
        headers = from_properties(props) if (table or props.content_type) else None
        ack = partial(_settle, channel, tag) if self.qos else None
        msg = Message(topic, message.body, headers, False, self.qos, ack, None, rid is not None)
        held = self.held
        if held is not None:
            held.append((msg, rid if isinstance(rid, str) else None))
            return
        if not self.sink.deliver(msg):
            await self.sink.ready()

    def hold(self) -> None:
        """Hold live messages from now on (a retained replay is being read)."""
        if self.held is None:
            self.held = []

    def hand_over(self, state: Replay | None, *, resync: bool) -> None:
        """Deliver the replay's values, then the held live messages; stop holding."""
        sink = self.sink
        if resync:
            sink.resync_begin()
        if state is not None:
            for topic, (body, table) in state.values.items():
                if topic_matches(self.pattern, topic):  # one replay may serve several
                    headers = from_properties(_props(table)) if table else None
                    sink.deliver(Message(topic, body, headers, True, self.qos))
        if resync:
            sink.resync_end()
        held, self.held = self.held or [], None
        seen = state.ids if state is not None else set()
        for msg, rid in held:
            if rid is not None and rid in seen:
                if msg.ack is not None:
                    self.transport._tasks.spawn(_await(msg.ack()), "ack")
                continue  # the replay already reflects this retained publish
            sink.deliver(msg)


def _props(table: dict[str, Any]) -> spec.Basic.Properties:
    return spec.Basic.Properties(headers=table)


async def _await(pending: Awaitable[None]) -> None:
    await pending


async def _settle(channel: aiormq.abc.AbstractChannel, tag: int) -> None:
    """Acknowledge one delivery; a channel that is gone already means a redelivery later."""
    if channel.is_closed:
        return
    with contextlib.suppress(*errors.GONE):
        await channel.basic_ack(tag, wait=False)


async def open_subscription(
    channel: aiormq.abc.AbstractChannel, sub: AmqpSub, exchange: str, client_id: str | None
) -> None:
    """Declare the subscription's queue, bind it and start consuming (on ``channel``).

    Raises:
        SubscribeError: the broker refused the queue, binding or consumer.
        ConnectionLost: the connection went away meanwhile.
    """
    endpoint = sub.transport.url.endpoint()
    name, durable = sub.named_queue(exchange, client_id)
    with errors.subscribing(endpoint, sub.pattern):
        if name:
            ok = await channel.queue_declare(
                name, durable=durable, auto_delete=not durable, exclusive=False
            )
        else:
            ok = await channel.queue_declare("", exclusive=True, auto_delete=True)
        sub.queue_name = ok.queue or name
        sub.durable = durable
        await channel.queue_bind(sub.queue_name, exchange, routing_key=sub.key)
        consume = await channel.basic_consume(sub.queue_name, sub.handler, no_ack=not sub.qos)
    sub.consumer_tag = consume.consumer_tag
    sub.channel = channel
