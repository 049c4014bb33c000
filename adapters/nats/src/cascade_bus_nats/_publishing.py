"""The publish paths beyond the QoS-0 hot path: QoS 1 (JetStream), retained, while down.

A retained publish writes the KV entry first, then sends its live copy with the entry's
revision (`REVISION_HEADER`); QoS 1 waits for the stream's ack (`InFlight`); while
disconnected every publish returns once it is in the offline buffer (`Outbox`).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
from collections.abc import Awaitable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import nats.errors as nats_errors

from cascade_bus import BusClosed, PublishError
from cascade_bus.spi import DropReason

from ._errors import GONE, publish_error, send_error, too_large
from ._mapper import topic_from_subject
from ._outgoing import Out, Outbox
from ._wire import (
    JS_HEADROOM,
    JS_HEADROOM_BYTES,
    KV_OP,
    MSG_ID,
    REVISION_HEADER,
    WithMsgId,
    header_bytes,
)

_NO_HEADERS: Mapping[str, str] = MappingProxyType({})

if TYPE_CHECKING:
    from ._transport import NatsTransport

__all__ = ["Publishing"]

log = logging.getLogger("cascade_bus.nats")


class Publishing:
    """QoS-1, retained and held publishes of one transport.

    Args:
        transport: The transport it serves (writer, subjects, connection state).
        outbox: Where messages wait for a connection or an ack.
    """

    def __init__(self, transport: NatsTransport, outbox: Outbox) -> None:
        self.t = transport
        self.outbox = outbox
        self.msg_id_prefix = f"cbus:{transport._uid}:"
        self._msg_ids = itertools.count(1)

    def next_msg_id(self) -> str:
        """A fresh ``Nats-Msg-Id`` (the stream drops a resend with the same id)."""
        return f"{self.msg_id_prefix}{next(self._msg_ids)}"

    def qos1_nowait(
        self, topic: str, data: bytes, headers: Mapping[str, str] | None
    ) -> Awaitable[Any] | None:
        """`js_publish` without a coroutine.

        Returns the future the stream's acknowledgement settles (the bus bounds it by
        ``publish_timeout``), or None when the message went to the offline buffer.

        Raises:
            PublishError: disconnected and the offline buffer is full.
        """
        t = self.t
        if t._closed:
            raise BusClosed("the NATS transport is closed")
        size = len(data) + JS_HEADROOM_BYTES + (header_bytes(headers) if headers else 0)
        if size > t.max_payload:
            raise too_large(topic, size, t.max_payload)
        extra: Mapping[str, str]
        if headers is None or (type(headers) is MappingProxyType and MSG_ID not in headers):
            # The bus's constant headers and the id: the writer frames the constant part once.
            extra = WithMsgId(headers or _NO_HEADERS, self.next_msg_id())
        else:
            extra = {**headers, MSG_ID: self.next_msg_id()}
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        out = Out(topic, t._q1_prefix + t._subject(topic), data, extra, future, confirm=True)
        pending = self.outbox.submit(out)
        if out.detached:
            return None  # held for the next connection: accepted
        return future if pending is None else _written_then(pending, future)

    async def publish(
        self,
        topic: str,
        data: bytes,
        qos: int,
        retain: bool,
        headers: Mapping[str, str] | None,
        reply: str = "",
    ) -> None:
        """Publish a QoS-1 or retained message, or a QoS-0 one while disconnected."""
        t = self.t
        if t._closed:
            raise BusClosed("the NATS transport is closed")
        subject = t._subject(topic)
        extra: dict[str, str] = dict(headers) if headers else {}
        if retain or qos:
            if not t._opts.jetstream:
                raise PublishError(
                    f"QoS 1 and retained messages need JetStream (jetstream=false): {topic!r}",
                    topic=topic,
                )
            t._check_size(topic, data, {**extra, **JS_HEADROOM})
        if retain:
            await self._publish_retained(topic, subject, data, extra, qos)
        elif qos:
            await self.js_publish(topic, t._q1_prefix + subject, data, extra)
        else:
            await self._publish_core(subject, data, extra or None, reply)

    async def _publish_retained(
        self, topic: str, subject: str, data: bytes, headers: dict[str, str], qos: int
    ) -> None:
        """Write the value to the bucket, then (`_send_live`) publish its live copy.

        Returns once both are done, or once the KV write is in the offline buffer.
        """
        stored = dict(headers)
        if not data:
            stored[KV_OP] = "DEL"
        stored[MSG_ID] = self.next_msg_id()
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        out = Out(topic, self.t._retained.prefix + subject, data, stored, future, confirm=True)
        out.then = functools.partial(self._send_live, subject, data, headers, qos)
        pending = self.outbox.submit(out)
        if pending is not None:
            await pending
        try:
            await future
        except PublishError as exc:
            raise PublishError(str(exc), topic=topic, reason=exc.reason) from exc

    def _send_live(
        self,
        subject: str,
        data: bytes,
        headers: dict[str, str],
        qos: int,
        written: Out,
        rev: int,
    ) -> None:
        """A retained value is in the bucket as revision ``rev``: publish its live copy.

        Called when the KV write is acknowledged (`Outbox.settle`); the publisher's future, if
        it still waits, goes on to the live copy. Never raises (runs in the receive path).
        """
        t = self.t
        outbox = self.outbox
        live_headers = {**headers, REVISION_HEADER: str(rev)}
        future = written.future
        if qos:
            live_headers[MSG_ID] = self.next_msg_id()
            out = Out(written.topic, t._q1_prefix + subject, data, live_headers, future,
                      confirm=True)  # fmt: skip
            out.detached = written.detached
            outbox.unsettled += 1
            outbox.idle.clear()
            if t._connected:
                pending = outbox.inflight.send(out)
                if pending is not None:
                    t._tasks.spawn(pending, "live-copy")
            else:
                outbox.park(out)  # held beyond offline_buffer: its KV write was accepted
            return
        error: BaseException | None = None
        held = Out(written.topic, subject, data, live_headers, None, confirm=False)
        if t._connected:
            try:
                writing = t._writer.publish(subject, data, live_headers)
                if writing is not None:
                    t._tasks.spawn(self._write_live(writing, held), "live-copy")
            except GONE:
                outbox.park(held)
            except (ValueError, nats_errors.Error) as exc:
                error = send_error(exc, "publish of the live copy")
        else:
            outbox.park(held)
        if future is not None and not future.done():
            written.settle(error)
        elif error is not None and written.detached:
            outbox.lost(written, error, DropReason.PUBLISH_FAILED)

    async def _write_live(self, pending: Awaitable[Any], held: Out) -> None:
        """Wait for the write of a retained value's QoS-0 live copy (held again if lost)."""
        try:
            await pending
        except GONE:
            if not self.t._closing:
                self.outbox.park(held)
        except nats_errors.Error as exc:
            self.outbox.lost(held, exc, DropReason.PUBLISH_FAILED)

    async def _publish_core(
        self, subject: str, data: bytes, headers: dict[str, str] | None, reply: str = ""
    ) -> None:
        t = self.t
        if t._connected and t._nc is not None:
            try:
                pending = t._writer.publish(subject, data, headers, reply)
                if pending is not None:
                    await pending
                return
            except GONE:
                pass  # lost it just now: hold it like any other message while disconnected
            except (ValueError, nats_errors.Error) as exc:
                topic = topic_from_subject(subject)
                raise publish_error(exc, topic, len(data), t.max_payload) from exc
        held = Out(topic_from_subject(subject), subject, data, headers, None, confirm=False)
        held.reply = reply
        self.outbox.hold(held)

    async def js_publish(
        self, topic: str, subject: str, data: bytes, headers: dict[str, str]
    ) -> None:
        """Publish to a JetStream subject and wait for the stream's ack.

        The message is sent again (same ``Nats-Msg-Id``) after a lost connection, a missing
        ack (``ack_timeout``) or a temporary refusal, until ``qos1_timeout`` runs out. While
        disconnected it returns once the message is in the offline buffer.
        """
        headers[MSG_ID] = self.next_msg_id()
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        out = Out(topic, subject, data, headers, future, confirm=True)
        pending = self.outbox.submit(out)
        if pending is not None:
            await pending
        try:
            await future
        except asyncio.CancelledError:
            if not out.detached:
                self.outbox.abandon(out)
            raise
        except PublishError as exc:
            raise PublishError(str(exc), topic=topic, reason=exc.reason) from exc


async def _written_then(pending: Awaitable[None], future: asyncio.Future[None]) -> None:
    await pending
    await future
