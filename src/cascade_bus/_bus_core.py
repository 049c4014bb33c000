"""The state every part of the `Bus` shares: built once from a URL or a transport.

`BusCore.__init__` resolves the transport, parses the bus options (`BusOptions`) and binds
what the publish hot path reads; the other ``_bus_*`` modules add behaviour on top of it.
"""

from __future__ import annotations

import asyncio
import enum
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from ._bus_options import BUS_OPTIONS, BusOptions
from ._cloudevents import STRUCTURED_HEADERS
from ._cloudevents_binary import static_binary_headers
from ._codec import Codec, WireFormat, local_payload_encoder
from ._deadlines import Deadlines
from ._envelope import DEFAULT_TYPE, Envelope, new_id
from ._errors import BusClosed, InvalidURL, UnsupportedFeature
from ._host import BusHost, ErrorHook
from ._middleware import Middleware, steps
from ._presence import Presence
from ._registry import get_transport
from ._transport import LocalPublisher, Transport
from ._url import BusURL

if TYPE_CHECKING:
    from ._sink import SubscriptionSink
    from ._subscription import Subscription

__all__ = ["BusCore", "State"]


class State(enum.Enum):
    """Where a bus is in its single-use life."""

    NEW = "new"
    OPENING = "opening"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


class BusCore:
    """The shared state of a `Bus` (constructor arguments: see `Bus`)."""

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
            bus_options = {k: merged.pop(k) for k in list(merged) if k in BUS_OPTIONS}
            # `merged` already holds the query minus the bus options: build from it directly.
            transport = get_transport(parsed.scheme)(parsed, merged)
        else:
            unknown = set(options) - BUS_OPTIONS
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
        opts = BusOptions(bus_options)
        self._format: WireFormat = opts.format
        self._codec = Codec(self._format, opts.source)
        self._source = self._codec.source
        self._buffer_size = opts.buffer_size
        self._dedupe = opts.dedupe
        self._connect_timeout = opts.connect_timeout
        self._publish_timeout = opts.publish_timeout
        self._deadlines = Deadlines(self._publish_timeout)
        self._subscribe_timeout = opts.subscribe_timeout
        self._close_timeout = opts.close_timeout
        self._retained_timeout = opts.retained_timeout
        self._inbox_prefix = opts.inbox_prefix
        # Presence stays out of the hot paths: only open() and close() touch it.
        presence = opts.presence
        self._presence = Presence(transport, presence) if presence.topic or presence.sweep else None
        self._stats = transport.stats
        self._state = State.NEW
        self._live = False  # == (self._state is State.OPEN); an enum compare costs ~60 ns
        self._valid_topics: set[str] = set()  # publish topics already validated
        self._subs: set[Subscription[Any]] = set()
        self._inflight = 0
        self._idle: asyncio.Event | None = None
        self._closed_event: asyncio.Event | None = None
        self._inbox: Subscription[Any] | None = None
        self._inbox_lock: asyncio.Lock | None = None
        self._replies: dict[str, asyncio.Future[Envelope[Any]]] = {}
        # What subscriptions use of the bus: counters, error hook, background acks, bounds.
        self._host = BusHost(
            self._stats, on_error=on_error, flow_timeout=opts.flow_timeout, publish=self.publish
        )
        self._raw_headers = self._format == "raw" and self.capabilities.headers
        source = self._codec.source
        self._raw_static_headers: Mapping[str, str] = MappingProxyType(
            static_binary_headers(source, DEFAULT_TYPE, "application/json")
        )
        self._raw_octet_headers: Mapping[str, str] = MappingProxyType(
            static_binary_headers(source, DEFAULT_TYPE, "application/octet-stream")
        )
        self._plain_json = self._format == "json"
        # A structured JSON body says so where the transport has headers, as the bindings ask.
        self._structured: Mapping[str, str] | None = (
            STRUCTURED_HEADERS if self._plain_json and self.capabilities.headers else None
        )
        # memory:// takes envelopes instead of bodies: each subscription copies the payload.
        self._publish_local: Callable[..., Awaitable[None] | None] | None = (
            transport.publish_local
            if isinstance(transport, LocalPublisher) and self._format != "raw"
            else None
        )
        # An in-process transport's limit is fixed when it is built: no property call per message.
        self._local_limit = transport.max_payload if self._publish_local is not None else None
        # The Connector's path (`_publish_payload`), in any format: a `Stub`, never an envelope.
        self._payload_local: Callable[..., Awaitable[None] | None] | None = (
            transport.publish_local
            if isinstance(transport, LocalPublisher) and not self._publish_steps
            else None
        )
        # `Bus.publish` without metadata takes the `Connector`'s path (a `Stub` in process).
        self._stub_publish = self._publish_local is not None and self._payload_local is not None
        # Bodies longer than this are measured as a whole envelope (1 KiB below the limit).
        limit = transport.max_payload if self._payload_local is not None else None
        self._payload_near_limit = sys.maxsize if limit is None else limit - 1024
        self._local_msgpack = self._format == "msgpack"
        # A JSON payload's copy goes straight into a topic's only subscription, where the
        # transport has routed the topic before (`LocalPublisher.local_singles`).
        self._local_singles: Mapping[str, SubscriptionSink] = (
            transport.local_singles
            if isinstance(transport, LocalPublisher) and not self._local_msgpack
            else {}
        )
        self._local_encode = local_payload_encoder(self._local_msgpack)
        # The transport's hot path, bound once.
        self._transport_send: Callable[..., Awaitable[None] | None] = transport.send
        self._exact_filter = not transport.filters_exactly

    if TYPE_CHECKING:
        # The publishing part (`BusPublishing`) implements it; the host dead-letters with it.
        async def publish(self, *args: Any, **kwargs: Any) -> None: ...

        # The request/reply part (`BusRequests`) implements it; the transport calls it.
        def _on_no_responders(self, reply_to: str) -> None: ...

    def __repr__(self) -> str:
        return f"<Bus {self.url.redacted()} {self._state.value}>"

    def _check_open(self) -> None:
        if self._state is not State.OPEN:
            if self._state in (State.NEW, State.OPENING):
                raise BusClosed(
                    f"{self!r} is not open yet: use 'async with connect(...) as bus' "
                    "or 'await bus.open()'"
                )
            raise BusClosed(f"{self!r} is closed")

    def _check_qos(self, qos: int) -> None:
        if qos not in (0, 1, 2):
            raise UnsupportedFeature(self._scheme, f"qos={qos!r}", "QoS is 0, 1 or 2")
        if qos > self.capabilities.max_qos:
            raise UnsupportedFeature(
                self._scheme, f"qos={qos}", f"its highest QoS is {self.capabilities.max_qos}"
            )
