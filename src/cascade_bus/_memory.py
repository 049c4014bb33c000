"""The in-process ``memory://`` transport: the zero-dependency default and the executable spec.

``memory://name`` buses in one process share one broker per name for the life of the process
(retained messages outlive every connection); different names are isolated. Delivery is
synchronous into each subscription's queue, so ordering is exact, and flow control makes a fast
publisher wait for a full subscriber instead of growing memory or dropping.
"""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import msgspec

from ._capabilities import Capabilities
from ._errors import BusClosed, InvalidURL
from ._stats import DropReason
from ._topics import topic_matches
from ._transport import Message, MessageSink, Transport, TransportSubscription
from ._url import BusURL, parse_int

if TYPE_CHECKING:
    from ._sink import SubscriptionSink

__all__ = ["MemoryBroker", "MemoryTransport"]

DEFAULT_MAX_PAYLOAD = 1024 * 1024

#: Untyped JSON, as a subscription decodes it: each `push` gets its own payload object.
_decode = msgspec.json.Decoder().decode
#: Payload types every subscription may share (nothing in them can be changed).
_IMMUTABLE = frozenset({str, int, float, bool, type(None)})


class _Member:
    """One subscription registered with a `MemoryBroker`."""

    __slots__ = ("pattern", "queue", "sink")

    def __init__(self, pattern: str, sink: MessageSink, queue: str | None) -> None:
        self.pattern = pattern
        self.sink = sink
        self.queue = queue


class _Route:
    """The subscriptions one concrete topic reaches: plain ones and queue groups."""

    __slots__ = ("delivers", "groups", "only_pushes", "others", "plain", "pushes", "single")

    def __init__(
        self, plain: list[_Member], groups: list[tuple[list[_Member], itertools.count[int]]]
    ) -> None:
        self.plain = plain
        self.groups = groups
        # The plain members' bound `deliver` methods, looked up once per route, not per message.
        self.delivers = [member.sink.deliver for member in plain]
        # For `publish_local`: the sinks that take a payload copy (`SubscriptionSink.push`),
        # and the `deliver` of the others.
        takes = [getattr(member.sink, "takes_payloads", False) for member in plain]
        self.pushes: list[SubscriptionSink] = [
            m.sink  # type: ignore[misc]  # a `SubscriptionSink`: it says it takes payloads
            for m, t in zip(plain, takes, strict=True)
            if t
        ]
        self.others = [m.sink.deliver for m, t in zip(plain, takes, strict=True) if not t]
        # The one subscription, when it is the only one and takes payloads: `publish_local`'s
        # shortest path.
        self.single = (
            self.pushes[0] if len(self.pushes) == 1 and not self.others and not groups else None
        )
        # Several subscriptions, every one taking payloads: `publish_local` pushes copies only.
        self.only_pushes = (
            self.pushes if len(self.pushes) > 1 and not self.others and not groups else None
        )


class MemoryBroker:
    """An in-process broker: subscriptions, retained messages and queue groups for one name."""

    _brokers: ClassVar[dict[str, MemoryBroker]] = {}

    def __init__(self, name: str) -> None:
        self.name = name
        self.members: list[_Member] = []
        self.retained: dict[str, tuple[bytes, Mapping[str, str] | None]] = {}
        self._routes: dict[str, _Route] = {}
        # Topic -> its only subscription, where that one takes payloads (`route().single`).
        self.singles: dict[str, SubscriptionSink] = {}
        self._group_counters: dict[tuple[str, str], itertools.count[int]] = {}

    @classmethod
    def named(cls, name: str) -> MemoryBroker:
        """Return the process-wide broker called ``name``, creating it on first use."""
        broker = cls._brokers.get(name)
        if broker is None:
            broker = cls._brokers[name] = cls(name)
        return broker

    def add(self, member: _Member) -> None:
        """Register a subscription, replaying matching retained messages to it first."""
        if member.queue is None:
            pattern = member.pattern
            for topic, (data, headers) in list(self.retained.items()):
                if topic_matches(pattern, topic):
                    member.sink.deliver(Message(topic, data, headers, retained=True))
        self.members.append(member)
        self._forget_routes()

    def remove(self, member: _Member) -> None:
        """Unregister a subscription (no-op when it is already gone)."""
        try:
            self.members.remove(member)
        except ValueError:
            return
        self._forget_routes()

    def route(self, topic: str) -> _Route:
        """Return (and cache) the subscriptions a concrete topic reaches."""
        route = self._routes.get(topic)
        if route is None:
            plain: list[_Member] = []
            grouped: dict[tuple[str, str], list[_Member]] = {}
            for m in self.members:
                if topic_matches(m.pattern, topic):
                    if m.queue is None:
                        plain.append(m)
                    else:
                        grouped.setdefault((m.queue, m.pattern), []).append(m)
            groups = [
                (members, self._group_counters.setdefault(key, itertools.count()))
                for key, members in grouped.items()
            ]
            if len(self._routes) > 10_000:
                self._forget_routes()
            route = self._routes[topic] = _Route(plain, groups)
            if route.single is not None:
                self.singles[topic] = route.single
        return route

    def _forget_routes(self) -> None:
        """Drop the cached routes (a subscription came or went): emptied in place."""
        self._routes.clear()
        self.singles.clear()

    def set_retained(self, topic: str, data: bytes, headers: Mapping[str, str] | None) -> None:
        """Store (or, with an empty body, clear) the retained message of a topic."""
        if data:
            self.retained[topic] = (data, dict(headers) if headers else None)
        else:
            self.retained.pop(topic, None)


class MemoryTransport(Transport):
    """The ``memory://[name]`` transport: an in-process broker shared by name.

    Options:
        max_payload: Largest body in bytes (default 1 MiB, like NATS), to catch runaway payloads
            the same way a network broker would.
    """

    capabilities: Capabilities = Capabilities(
        max_qos=2,
        retain=True,
        wildcards=True,
        headers=True,
        queue_groups=True,
        request_reply=True,
        no_responders=True,
        will=False,
        presence=True,  # in-process: offline at close and at interpreter exit (`Presence`)
        persistence=False,
        ordering=True,
        max_payload=DEFAULT_MAX_PAYLOAD,
    )

    def __init__(self, url: BusURL, options: Mapping[str, Any]) -> None:
        super().__init__(url, options)
        unknown = set(self.options) - {"max_payload"}
        if unknown:
            raise InvalidURL(
                f"unknown option(s) for memory://: {', '.join(sorted(unknown))} "
                "(memory:// accepts max_payload)"
            )
        self._max_payload = parse_int(
            "max_payload", self.options.get("max_payload", DEFAULT_MAX_PAYLOAD)
        )
        if (url.host and url.name) or url.port is not None or len(url.hosts) > 1:
            raise InvalidURL(
                f"memory:// takes one name, memory://NAME (got {url.redacted()!r}): "
                "no port, path or second host"
            )
        self.broker = MemoryBroker.named(url.host or url.name or "default")
        # `LocalPublisher.local_singles`: the broker's, emptied in place, never replaced
        self.local_singles: Mapping[str, SubscriptionSink] = self.broker.singles
        self._members: list[_Member] = []
        self._open = False

    @property
    def max_payload(self) -> int | None:
        """Largest body accepted, in bytes."""
        return self._max_payload

    async def connect(self) -> None:
        """Attach to the named in-process broker."""
        self._open = True

    async def aclose(self) -> None:
        """Remove this connection's subscriptions; retained messages stay with the broker."""
        self._open = False
        for member in self._members:
            self.broker.remove(member)
        self._members.clear()

    def send(
        self,
        topic: str,
        data: bytes,
        qos: int,
        retain: bool,
        headers: Mapping[str, str] | None,
        reply_to: str | None = None,
    ) -> Awaitable[None] | None:
        """Deliver synchronously to every matching subscription; awaitable only if one is full."""
        if not self._open:
            raise BusClosed("memory transport is closed")
        broker = self.broker
        if retain:
            broker.set_retained(topic, data, headers)
        route = broker._routes.get(topic) or broker.route(topic)
        if not route.plain and not route.groups:
            if qos and not retain:
                # At QoS >= 1 the publisher expects someone to get it: say nobody did (counted;
                # the message still counts as published, as a broker would accept it). A
                # retained message is kept for the next subscriber, so it is not lost.
                self.stats.drop(DropReason.NO_SUBSCRIBER)
            if reply_to and self.on_no_responders is not None:
                self.on_no_responders(reply_to)
        message = (
            Message(topic, data, headers) if not qos else Message(topic, data, headers, qos=qos)
        )
        full: list[MessageSink] | None = None
        for deliver in route.delivers:
            if not deliver(message):
                (full := full or []).append(deliver.__self__)  # type: ignore[attr-defined]
        for members, counter in route.groups:
            sink = members[next(counter) % len(members)].sink
            if not sink.deliver(message):
                (full := full or []).append(sink)
        return _wait_ready(full) if full else None

    def publish_local(
        self, topic: str, local: tuple[Any, bytes | None, bool], qos: int
    ) -> Awaitable[None] | None:
        """`send` for a non-retained envelope from a bus in this process: no body.

        Subscribers copy the payload from the encoded payload alone, so the envelope is never
        encoded nor parsed as a whole (see `Message.local`).
        """
        if not self._open:
            raise BusClosed("memory transport is closed")
        route = self.broker._routes.get(topic) or self.broker.route(topic)
        body = local[1]
        if body is not None and not local[2]:
            sink = route.single
            if sink is not None:
                # One subscription, the common case: it gets the payload decoded from the
                # body, its own copy (made here, before the publisher can change its object);
                # `push` inlined.
                item = (topic, _decode(body), local)
                buf = sink._buf
                if len(buf) < sink._push_high:
                    buf.append(item)
                    if sink._waiter is not None:
                        sink._wake()
                    return None
                return None if sink.push(item) else sink.ready()
            pushes = route.only_pushes
            if pushes is not None:  # several, all taking payloads: a copy each, nothing else
                full = self._push_copies(pushes, topic, _decode(body), local)
                return _wait_ready(full) if full else None
        if not route.plain and not route.groups:
            if qos:
                self.stats.drop(DropReason.NO_SUBSCRIBER)
            env = local[0]
            reply_to = None if type(env) is tuple else env.reply_to  # a `Stub` has none
            if reply_to and self.on_no_responders is not None:
                self.on_no_responders(reply_to)
        pushes = route.pushes
        if pushes and body is not None and not local[2]:
            # Each subscription that can take one gets its own copy of the payload: one
            # decode, then plain copies of a flat dict, shared immutable values, or a decode
            # each for anything nested.
            first = _decode(body)
            full = self._push_copies(pushes, topic, first, local)
            delivers = route.others
        else:
            full = None
            delivers = route.delivers
        if delivers or route.groups:
            message = Message(topic, b"", None, False, qos, None, local)  # positional: faster
            for deliver in delivers:
                if not deliver(message):
                    (full := full or []).append(deliver.__self__)  # type: ignore[attr-defined]
            for members, counter in route.groups:
                member = members[next(counter) % len(members)]
                if not member.sink.deliver(message):
                    (full := full or []).append(member.sink)
        return _wait_ready(full) if full else None

    @staticmethod
    def _push_copies(
        pushes: list[SubscriptionSink],
        topic: str,
        first: Any,
        local: tuple[Any, bytes | None, bool],
    ) -> list[MessageSink] | None:
        """Push each sink its own copy of ``first`` (decoded from ``local``); the full ones."""
        body = local[1]
        assert body is not None
        kind = type(first)
        flat = kind is dict and body.count(b"{") == 1 and not body.partition(b"[")[1]
        shared = kind in _IMMUTABLE
        full: list[MessageSink] | None = None
        last = pushes[-1]
        for sink in pushes:
            if sink is last:
                copy = first
            else:
                copy = first.copy() if flat else first if shared else _decode(body)
            # `SubscriptionSink.push`, inlined for the common case
            buf = sink._buf
            if len(buf) < sink._push_high:
                buf.append((topic, copy, local))
                if sink._waiter is not None:
                    sink._wake()
            elif not sink.push((topic, copy, local)):
                (full := full or []).append(sink)
        return full

    async def subscribe(
        self,
        pattern: str,
        sink: MessageSink,
        *,
        qos: int = 0,
        queue: str | None = None,
    ) -> TransportSubscription:
        """Register with the broker; retained messages are delivered before this returns."""
        if not self._open:
            raise BusClosed("memory transport is closed")
        member = _Member(pattern, sink, queue)
        self.broker.add(member)
        self._members.append(member)
        return _MemoryHandle(self, member)


async def _wait_ready(sinks: list[MessageSink]) -> None:
    for sink in sinks:
        await sink.ready()


class _MemoryHandle(TransportSubscription):
    __slots__ = ("member", "transport")

    def __init__(self, transport: MemoryTransport, member: _Member) -> None:
        self.transport = transport
        self.member = member

    async def unsubscribe(self) -> None:
        self.transport.broker.remove(self.member)
        if self.member in self.transport._members:
            self.transport._members.remove(self.member)
