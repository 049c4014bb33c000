"""Publishing: `Bus.publish` (the hot path, kept flat and inlined), `flush`, and encoding.

The common case (no middleware, no metadata) builds the envelope inline and hands it to an
in-process transport or encodes plain JSON once; everything refused or lost is counted in the
loss ledger by reason.
"""

from __future__ import annotations

import asyncio
import builtins
from collections.abc import Awaitable, Mapping
from time import time as _time
from typing import TYPE_CHECKING, Any

import msgspec

from . import _envelope, _stub
from ._bus_lifecycle import BusLifecycle
from ._cloudevents_binary import WithId
from ._codec import now_utc as _now
from ._envelope import DEFAULT_TYPE, Envelope
from ._errors import (
    BusError,
    ConnectionLost,
    EncodeError,
    PayloadTooLarge,
    PublishError,
    UnsupportedFeature,
)
from ._finite import check_finite, suspect
from ._middleware import compose
from ._stats import DropReason
from ._topics import validate_topic

if TYPE_CHECKING:
    from datetime import datetime

__all__ = ["BusPublishing"]

#: Untyped JSON: an in-process subscription's own copy of a payload (as `MemoryTransport`'s).
_json_copy = msgspec.json.Decoder().decode


class BusPublishing(BusLifecycle):
    """Publish and flush (part of `Bus`)."""

    async def publish(
        self,
        topic: str,
        payload: Any,
        *,
        qos: int = 0,
        retain: bool = False,
        headers: Mapping[str, str] | None = None,
        type: str | None = None,
        correlation_id: str | None = None,
        reply_to: str | None = None,
    ) -> None:
        """Publish ``payload`` to a concrete topic.

        Args:
            topic: A portable topic without wildcards, e.g. ``"cascade/telemetry/run1/t1/events"``.
            payload: Anything msgspec encodes (dict, list, str, numbers, Struct, dataclass) or
                bytes. ``b""`` with ``retain=True`` clears the topic's retained message.
            qos: 0 at most once, 1 at least once, 2 exactly once (as the transport allows).
            retain: Keep it as the topic's last value for future subscribers.
            headers: String headers carried with the message.
            type: The CloudEvents ``type`` (default ``cascade_bus.message``).
            correlation_id: Correlation id (set by `request` and `reply`).
            reply_to: Topic to reply to (set by `request`).

        Raises:
            InvalidTopic: the topic is empty, has an empty level or a wildcard.
            EncodeError: the payload cannot be encoded.
            PayloadTooLarge: the encoded message exceeds the transport's limit.
            UnsupportedFeature: the transport lacks the QoS or retained messages.
            PublishError: the broker refused it or it timed out.
            BusClosed: the bus is not open.
        """
        if (
            self._stub_publish
            and self._live
            and not (retain or headers or type or correlation_id or reply_to)
            and builtins.type(payload) is not bytes
        ):  # in process, no metadata: `_publish_payload` checks and hands over a `Stub`
            pending = self._publish_payload(topic, payload, qos, _envelope.next_id(), _now())
            if pending is not None:
                await pending
            return
        if not self._live:
            self._check_open()
        if builtins.type(topic) is not str or topic not in self._valid_topics:
            self._learn_topic(topic)
        if qos:
            self._check_qos(qos)
        if retain and not self.capabilities.retain:
            raise UnsupportedFeature(self._scheme, "retained messages")
        if self._publish_steps:
            env = self._codec.envelope(
                topic, payload, headers=headers, correlation_id=correlation_id,
                reply_to=reply_to, type=type,
            )  # fmt: skip

            async def send(final: Envelope[Any]) -> None:
                if final.topic is not topic:  # a middleware may have changed it
                    validate_topic(final.topic)
                if (
                    self._publish_local is not None
                    and not retain
                    and (builtins.type(final.payload) is not bytes or final.payload)
                ):
                    pending = self._send_local(final, qos)
                    if pending is not None:
                        await pending
                    return
                custom_type = None if final.type == DEFAULT_TYPE else final.type
                data, native = self._encode(
                    final.topic, final.payload, final.headers, custom_type,
                    final.correlation_id, final.reply_to, final,
                )  # fmt: skip
                pending = self._send(final.topic, data, native, qos, retain, final.reply_to)
                if pending is not None:
                    await pending

            await compose(send, self._publish_steps)(env)
            return
        if (
            self._publish_local is not None
            and not retain
            and (builtins.type(payload) is not bytes or payload)
        ):
            # (with metadata or bytes: without, the `Stub` path above took it)
            env = self._codec.envelope(
                topic, payload, headers=headers, correlation_id=correlation_id,
                reply_to=reply_to, type=type,
            )  # fmt: skip
            pending = self._send_local(env, qos)
            if pending is not None:
                await pending
            return
        if self._plain_json and not (headers or correlation_id or reply_to or type):
            if builtins.type(payload) is not bytes:
                data = self._codec.encode_plain(topic, payload)
                native = self._structured
            else:
                data, native = self._encode(topic, payload, None, None, None, None)
        else:
            data, native = self._encode(topic, payload, headers, type, correlation_id, reply_to)
        pending = self._send(topic, data, native, qos, retain, reply_to)
        if pending is not None:
            await pending

    def _publish_payload(
        self,
        topic: str,
        payload: Any,
        qos: int = 0,
        seq: int | str | None = None,
        when: float | datetime | None = None,
    ) -> Awaitable[None] | None:
        """`publish` of a payload without metadata, not retained: the `Connector`'s hot path.

        In process (memory://) the subscribers get the payload and a `Stub` instead of an
        envelope, and no coroutine is made: returns None once handed over, else an awaitable
        to wait on (a full subscriber, QoS 1; on other transports, `publish` itself).
        ``seq`` and ``when`` are the stub's (see `Stub`): by default a sequence number and a
        UNIX time, which `Bus.publish` replaces with the id and datetime it would send.
        The caller has checked that the bus is open (``_live``).

        Raises:
            As `publish`.
        """
        local = self._payload_local
        if local is None:
            return self.publish(topic, payload, qos=qos)
        try:
            if topic not in self._valid_topics:  # (equal to a str checked before: one)
                self._learn_topic(topic)
        except TypeError:  # unhashable, so not a topic
            validate_topic(topic)
        if qos:
            self._check_qos(qos)
        msgpack = self._local_msgpack
        try:
            body = self._local_encode(payload)
        except (TypeError, ValueError, OverflowError) as exc:
            raise EncodeError(
                f"cannot encode payload of type {builtins.type(payload).__name__} for topic "
                f"{topic!r}: {exc}"
            ) from None
        if (msgpack or body.partition(b"null")[1]) and suspect(body, msgpack):  # inlined
            check_finite(payload, body, msgpack=msgpack, topic=topic)
        if len(body) > self._payload_near_limit:  # near the limit: measure it all
            if self._publish_local is None:  # (the raw format: it sends the payload alone)
                return self.publish(topic, payload, qos=qos)
            return self._send_local(self._codec.envelope(topic, payload), qos)
        stub = (
            topic,
            self._source,
            seq or _stub.next_seq(),  # (an id or a datetime is never false)
            when or _time(),
        )
        sink = self._local_singles.get(topic)
        if sink is not None:  # its only subscription gets a copy: `SubscriptionSink.push` inlined
            item = (topic, _json_copy(body), (stub, body, False))
            buf = sink._buf
            if len(buf) < sink._push_high:
                buf.append(item)
                if sink._waiter is not None:
                    sink._wake()
                self._stats.published += 1
                return None
            pending: Awaitable[None] | None = None if sink.push(item) else sink.ready()
        else:
            try:
                pending = local(topic, (stub, body, msgpack), qos)
            except BusError:
                self._stats.drop(DropReason.PUBLISH_FAILED)
                raise
        if pending is None:
            self._stats.published += 1
            return None
        return self._finish_send(topic, pending, qos)

    def _learn_topic(self, topic: str) -> None:
        """Validate a publish topic and remember it, so the next publish to it skips the check."""
        validate_topic(topic)
        if len(self._valid_topics) >= 4096:
            self._valid_topics.clear()
        self._valid_topics.add(topic)

    def _send(
        self,
        topic: str,
        data: bytes,
        native: Mapping[str, str] | None,
        qos: int,
        retain: bool,
        reply_to: str | None = None,
    ) -> Awaitable[None] | None:
        """Hand one body to the transport; returns what is left to await, if anything."""
        limit = self.transport.max_payload
        if limit is not None and len(data) > limit:
            self._stats.drop(DropReason.PAYLOAD_TOO_LARGE)
            raise PayloadTooLarge(
                f"message for {topic!r} is {len(data)} bytes; {self._scheme}:// accepts at most "
                f"{limit}",
                size=len(data),
                limit=limit,
            )
        try:
            pending = self._transport_send(
                topic, data, qos, retain, native, None if retain else reply_to
            )
        except BusError as exc:
            self._stats.drop(_reason_for(exc))
            raise
        if pending is None:  # handed over synchronously
            self._stats.published += 1
            return None
        return self._finish_send(topic, pending, qos)

    def _send_local(self, env: Envelope[Any], qos: int) -> Awaitable[None] | None:
        """In-process publish: the envelope and its encoded payload, never the full body."""
        local = self._codec.local(env)
        body = local[1]
        limit = self._local_limit
        # The payload bounds the full body from below: encode the whole envelope only when
        # the payload comes within 1 KiB of the limit.
        if (
            limit is not None
            and (len(body) if body is not None else len(env.payload)) + 1024 > limit
        ):
            size = len(
                self._codec.encode_envelope(env, "msgpack" if self._format == "msgpack" else "json")
            )
            if size > limit:
                self._stats.drop(DropReason.PAYLOAD_TOO_LARGE)
                raise PayloadTooLarge(
                    f"message for {env.topic!r} is {size} bytes; {self._scheme}:// accepts at "
                    f"most {limit}",
                    size=size,
                    limit=limit,
                )
        assert self._publish_local is not None
        try:
            pending = self._publish_local(env.topic, local, qos)
        except BusError:
            self._stats.drop(DropReason.PUBLISH_FAILED)
            raise
        if pending is None:
            self._stats.published += 1
            return None
        return self._finish_send(env.topic, pending, qos)

    async def _finish_send(self, topic: str, pending: Awaitable[None], qos: int) -> None:
        """Await the transport; QoS>=1 waits are bounded by ``publish_timeout``.

        QoS 0 waits are the transport's own flow control, bounded by the transport.
        """
        self._inflight += 1
        try:
            if qos and isinstance(pending, asyncio.Future):
                self._deadlines.watch(pending)  # one timer for all: no timeout per publish
                await pending
            elif qos:
                async with asyncio.timeout(self._publish_timeout):
                    await pending
            else:
                await pending
        except BusError as exc:
            self._stats.drop(_reason_for(exc))
            if isinstance(exc, PublishError) and exc.topic is None:
                exc.topic = topic  # a transport's future may not know it
            raise
        except TimeoutError:
            self._stats.drop(DropReason.PUBLISH_FAILED)
            raise PublishError(
                f"publish to {topic!r} not confirmed within {self._publish_timeout}s",
                topic=topic,
            ) from None
        finally:
            self._inflight -= 1
            if self._idle is not None and not self._inflight:
                self._idle.set()
        self._stats.published += 1

    def _encode(
        self,
        topic: str,
        payload: Any,
        headers: Mapping[str, str] | None,
        type: str | None,
        correlation_id: str | None,
        reply_to: str | None,
        env: Envelope[Any] | None = None,
    ) -> tuple[bytes, Mapping[str, str] | None]:
        """Encode one message in the bus's format; ``env`` reuses an envelope already built."""
        if isinstance(payload, bytes) and not payload:
            return b"", None  # an empty body: clears a retained topic everywhere
        codec = self._codec
        if self._format == "raw":
            if self._raw_headers:
                if env is None and not (headers or correlation_id or reply_to or type):
                    # No per-message metadata: the bare body, the constant headers built once
                    # and the id the binding requires; bytes say so to stay bytes.
                    if isinstance(payload, bytes):
                        return payload, WithId(self._raw_octet_headers, _envelope.next_id())
                    return codec.encode_payload(payload, topic), WithId(
                        self._raw_static_headers, _envelope.next_id()
                    )
                if env is None:
                    env = codec.envelope(
                        topic, payload, headers=headers, correlation_id=correlation_id,
                        reply_to=reply_to, type=type,
                    )  # fmt: skip
                return codec.encode_payload(payload, topic), codec.binary_headers(env)
            if not (headers or correlation_id or reply_to or type):
                return codec.encode_payload(payload, topic), None
            # Metadata needs somewhere to live: without native headers, send the envelope.
        if env is None:
            env = codec.envelope(
                topic, payload, headers=headers, correlation_id=correlation_id,
                reply_to=reply_to, type=type,
            )  # fmt: skip
        body = codec.encode_envelope(env, "msgpack" if self._format == "msgpack" else "json")
        return body, self._structured

    async def flush(self, timeout: float = 10.0) -> None:
        """Return once everything published so far has reached the broker.

        Raises:
            PublishError: not flushed within ``timeout`` seconds.
        """
        self._check_open()
        try:
            async with asyncio.timeout(timeout):
                await self.transport.flush(timeout)
        except TimeoutError:
            raise PublishError(f"flush did not complete within {timeout}s") from None


def _reason_for(error: BusError) -> str:
    """The loss-ledger reason for a publish the transport refused with ``error``."""
    if isinstance(error, ConnectionLost):
        return DropReason.DISCONNECTED
    if isinstance(error, PayloadTooLarge):
        return DropReason.PAYLOAD_TOO_LARGE
    if isinstance(error, PublishError) and error.reason:
        return error.reason
    return DropReason.PUBLISH_FAILED
