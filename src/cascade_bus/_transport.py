"""The transport SPI: what an adapter implements so the bus can run on its broker.

A transport moves bytes: the bus encodes envelopes, validates topics, dispatches to handlers and
keeps the counters; the transport connects, publishes bodies, subscribes patterns and hands every
received body to a `MessageSink`. Third-party transports implement this and register their class
under the ``cascade_bus.transports`` entry-point group, exactly as the first-party ones do.
"""

from __future__ import annotations

import abc
import asyncio
import warnings
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, Self, runtime_checkable

import msgspec

from ._capabilities import Capabilities
from ._errors import BusClosed
from ._stats import StatsRecorder
from ._topics import IdentityMapper, TopicMapper
from ._url import BusURL

if TYPE_CHECKING:
    from ._sink import SubscriptionSink

__all__ = [
    "LocalPublisher",
    "Message",
    "MessageSink",
    "NetworkTransport",
    "Transport",
    "TransportSubscription",
]


class Message(msgspec.Struct, eq=False):
    """One message as a transport received it: a portable topic, the body and its metadata.

    A msgspec Struct for a C-level constructor (one is built per message on every path);
    compared by identity.

    Attributes:
        topic: The concrete portable topic (already translated back from the native name).
        data: The body exactly as it travelled.
        headers: Native headers, when the transport has them.
        retained: True when this is a retained message replayed on subscribe.
        qos: The QoS the message was delivered with.
        ack: For at-least-once delivery, called after the handler finished; None otherwise.
        local: Set only by in-process transports, which hand over the publisher's envelope
            instead of a body: ``(envelope, payload_body, is_msgpack)``; `data` is then empty
            and unused, and each subscription copies the payload from ``payload_body`` (None:
            shared immutable bytes).
        retain: For a live message (``retained`` False): the publisher asked the broker to
            retain it, where the transport can tell (NATS, MQTT 5 between cascade-bus buses).
            The subscription then tracks the topic's retained value for a later resync.
    """

    topic: str
    data: bytes
    headers: Mapping[str, str] | None = None
    retained: bool = False
    qos: int = 0
    ack: Callable[[], Awaitable[None]] | None = None
    local: tuple[Any, bytes | None, bool] | None = None
    retain: bool = False

    def __repr__(self) -> str:
        return (
            f"Message(topic={self.topic!r}, {len(self.data)} bytes"
            f"{', retained' if self.retained else ''}, qos={self.qos})"
        )


class MessageSink(Protocol):
    """Where a transport hands received messages; the bus provides one per subscription."""

    def deliver(self, message: Message) -> bool:
        """Queue one message for the subscription; never blocks, never raises.

        Call it from the transport's receive loop, in the order messages arrived. Returns False
        once the sink has reached its high-water mark: the transport should then ``await
        ready()`` before delivering more (flow control). A sink over its hard limit applies
        the bus's overflow policy and counts what it drops.
        """

    async def ready(self) -> None:
        """Return once the sink has room again (flow control for the receive loop)."""

    def resync_begin(self) -> None:
        """A reconnect happened: the broker's full retained state for this pattern follows.

        Call it before resubscribing, then deliver every retained message the broker replays
        (``retained=True``), then call `resync_end`. The sink drops replays of values it has
        already seen, so the subscriber sees each change made during the outage once. Calling
        it again before `resync_end` (lost again mid-replay) starts over.
        """

    def resync_end(self) -> None:
        """The replay that `resync_begin` announced is complete.

        Topics the subscriber held a retained value for that the replay did not contain were
        cleared during the outage: the sink delivers a clear (an empty retained body) for each.
        """


@runtime_checkable
class LocalPublisher(Protocol):
    """The in-process fast path a transport may declare (memory://), checked once at open.

    ``publish_local(topic, (envelope, payload_body, is_msgpack), qos)`` hands a bus's envelope to
    subscriptions in this process without encoding a body (see `Message.local`); returns like
    `Transport.send`. ``local_singles`` is live and read-only: a topic to its only subscription,
    where that one takes pushed payloads, filled as `publish_local` routes topics and emptied
    whenever a subscription comes or goes; a bus pushes a JSON payload's copy straight into
    it (`SubscriptionSink.push`, no call).
    """

    local_singles: Mapping[str, SubscriptionSink]

    def publish_local(
        self, topic: str, local: tuple[Any, bytes | None, bool], qos: int
    ) -> Awaitable[None] | None:
        """Deliver a non-retained envelope from a bus in this process; no body is built."""


class TransportSubscription(abc.ABC):
    """A live subscription at the transport level, returned by `Transport.subscribe`."""

    @abc.abstractmethod
    async def unsubscribe(self) -> None:
        """Stop delivering to the sink. Idempotent; never raises for a lost connection."""


class Transport(abc.ABC):
    """A connection to one broker, moving bytes for a `Bus`.

    Subclasses declare `capabilities`, a `mapper` for their native topic syntax, and implement
    the abstract methods. The bus calls `connect` once, then any number of `send` /
    `subscribe` calls concurrently from one event loop, then `aclose` once.

    Args:
        url: The parsed bus URL (credentials included; never log it unmasked).
        options: Transport options: URL query parameters overlaid with keyword options.
    """

    capabilities: Capabilities = Capabilities()
    """What this transport can do; the bus refuses anything not declared. A class attribute;
    an instance may narrow it once it has read its options (MQTT 3.1.1 has no headers)."""
    mapper: ClassVar[TopicMapper] = IdentityMapper()
    """Translates portable topics to native names and back."""
    package: ClassVar[str] = "cascade-bus"
    """The distribution that provides this transport (for error messages and listings)."""
    on_no_responders: Callable[[str], None] | None = None
    """Set by the bus: call it with a request's ``reply_to`` topic when the broker reports that
    the request reached no subscriber (declare ``Capabilities.no_responders``)."""
    filters_exactly: ClassVar[bool] = True
    """False when the transport may deliver messages a pattern does not match exactly (e.g. a
    broader native glob); the bus then filters every message with `topic_matches`."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # A transport written for the first SPI implements only `publish`: its `send` wraps it.
        if cls.send is Transport.send and cls.publish is not Transport.publish:
            warnings.warn(
                f"{cls.__qualname__} implements publish() but not send(): implement send(), the "
                "transport hot path (publish() over it is provided by Transport)",
                DeprecationWarning,
                stacklevel=2,
            )
            cls.send = Transport._send_via_publish  # type: ignore[method-assign]

    def __init__(self, url: BusURL, options: Mapping[str, Any]) -> None:
        self.url = url
        self.options = dict(options)
        self.stats = StatsRecorder()
        """Counters the transport updates (reconnects, drops while disconnected, ...)."""

    @classmethod
    def from_url(cls, url: BusURL, **options: Any) -> Self:
        """Build the transport from a parsed URL and options (keyword options win).

        Raises:
            InvalidURL: an option is unknown or has a bad value.
        """
        return cls(url, url.merged_options(options))

    @abc.abstractmethod
    async def connect(self) -> None:
        """Connect to the broker; return once it is usable.

        Raises:
            ConnectError: the broker is unreachable or refused the credentials; the message
                names the endpoint without the password.
        """

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Disconnect cleanly after everything published so far was handed to the broker.

        Idempotent; must not raise for a connection that is already gone.
        """

    @abc.abstractmethod
    def send(
        self,
        topic: str,
        data: bytes,
        qos: int,
        retain: bool,
        headers: Mapping[str, str] | None,
        reply_to: str | None = None,
    ) -> Awaitable[None] | None:
        """Send one body to a concrete portable topic: the hot path, one call per message.

        It must not block: hand the message over and return None when that is all (the bus
        counts it as published), or return an awaitable the bus awaits when the caller must
        wait (a full buffer; for ``qos >= 1`` the broker's acceptance, or the message being
        held in a buffer that survives a reconnect). ``retain=True`` with an empty body clears
        the retained message of the topic. ``reply_to`` is the portable topic a request expects
        its reply on (never set with ``retain``): a transport with native request/reply (NATS
        reply subjects) carries it natively so its broker can report no responders (see
        `on_no_responders`); others ignore it, the envelope carries it anyway.

        Raises:
            PublishError: synchronously (or from the awaitable) when the broker refused it,
                or it could not be sent or buffered.
        """

    async def publish(
        self,
        topic: str,
        data: bytes,
        *,
        qos: int = 0,
        retain: bool = False,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """`send`, awaited: for callers outside the bus (tests, tools) that want one coroutine."""
        pending = self.send(topic, data, qos, retain, headers)
        if pending is not None:
            await pending

    def _send_via_publish(
        self,
        topic: str,
        data: bytes,
        qos: int,
        retain: bool,
        headers: Mapping[str, str] | None,
        reply_to: str | None = None,
    ) -> Awaitable[None] | None:
        """`send` for a deprecated transport that implements only `publish` (a coroutine)."""
        return self.publish(topic, data, qos=qos, retain=retain, headers=headers)

    @abc.abstractmethod
    async def subscribe(
        self,
        pattern: str,
        sink: MessageSink,
        *,
        qos: int = 0,
        queue: str | None = None,
    ) -> TransportSubscription:
        """Subscribe a portable pattern and deliver every matching message to ``sink``.

        Return only after the broker confirmed the subscription and every retained message
        matching it has been passed to ``sink.deliver`` (for this subscription only). With
        ``queue``, subscriptions that share the name and pattern (across processes) share the
        messages: each goes to one of them. Queue subscriptions get no retained replay.

        Raises:
            SubscribeError: the broker refused the subscription.
        """

    async def flush(self, timeout: float) -> None:
        """Return once everything published so far has reached the broker.

        Raises:
            TimeoutError: not flushed within ``timeout`` seconds.
        """
        return

    @property
    def buffered(self) -> int:
        """Messages this transport holds right now (offline buffer, unsent).

        Shown in ``stats().buffered``; transports that hold nothing keep the default 0.
        """
        return 0

    @property
    def max_payload(self) -> int | None:
        """Largest body this connection accepts, in bytes (None: no limit)."""
        return self.capabilities.max_payload


class NetworkTransport(Transport):
    """A `Transport` over a connection that can drop: connection state and event-driven waits.

    Subclasses call `_set_connected` from their supervisor when the connection goes up or
    down, set ``_closed`` in `aclose`, and get `connected`, `wait_connected` and
    `wait_disconnected` (used by health checks and fault tests) for free.
    """

    def __init__(self, url: BusURL, options: Mapping[str, Any]) -> None:
        super().__init__(url, options)
        self._connected = False
        self._closed = False
        self._up = asyncio.Event()
        self._state_changed = asyncio.Event()

    def __repr__(self) -> str:
        state = "connected" if self._connected else "disconnected"
        return f"<{type(self).__name__} {self.url.redacted()} {state}>"

    @property
    def connected(self) -> bool:
        """True while the connection to the broker is up (False while reconnecting)."""
        return self._connected

    async def wait_connected(self, *, reconnects: int = 0) -> None:
        """Wait until connected and ``stats.reconnects >= reconnects`` (tests, health checks).

        Bound it with ``asyncio.timeout``.

        Raises:
            BusClosed: the transport was closed.
        """
        while not (self._connected and self.stats.reconnects >= reconnects):
            if self._closed:
                raise BusClosed(f"the {self.url.scheme}:// transport is closed")
            await self._state_changed.wait()

    async def wait_disconnected(self) -> None:
        """Wait until the transport noticed its connection is gone (or it was closed)."""
        while self._connected:
            await self._state_changed.wait()

    def _set_connected(self, up: bool) -> None:
        """For subclasses: record the connection going up or down and wake every waiter."""
        self._connected = up
        if up:
            self._up.set()
        else:
            self._up.clear()
        changed, self._state_changed = self._state_changed, asyncio.Event()
        changed.set()
