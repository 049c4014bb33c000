"""The `Bus`: publish, subscribe, request/reply and the counters, over any `Transport`."""

from __future__ import annotations

import asyncio
import builtins
import enum
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Generator, Mapping, Sequence
from functools import partial
from types import MappingProxyType, TracebackType
from typing import Any, Self, TypeVar, overload

from . import _envelope
from ._codec import Codec, WireFormat, check_format, decoder_for, local_payload_encoder
from ._codec import now_utc as _now
from ._deadlines import Deadlines
from ._envelope import DEFAULT_TYPE, Envelope, new_id
from ._errors import (
    BusClosed,
    BusError,
    ConnectError,
    ConnectionLost,
    InvalidTopic,
    InvalidURL,
    NoResponders,
    PayloadTooLarge,
    PublishError,
    RequestTimeout,
    SubscribeError,
    UnsupportedFeature,
)
from ._middleware import Middleware, compose, steps
from ._registry import get_transport
from ._stats import DropReason, Stats
from ._subscription import Handler, Overflow, SubscribeCall, Subscription, SubscriptionPolicy
from ._topics import has_wildcards, validate_pattern, validate_topic
from ._transport import Transport
from ._url import BusURL, parse_float, parse_int

__all__ = ["Bus", "ErrorHook", "connect"]

T = TypeVar("T")
log = logging.getLogger("cascade_bus")

#: Called for every error the bus absorbs (handler exceptions, undecodable messages, ...):
#: ``hook(error, topic, envelope_or_None)``.
ErrorHook = Callable[[Exception, str, "Envelope[Any] | None"], object]

_BUS_OPTIONS = frozenset(
    {
        "format",
        "source",
        "buffer_size",
        "connect_timeout",
        "publish_timeout",
        "subscribe_timeout",
        "close_timeout",
        "flow_timeout",
        "retained_timeout",
        "inbox_prefix",
        "dedupe",
    }
)


class _State(enum.Enum):
    NEW = "new"
    OPENING = "opening"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


def _default_source() -> str:
    return f"cascade-bus://{socket.gethostname()}/{os.getpid()}"


class Bus:
    """A connection to one broker through one transport, with envelopes and dispatch.

    Build it with `connect` (or directly) and open it with ``async with`` or ``await
    bus.open()``. A bus is single-use: once closed it cannot be reopened (make a new one).

    Args:
        url: The broker URL, e.g. ``"memory://"``, ``"mqtt://user:pass@host:1883"``. Query
            parameters are options; keyword options override them.
        transport: A ready-made `Transport` instance instead of a URL.
        on_error: Called with every error the bus absorbs instead of raising (a failing
            handler, an undecodable message); the default logs it.
        middleware: `Middleware` instances wrapping every publish and every handler call of
            this bus, first = outermost (OpenTelemetry, metrics, auditing).
        **options: Bus options (below) and transport options (see each transport's docs).

    The bus options (in the URL query or as keywords) are:

    - ``format``: ``json`` (default; the CloudEvents envelope), ``msgpack``, or ``raw`` (the
      bare payload; metadata in native headers where the transport has them).
    - ``source``: the CloudEvents ``source`` of published envelopes.
    - ``buffer_size``: messages each subscription queues before flow control (10,000).
    - ``connect_timeout``, ``publish_timeout``, ``subscribe_timeout``, ``close_timeout``,
      ``flow_timeout``, ``retained_timeout``: bounds, in seconds, for every wait in the bus.
    - ``inbox_prefix``: topic prefix for request/reply inboxes (``_inbox``).
    - ``dedupe``: suppress a message whose envelope id each subscription saw among its last
      ``dedupe`` messages (0, the default: off); suppressed ones count as duplicates.

    Raises:
        UnknownScheme: no transport is installed for the URL's scheme.
        InvalidURL: the URL or an option is invalid.
    """

    def __init__(
        self,
        url: str | BusURL | None = None,
        *,
        transport: Transport | None = None,
        on_error: ErrorHook | None = None,
        middleware: Sequence[Middleware] = (),
        **options: Any,
    ) -> None:
        for item in middleware:
            if not isinstance(item, Middleware):
                raise TypeError(f"middleware must be Middleware instances, got {item!r}")
        self._publish_steps = steps(middleware, "publish")
        self._handle_steps = steps(middleware, "handle")
        if transport is None:
            if url is None:
                raise InvalidURL("Bus needs a url or a transport")
            parsed = url if isinstance(url, BusURL) else BusURL(url)
            merged = parsed.merged_options(options)
            bus_options = {k: merged.pop(k) for k in list(merged) if k in _BUS_OPTIONS}
            # `merged` already holds the query minus the bus options: build from it directly.
            transport = get_transport(parsed.scheme)(parsed, merged)
        else:
            unknown = set(options) - _BUS_OPTIONS
            if unknown:
                raise InvalidURL(
                    f"unknown bus option(s) {', '.join(sorted(unknown))}; transport options "
                    "belong to the transport instance"
                )
            bus_options = dict(options)
        self.transport = transport
        transport.on_no_responders = self._on_no_responders
        self.url = transport.url
        self.id = new_id()
        self.capabilities = transport.capabilities
        self._scheme = transport.url.scheme
        self._format: WireFormat = check_format(bus_options.get("format", "json"))
        self._codec = Codec(self._format, str(bus_options.get("source") or _default_source()))
        self._source = self._codec.source
        self._buffer_size = parse_int("buffer_size", bus_options.get("buffer_size", 10_000))
        if self._buffer_size < 1:
            raise InvalidURL("buffer_size must be at least 1")
        self._dedupe = parse_int("dedupe", bus_options.get("dedupe", 0))
        if self._dedupe < 0:
            raise InvalidURL("dedupe must be 0 (off) or a window size >= 1")
        self._connect_timeout = parse_float(
            "connect_timeout", bus_options.get("connect_timeout", 10.0)
        )
        self._publish_timeout = parse_float(
            "publish_timeout", bus_options.get("publish_timeout", 30.0)
        )
        self._deadlines = Deadlines(self._publish_timeout)
        self._subscribe_timeout = parse_float(
            "subscribe_timeout", bus_options.get("subscribe_timeout", 10.0)
        )
        self._close_timeout = parse_float("close_timeout", bus_options.get("close_timeout", 10.0))
        self._flow_timeout = parse_float("flow_timeout", bus_options.get("flow_timeout", 10.0))
        self._retained_timeout = parse_float(
            "retained_timeout", bus_options.get("retained_timeout", 5.0)
        )
        self._inbox_prefix = str(bus_options.get("inbox_prefix", "_inbox")).strip("/")
        try:
            validate_topic(self._inbox_prefix)
        except InvalidTopic as exc:
            raise InvalidURL(f"option inbox_prefix={self._inbox_prefix!r}: {exc}") from None
        self._on_error = on_error
        self._stats = transport.stats
        self._state = _State.NEW
        self._live = False  # == (self._state is _State.OPEN); an enum compare costs ~60 ns
        self._valid_topics: set[str] = set()  # publish topics already validated
        self._subs: set[Subscription[Any]] = set()
        self._inflight = 0
        self._idle: asyncio.Event | None = None
        self._closed_event: asyncio.Event | None = None
        self._inbox: Subscription[Any] | None = None
        self._inbox_lock: asyncio.Lock | None = None
        self._replies: dict[str, asyncio.Future[Envelope[Any]]] = {}
        self._report_overflow = True
        self._background: set[asyncio.Task[None]] = set()  # acks of dropped messages
        self._raw_headers = self._format == "raw" and self.capabilities.headers
        static = {"ce-specversion": "1.0", "ce-source": self._codec.source, "ce-type": DEFAULT_TYPE}
        self._raw_static_headers: Mapping[str, str] = MappingProxyType(static)
        self._raw_octet_headers: Mapping[str, str] = MappingProxyType(
            {**static, "content-type": "application/octet-stream"}
        )
        self._plain_json = self._format == "json"
        # memory:// takes envelopes instead of bodies: each subscription copies the payload.
        self._publish_local: Callable[..., Awaitable[None] | None] | None = (
            getattr(transport, "publish_local", None) if self._format != "raw" else None
        )
        # An in-process transport's limit is fixed when it is built: no property call per message.
        self._local_limit = transport.max_payload if self._publish_local is not None else None
        self._local_msgpack = self._format == "msgpack"
        self._local_encode = local_payload_encoder(self._local_msgpack)
        # Optional: requests handed over with their reply topic (NATS reply subjects).
        self._publish_request: Callable[..., Awaitable[None] | None] | None = getattr(
            transport, "publish_request", None
        )
        # Optional transport fast path: deliver synchronously, return an awaitable only to wait.
        self._publish_nowait: Callable[..., Awaitable[None] | None] | None = getattr(
            transport, "publish_nowait", None
        )
        self._exact_filter = not transport.filters_exactly

    def __repr__(self) -> str:
        return f"<Bus {self.url.redacted()} {self._state.value}>"

    # -- lifecycle -----------------------------------------------------------------------------

    async def open(self) -> Self:
        """Connect the transport (bounded by ``connect_timeout``); idempotent while open.

        Raises:
            ConnectError: the broker could not be reached.
            BusClosed: the bus was closed already.
        """
        if self._state is _State.OPEN:
            return self
        if self._state is not _State.NEW:
            raise BusClosed(f"{self!r} cannot be opened again; create a new bus")
        self._state = _State.OPENING
        try:
            async with asyncio.timeout(self._connect_timeout):
                await self.transport.connect()
        except TimeoutError:
            self._state = _State.CLOSED
            await self._abort()
            raise ConnectError(
                f"could not connect to {self.url.endpoint()} within {self._connect_timeout}s"
            ) from None
        except BusError:
            self._state = _State.CLOSED
            await self._abort()
            raise
        except Exception as exc:
            self._state = _State.CLOSED
            await self._abort()
            raise ConnectError(f"could not connect to {self.url.endpoint()}: {exc}") from exc
        except BaseException:
            self._state = _State.CLOSED
            await self._abort()
            raise
        self._state = _State.OPEN
        self._live = True
        log.debug("bus %s open", self.url.redacted())
        return self

    async def _abort(self) -> None:
        try:
            await asyncio.shield(self.transport.aclose())
        except Exception as exc:
            log.debug("closing %s after a failed open: %r", self.url.redacted(), exc)

    def __await__(self) -> Generator[Any, None, Self]:
        return self.open().__await__()

    async def __aenter__(self) -> Self:
        return await self.open()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def is_open(self) -> bool:
        """True between a successful `open` and the start of `close`."""
        return self._state is _State.OPEN

    async def close(self) -> None:
        """Drain and disconnect cleanly; once it returns, every earlier publish reached the broker.

        Publishes in flight finish, the transport flushes, handlers finish what they hold (all
        bounded by ``close_timeout``), then the transport disconnects.

        Idempotent: a second call waits for the first to finish.
        """
        if self._state in (_State.CLOSING, _State.CLOSED):
            if self._closed_event is not None:
                await self._closed_event.wait()
            return
        if self._state is _State.NEW:
            self._state = _State.CLOSED
            return
        self._state = _State.CLOSING
        self._live = False
        self._closed_event = closed = asyncio.Event()
        try:
            await asyncio.shield(self._drain_and_close())
        finally:
            self._state = _State.CLOSED
            closed.set()

    async def _drain_and_close(self) -> None:
        deadline = asyncio.get_running_loop().time() + self._close_timeout

        def left() -> float:
            return max(0.0, deadline - asyncio.get_running_loop().time())

        if self._inflight:
            self._idle = asyncio.Event()
            try:
                async with asyncio.timeout(left()):
                    await self._idle.wait()
            except TimeoutError:
                log.warning(
                    "close(): %d publishes still in flight after the timeout", self._inflight
                )
        try:
            await self.transport.flush(left())
        except Exception as exc:
            log.warning("close(): flush of %s failed: %r", self.url.redacted(), exc)
        subs = list(self._subs)
        await asyncio.gather(
            *(s._shutdown(drain=left(), reason=DropReason.CLOSED, detach=False) for s in subs),
            return_exceptions=True,
        )
        for fut in self._replies.values():
            if not fut.done():
                fut.set_exception(BusClosed("the bus was closed while waiting for a reply"))
        self._replies.clear()
        try:
            async with asyncio.timeout(max(left(), 1.0)):
                await self.transport.aclose()
        except Exception as exc:
            log.warning("close(): disconnect from %s failed: %r", self.url.redacted(), exc)
        log.debug("bus %s closed", self.url.redacted())

    def _check_open(self) -> None:
        if self._state is not _State.OPEN:
            if self._state in (_State.NEW, _State.OPENING):
                raise BusClosed(
                    f"{self!r} is not open yet: use 'async with connect(...) as bus' "
                    "or 'await bus.open()'"
                )
            raise BusClosed(f"{self!r} is closed")

    # -- publishing ----------------------------------------------------------------------------

    def _check_qos(self, qos: int) -> None:
        if qos not in (0, 1, 2):
            raise UnsupportedFeature(self._scheme, f"qos={qos!r}", "QoS is 0, 1 or 2")
        if qos > self.capabilities.max_qos:
            raise UnsupportedFeature(
                self._scheme, f"qos={qos}", f"its highest QoS is {self.capabilities.max_qos}"
            )

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
        if not self._live:
            self._check_open()
        if builtins.type(topic) is not str or topic not in self._valid_topics:
            validate_topic(topic)
            if len(self._valid_topics) >= 4096:
                self._valid_topics.clear()
            self._valid_topics.add(topic)
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
            if headers or correlation_id or reply_to or type or builtins.type(payload) is bytes:
                env = self._codec.envelope(
                    topic, payload, headers=headers, correlation_id=correlation_id,
                    reply_to=reply_to, type=type,
                )  # fmt: skip
            else:  # `Codec.envelope` and `Codec.local` inlined for the common case
                env = Envelope(
                    id=_envelope.next_id(), source=self._source, type=DEFAULT_TYPE,
                    time=_now(), topic=topic, payload=payload, headers={},
                )  # fmt: skip
                limit = self._local_limit
                try:
                    body = self._local_encode(payload)
                except (TypeError, ValueError, OverflowError):
                    body = None  # `_send_local` raises the EncodeError
                if body is not None and (limit is None or len(body) + 1024 <= limit):
                    try:
                        pending = self._publish_local(topic, (env, body, self._local_msgpack), qos)
                    except BusError:
                        self._stats.drop(DropReason.PUBLISH_FAILED)
                        raise
                    if pending is None:
                        self._stats.published += 1
                        return
                    await self._finish_send(topic, pending, qos)
                    return
            pending = self._send_local(env, qos)
            if pending is not None:
                await pending
            return
        if self._plain_json and not (headers or correlation_id or reply_to or type):
            if builtins.type(payload) is not bytes:
                data = self._codec.encode_plain(topic, payload)
                native = None
            else:
                data, native = self._encode(topic, payload, None, None, None, None)
        else:
            data, native = self._encode(topic, payload, headers, type, correlation_id, reply_to)
        pending = self._send(topic, data, native, qos, retain, reply_to)
        if pending is not None:
            await pending

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
        nowait = self._publish_nowait
        if reply_to is not None and self._publish_request is not None and not retain:
            nowait = partial(self._publish_request, reply_to=reply_to)
        pending: Awaitable[None] | None
        if nowait is None:
            pending = self.transport.publish(topic, data, qos=qos, retain=retain, headers=native)
        else:
            try:
                pending = nowait(topic, data, qos, retain, native)
            except BusError as exc:
                self._stats.drop(_reason_for(exc))
                raise
            if pending is None:  # delivered synchronously
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
                    # No per-message metadata: the bare body plus constant headers built once
                    # (the receiver makes up id and time); bytes say so to stay bytes.
                    if isinstance(payload, bytes):
                        return payload, self._raw_octet_headers
                    return codec.encode_payload(payload), self._raw_static_headers
                if env is None:
                    env = codec.envelope(
                        topic, payload, headers=headers, correlation_id=correlation_id,
                        reply_to=reply_to, type=type,
                    )  # fmt: skip
                return codec.encode_payload(payload), codec.binary_headers(env)
            if not (headers or correlation_id or reply_to or type):
                return codec.encode_payload(payload), None
            # Metadata needs somewhere to live: without native headers, send the envelope.
        if env is None:
            env = codec.envelope(
                topic, payload, headers=headers, correlation_id=correlation_id,
                reply_to=reply_to, type=type,
            )  # fmt: skip
        return codec.encode_envelope(env, "msgpack" if self._format == "msgpack" else "json"), None

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

    # -- subscribing ---------------------------------------------------------------------------

    @overload
    def subscribe(
        self,
        pattern: str,
        handler: Handler[Any] | None = None,
        *,
        queue: str | None = None,
        qos: int = 0,
        type: None = None,
        buffer_size: int | None = None,
        overflow: Overflow = "block",
        max_concurrency: int = 1,
        retries: int = 0,
        retry_delay: float = 0.1,
        dead_letter: str | None = None,
        middleware: Sequence[Middleware] = (),
    ) -> SubscribeCall[Any]: ...

    @overload
    def subscribe(
        self,
        pattern: str,
        handler: Handler[T] | None = None,
        *,
        queue: str | None = None,
        qos: int = 0,
        type: type[T],
        buffer_size: int | None = None,
        overflow: Overflow = "block",
        max_concurrency: int = 1,
        retries: int = 0,
        retry_delay: float = 0.1,
        dead_letter: str | None = None,
        middleware: Sequence[Middleware] = (),
    ) -> SubscribeCall[T]: ...

    def subscribe(
        self,
        pattern: str,
        handler: Handler[Any] | None = None,
        *,
        queue: str | None = None,
        qos: int = 0,
        type: Any = None,
        buffer_size: int | None = None,
        overflow: Overflow = "block",
        max_concurrency: int = 1,
        retries: int = 0,
        retry_delay: float = 0.1,
        dead_letter: str | None = None,
        middleware: Sequence[Middleware] = (),
    ) -> SubscribeCall[Any]:
        """Subscribe to a pattern; await the result, or use it as ``async with``.

        Returns only after the broker confirmed the subscription and every retained message
        matching it was handed to this subscription (with a handler: the handler already ran
        for each of them). Messages reach one subscription in FIFO order.

        Args:
            pattern: A portable pattern (``+`` one level, ``#`` the rest).
            handler: Called with each `Envelope`; a coroutine function or a plain function.
                Without one, iterate the subscription.
            queue: Share messages with every subscription of the same queue name and pattern
                (competing consumers, across processes): each message goes to one of them.
            qos: The QoS to subscribe with.
            type: Decode payloads into this type (msgspec); mismatches go to the error hook
                as `DecodeError` and are counted.
            buffer_size: Queue length of this subscription (default: the bus's).
            overflow: ``block`` (flow control), ``drop_oldest`` or ``drop_newest`` (counted).
            max_concurrency: Handler calls that may run at once (1 keeps FIFO order).
            retries: Extra attempts when the handler raises, ``retry_delay`` apart (doubling).
            retry_delay: Seconds before the first retry.
            dead_letter: Topic that receives a message whose every attempt failed, with
                ``x-death-*`` headers saying why.
            middleware: `Middleware` around this subscription's handler calls (inside the
                bus's own middleware).

        Raises:
            InvalidTopic: the pattern (or the dead-letter topic) is invalid.
            ValueError: a bad policy value (overflow, max_concurrency, retries...).
            UnsupportedFeature: queue groups, wildcards or the QoS are not supported.
            SubscribeError: the broker refused the subscription.
            BusClosed: the bus is not open.
        """
        validate_pattern(pattern)
        if qos:
            self._check_qos(qos)
        if queue is not None:
            if not self.capabilities.queue_groups:
                raise UnsupportedFeature(self._scheme, "queue groups")
            validate_topic(queue)
            if "/" in queue:
                raise SubscribeError(f"queue name {queue!r} must not contain '/'", pattern=pattern)
        if has_wildcards(pattern) and not self.capabilities.wildcards:
            raise UnsupportedFeature(self._scheme, "wildcard subscriptions")
        if handler is not None and not callable(handler):
            raise TypeError(f"handler must be callable, got {handler!r}")
        if dead_letter is not None:
            validate_topic(dead_letter)
        if handler is None and (max_concurrency != 1 or retries or dead_letter or middleware):
            raise ValueError(
                "max_concurrency, retries, dead_letter and middleware need a handler "
                "(an iterating consumer handles its own messages)"
            )
        policy = SubscriptionPolicy(
            buffer_size=self._buffer_size if buffer_size is None else buffer_size,
            overflow=overflow,
            max_concurrency=max_concurrency,
            retries=retries,
            retry_delay=retry_delay,
            dead_letter=dead_letter,
            dedupe=self._dedupe,
        )
        for item in middleware:
            if not isinstance(item, Middleware):
                raise TypeError(f"middleware must be Middleware instances, got {item!r}")
        chain = self._handle_steps + steps(middleware, "handle")
        decoder = decoder_for(Any if type is None else type)

        async def start() -> Subscription[Any]:
            return await self._start_subscription(
                pattern, handler, queue, qos, decoder, policy, chain
            )

        return SubscribeCall(start)

    async def _start_subscription(
        self,
        pattern: str,
        handler: Handler[Any] | None,
        queue: str | None,
        qos: int,
        decoder: Any,
        policy: SubscriptionPolicy,
        chain: tuple[Any, ...],
    ) -> Subscription[Any]:
        self._check_open()
        sub: Subscription[Any] = Subscription(
            self,
            pattern,
            handler=handler,
            queue=queue,
            qos=qos,
            decoder=decoder,
            policy=policy,
            exact_filter=self._exact_filter,
            middleware=chain,
        )
        self._subs.add(sub)
        if handler is not None:
            name = getattr(handler, "__qualname__", type(handler).__name__)
            sub._task = asyncio.get_running_loop().create_task(
                sub._run(), name=f"cascade_bus[{self.id}].handler[{pattern}:{name}]"
            )
        try:
            async with asyncio.timeout(self._subscribe_timeout):
                sub._transport_sub = await self.transport.subscribe(
                    pattern, sub, qos=qos, queue=queue
                )
        except BaseException as exc:
            await sub._shutdown(drain=0.0, reason=DropReason.UNSUBSCRIBED)
            if isinstance(exc, TimeoutError):
                raise SubscribeError(
                    f"subscription to {pattern!r} not confirmed within {self._subscribe_timeout}s",
                    pattern=pattern,
                ) from None
            if isinstance(exc, BusError) or not isinstance(exc, Exception):
                raise
            raise SubscribeError(
                f"subscription to {pattern!r} failed: {exc}", pattern=pattern
            ) from exc
        await sub._caught_up(self._retained_timeout)
        return sub

    async def _dead_letter(
        self, topic: str, env: Envelope[Any], error: Exception, attempts: int
    ) -> None:
        """Publish a message whose handler kept failing to its dead-letter topic."""
        headers = dict(env.headers)
        headers.update(
            {
                "x-death-topic": env.topic,
                "x-death-id": env.id,
                "x-death-error-type": type(error).__name__,
                "x-death-error": str(error)[:1000],
                "x-death-attempts": str(attempts),
            }
        )
        await self.publish(
            topic,
            env.payload,
            headers=headers,
            type=None if env.type == DEFAULT_TYPE else env.type or None,
            correlation_id=env.correlation_id,
        )

    def _forget(self, sub: Subscription[Any]) -> None:
        self._subs.discard(sub)

    # -- request / reply -----------------------------------------------------------------------

    @overload
    async def request(
        self,
        topic: str,
        payload: Any,
        *,
        timeout: float = 5.0,
        headers: Mapping[str, str] | None = None,
        type: None = None,
    ) -> Envelope[Any]: ...

    @overload
    async def request(
        self,
        topic: str,
        payload: Any,
        *,
        timeout: float = 5.0,
        headers: Mapping[str, str] | None = None,
        type: type[T],
    ) -> Envelope[T]: ...

    async def request(
        self,
        topic: str,
        payload: Any,
        *,
        timeout: float = 5.0,
        headers: Mapping[str, str] | None = None,
        type: Any = None,
    ) -> Envelope[Any]:
        """Publish a request and wait for the first reply.

        Each request gets a unique ``reply_to`` inbox and ``correlation_id``; a responder that
        publishes to ``env.reply_to`` (or calls `reply`) answers it.

        Args:
            topic: Where the responder listens.
            payload: The request payload.
            timeout: Seconds to wait for the reply.
            headers: Headers for the request.
            type: Convert the reply's payload into this type.

        Raises:
            NoResponders: the transport reports that nobody listens on ``topic`` (NATS,
                memory); raised at once.
            RequestTimeout: no reply within ``timeout``.
            DecodeError: the reply does not fit ``type``.
        """
        self._check_open()
        if not self.capabilities.request_reply:
            raise UnsupportedFeature(self._scheme, "request/reply")
        inbox = await self._ensure_inbox()
        cid = new_id()
        fut: asyncio.Future[Envelope[Any]] = asyncio.get_running_loop().create_future()
        self._replies[cid] = fut
        try:
            await self.publish(
                topic, payload, headers=headers, correlation_id=cid, reply_to=f"{inbox}/{cid}"
            )
            try:
                async with asyncio.timeout(timeout):
                    reply = await fut
            except NoResponders:
                raise NoResponders(f"no responder is subscribed to {topic!r}") from None
            except TimeoutError:
                raise RequestTimeout(
                    f"no reply to the request on {topic!r} within {timeout}s"
                ) from None
        finally:
            self._replies.pop(cid, None)
        if type is not None:
            import msgspec

            from ._errors import DecodeError

            try:
                converted = msgspec.convert(reply.payload, type)
            except msgspec.ValidationError as exc:
                raise DecodeError(
                    f"reply on {reply.topic!r} does not match {type}: {exc}"
                ) from None
            reply = msgspec.structs.replace(reply, payload=converted)
        return reply

    async def reply(
        self, request: Envelope[Any], payload: Any, *, headers: Mapping[str, str] | None = None
    ) -> None:
        """Answer a request envelope: publish to its ``reply_to`` with its correlation id.

        Raises:
            PublishError: the envelope has no ``reply_to``.
        """
        if not request.reply_to:
            raise PublishError(
                f"message {request.id} on {request.topic!r} has no reply_to", topic=request.topic
            )
        await self.publish(
            request.reply_to, payload, headers=headers, correlation_id=request.correlation_id
        )

    async def _ensure_inbox(self) -> str:
        prefix = f"{self._inbox_prefix}/{self.id}"
        if self._inbox is not None and not self._inbox.closed:
            return prefix
        if self._inbox_lock is None:
            self._inbox_lock = asyncio.Lock()
        async with self._inbox_lock:
            if self._inbox is None or self._inbox.closed:
                self._inbox = await self.subscribe(f"{prefix}/+", self._on_reply)
        return prefix

    def _on_no_responders(self, reply_to: str) -> None:
        fut = self._replies.get(reply_to.rsplit("/", 1)[-1])
        if fut is not None and not fut.done():
            fut.set_exception(NoResponders("no responder"))

    def _on_reply(self, env: Envelope[Any]) -> None:
        cid = env.correlation_id or env.topic.rsplit("/", 1)[-1]
        fut = self._replies.get(cid) or self._replies.get(env.topic.rsplit("/", 1)[-1])
        if fut is not None and not fut.done():
            fut.set_result(env)

    # -- errors and counters -------------------------------------------------------------------

    def _report(self, error: Exception, topic: str, env: Envelope[Any] | None) -> None:
        hook = self._on_error
        if hook is not None:
            try:
                hook(error, topic, env)
            except Exception:
                log.exception("the on_error hook raised while reporting %r", error)
            return
        log.warning(
            "message on %r failed: %s: %s",
            topic,
            type(error).__name__,
            error,
            exc_info=not isinstance(error, BusError),
        )

    def stats(self) -> Stats:
        """Return a snapshot of the counters (published, delivered, dropped by reason, ...)."""
        buffered = sum(s.pending for s in self._subs) + getattr(self.transport, "buffered", 0)
        return self._stats.snapshot(buffered=buffered)


def _reason_for(error: BusError) -> str:
    """The loss-ledger reason for a publish the transport refused with ``error``."""
    if isinstance(error, ConnectionLost):
        return DropReason.DISCONNECTED
    if isinstance(error, PayloadTooLarge):
        return DropReason.PAYLOAD_TOO_LARGE
    if isinstance(error, PublishError) and error.reason:
        return error.reason
    return DropReason.PUBLISH_FAILED


def connect(url: str | BusURL, *, on_error: ErrorHook | None = None, **options: Any) -> Bus:
    """Create a `Bus` for ``url``; open it with ``async with`` or ``await``.

    ``async with cascade_bus.connect("memory://") as bus: ...`` or
    ``bus = await cascade_bus.connect("mqtt://localhost:1883")``.

    Raises:
        UnknownScheme: no transport for the URL scheme (suggests the closest one and the
            package to install).
        InvalidURL: the URL or an option is invalid.
    """
    return Bus(url, on_error=on_error, **options)
