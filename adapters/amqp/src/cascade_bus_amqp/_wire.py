"""The publish hot path on an aiormq channel, and headers ⇄ AMQP properties (CloudEvents binding).

`Wire.send` writes one ``basic.publish`` straight into aiormq's frame queue and registers its
publisher-confirm future itself: no task, lock or coroutine per message. It relies on aiormq
internals, checked once by `supported`; when they differ (or the queue is full, or a public
publish holds the channel's lock) it falls back to aiormq's public ``basic_publish``.

Headers follow the CloudEvents AMQP binding: the bus's binary-mode ``ce-<attr>`` headers
(percent-encoded values) travel as ``cloudEvents_<attr>`` headers with plain values
(``cloudEvents:<attr>`` is read too), ``datacontenttype`` (or a structured body's
``content-type``) as the AMQP ``content_type`` property.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Mapping
from types import MappingProxyType
from typing import Any

import aiormq
from aiormq.abc import ChannelFrame
from pamqp import commands as spec
from pamqp.header import ContentHeader

from cascade_bus.spi import TaskSet, decode_header_value, encode_header_value

__all__ = ["Wire", "from_properties", "supported", "to_properties"]

_INTERNALS = (
    "write_queue",
    "delivery_tag",
    "confirmations",
    "lock",
    "number",
    "_split_body",
    "message_id_delivery_tag",
)
_CE = "ce-"
_AMQP_CE = "cloudEvents_"


def supported(channel: aiormq.abc.AbstractChannel) -> bool:
    """Tell whether this aiormq channel has the internals `Wire.send` writes into."""
    return all(hasattr(channel, name) for name in _INTERNALS) and isinstance(
        getattr(channel, "confirmations", None), dict
    )


def binding_headers(headers: Mapping[str, str]) -> tuple[dict[str, Any], str | None]:
    """The AMQP header table and content type of the bus's headers (CloudEvents binding)."""
    content_type = None
    table: dict[str, Any] = {}
    for key, value in headers.items():
        if key.startswith(_CE):
            text = decode_header_value(value, key)  # the binding wants the plain value
            if key == "ce-datacontenttype":
                content_type = text
            else:
                table[_AMQP_CE + key[3:]] = text
        elif key == "content-type":
            content_type = value
        else:
            table[key] = value
    return table, content_type


# The bus hands the same constant headers object for every message without metadata of its own
# (``format=raw``): its translation is kept, keyed by identity (never mutated by callers).
_last: list[Any] = [None, None, None]


def to_properties(
    headers: Mapping[str, str] | None, persistent: bool, reply_to: str | None = None
) -> spec.Basic.Properties:
    """AMQP properties for a bus message: its headers (CloudEvents binding), delivery mode."""
    table: dict[str, Any] | None = None
    content_type = None
    if headers:
        if headers is _last[0]:
            table, content_type = _last[1], _last[2]
        else:
            table, content_type = binding_headers(headers)
            if type(headers) is MappingProxyType:  # a constant of the bus: worth keeping
                _last[:] = [headers, table, content_type]
    return spec.Basic.Properties(
        headers=table,
        content_type=content_type,
        delivery_mode=2 if persistent else 1,
        reply_to=reply_to,
    )


def from_properties(props: spec.Basic.Properties) -> dict[str, str] | None:
    """The bus's headers of a received message (``ce-*`` back from the CloudEvents binding)."""
    table = props.headers
    if not table and not props.content_type:
        return None
    out: dict[str, str] = {}
    event = False
    if table:
        for key, value in table.items():
            text = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
            if key.startswith(("cloudEvents_", "cloudEvents:")):
                out[_CE + key[12:]] = encode_header_value(text)
                event = True
            elif not key.startswith("x-cascade-"):  # the transport's own
                out[key] = text
    if props.content_type:
        out["ce-datacontenttype" if event else "content-type"] = (
            encode_header_value(props.content_type) if event else props.content_type
        )
    return out


class Wire:
    """Publishes on one confirm-mode channel, in call order; QoS >= 1 gets a confirmation future.

    Delivery tags are assigned synchronously in call order, so frames must reach aiormq's
    queue in that order too: when the queue is full, later frames wait in `_backlog` behind
    the earlier ones (one drainer task), and their publishers wait on a future (flow control).

    Args:
        channel: An open aiormq channel with publisher confirms on.
        exchange: The exchange every message is routed through by default.
        tasks: The transport's tasks (the drainer runs there).
    """

    __slots__ = ("_backlog", "_drainer", "_fast", "_tasks", "channel", "exchange", "loop")

    def __init__(self, channel: aiormq.abc.AbstractChannel, exchange: str, tasks: TaskSet) -> None:
        self.channel = channel
        self.exchange = exchange
        self._tasks = tasks
        self.loop = asyncio.get_running_loop()
        self._fast = supported(channel)
        self._backlog: deque[tuple[ChannelFrame, asyncio.Future[None]]] = deque()
        self._drainer: asyncio.Task[None] | None = None

    @property
    def fast(self) -> bool:
        """True when the fast path into aiormq's internals is in use."""
        return self._fast

    def send(
        self,
        key: str,
        body: bytes,
        props: spec.Basic.Properties,
        confirm: bool,
        *,
        exchange: str | None = None,
        message_id: str | None = None,
    ) -> tuple[asyncio.Future[Any] | None, Awaitable[Any] | None]:
        """Write one publish: ``(confirmation, wait)``.

        ``confirmation`` (when ``confirm``) is settled by the broker's ack (result), nack
        (`aiormq.exceptions.DeliveryError`) or return (the returned message; only with a
        ``message_id``, which also makes the publish mandatory). ``wait`` is set when the
        caller must wait before publishing more (aiormq's frame queue is full), or, on the
        public-API fallback, is the whole publish.
        """
        exchange = self.exchange if exchange is None else exchange
        if not self._fast:
            return None, self.public(key, body, props, exchange, message_id)
        channel: Any = self.channel
        channel.delivery_tag += 1
        tag = channel.delivery_tag
        # Every publish gets a future (QoS 0 too), so that `flush` can wait for all of them.
        fut: asyncio.Future[Any] = self.loop.create_future()
        channel.confirmations[tag] = fut
        if message_id is not None:
            props.message_id = message_id
            channel.message_id_delivery_tag[message_id] = tag
        frames: list[Any] = [
            spec.Basic.Publish(
                exchange=exchange, routing_key=key, mandatory=message_id is not None
            ),
            ContentHeader(properties=props, body_size=len(body)),
        ]
        if body:
            frames.extend(channel._split_body(body))
        frame = ChannelFrame.marshall(channel_number=channel.number, frames=frames)
        queue = channel.write_queue
        if self._backlog or queue.full():
            put: asyncio.Future[None] = self.loop.create_future()
            self._backlog.append((frame, put))
            if self._drainer is None:
                self._drainer = self._tasks.spawn(self._drain(queue), "drain")
            return (fut if confirm else None), put
        queue.put_nowait(frame)
        return (fut if confirm else None), None

    async def _drain(self, queue: asyncio.Queue[Any]) -> None:
        """Move waiting frames into aiormq's queue, in order, as it makes room."""
        backlog = self._backlog
        try:
            while backlog:
                frame, put = backlog[0]
                await queue.put(frame)
                backlog.popleft()
                if not put.done():
                    put.set_result(None)
        finally:
            self._drainer = None

    def abort(self, error: BaseException) -> int:
        """The channel is gone: fail the waiting publishers; return how many frames were lost."""
        drainer, self._drainer = self._drainer, None
        if drainer is not None:
            drainer.cancel()
        lost = len(self._backlog)
        while self._backlog:
            _, put = self._backlog.popleft()
            if not put.done():
                put.set_exception(error)
                put.exception()
        return lost

    async def public(
        self,
        key: str,
        body: bytes,
        props: spec.Basic.Properties,
        exchange: str,
        message_id: str | None,
    ) -> Any:
        """Publish through aiormq's public API (awaits the confirmation, even for QoS 0)."""
        if message_id is not None:
            props.message_id = message_id
        return await self.channel.basic_publish(
            body,
            exchange=exchange,
            routing_key=key,
            properties=props,
            mandatory=message_id is not None,
        )
