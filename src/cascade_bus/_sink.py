"""The transport-facing half of a subscription: its bounded FIFO and flow control.

`SubscriptionSink` holds a subscription's state and implements `MessageSink` (``deliver``,
``ready``, the resync pair); the handler worker and the iterator drain its queue. Everything
bus-wide goes through a `SubscriptionHost`.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import msgspec

from ._errors import DecodeError
from ._middleware import Next, Step, compose
from ._retained import RetainedLedger
from ._stats import DropReason
from ._topics import topic_matches
from ._transport import Message, TransportSubscription

if TYPE_CHECKING:
    from ._codec import EnvelopeDecoder
    from ._envelope import Envelope
    from ._host import SubscriptionHost
    from ._policy import Handler, SubscriptionPolicy

__all__ = ["RECEIVED", "Pushed", "Queued", "SubscriptionSink", "as_decode_error"]

#: What an in-process publisher `push`es: ``(topic, this subscription's payload, local)``.
Pushed = tuple[str, Any, tuple[Any, bytes | None, bool]]

#: Stands in a `Pushed`'s payload for a received `Message` (``(topic, RECEIVED, message)``):
#: a sink with ``_wrap`` set (the `Connector`'s) queues every message in that form, so its
#: worker tells the kinds apart by the payload it checks anyway (see `HandlerWorker.start`).
RECEIVED: Any = object()
#: What a subscription's queue holds: messages, pushed payloads, or messages wrapped as those.
Queued = Message | Pushed | tuple[str, Any, Message]

log = logging.getLogger("cascade_bus")
_HIGH_WATER = 1024


class SubscriptionSink:
    """A subscription's queue and state, fed by the transport (see `Subscription`)."""

    def __init__(
        self,
        host: SubscriptionHost,
        pattern: str,
        *,
        handler: Handler[Any] | None,
        queue: str | None,
        qos: int,
        decoder: EnvelopeDecoder,
        policy: SubscriptionPolicy,
        exact_filter: bool,
        middleware: tuple[Step, ...] = (),
        on_close: Callable[[Any], None] | None = None,
    ) -> None:
        self.pattern = pattern
        self.queue = queue
        self.qos = qos
        self._host = host
        self._stats = host.stats
        self._on_close = on_close
        self._handler = handler
        self._is_async = handler is not None and (
            inspect.iscoroutinefunction(handler)
            or inspect.iscoroutinefunction(getattr(handler, "__call__", None))  # noqa: B004
        )
        self._decode = decoder.decode
        self._decode_local = decoder.decode_local
        self._json_copy = decoder.untyped_json
        self._policy = policy
        self._buf: deque[Queued] = deque()
        self._limit = policy.buffer_size
        # Flow control ("block") starts at a soft high-water mark below the hard limit: letting
        # a publisher run 10,000 messages ahead only adds cache misses and GC survivors.
        self._high = min(self._limit, _HIGH_WATER)
        self._low = self._high // 2
        # "block" asks the transport to stop at the high-water mark; several concurrent
        # publishers (or a network read already in progress) may still deliver a few more, so
        # the hard cap where "block" starts dropping (counted) leaves headroom above it.
        self._cap = (
            self._limit if policy.overflow != "block" else max(2 * self._limit, self._limit + 64)
        )
        # Below it, an in-process publisher appends without `push` (see there): "block" waits
        # from the high-water mark on, the drop policies apply from the hard cap on.
        self._push_high = self._high if policy.overflow == "block" else self._cap
        self._end_reason = DropReason.CLOSED
        self._overflow = policy.overflow
        self._invoke: Next | None = None
        self._direct = not middleware  # the handler is called as it is
        if handler is not None:
            # An async handler is the end of the chain itself (no wrapper on the hot path).
            final = cast(Next, handler) if self._is_async else self._call_handler
            self._invoke = compose(final, middleware)
        self._sem = (
            asyncio.Semaphore(policy.max_concurrency) if policy.max_concurrency > 1 else None
        )
        self._running: set[asyncio.Task[None]] = set()
        self._filter = pattern if exact_filter else None
        self._waiter: asyncio.Future[None] | None = None
        self._room: asyncio.Event | None = None
        self._closed = False
        self._received = 0
        self._processed = 0
        self._progress: tuple[int, asyncio.Future[None]] | None = None
        self._pending_ack: Message | None = None
        self._task: asyncio.Task[None] | None = None
        self._transport_sub: TransportSubscription | None = None
        # Created on the first retained message from a broker (never on memory://'s
        # in-process path): live messages pay one None check until then.
        self._ledger: RetainedLedger | None = None
        self.takes_payloads = False
        """Set by the handler worker: in-process publishers may `push` pre-copied payloads."""
        self._wrap = False  # queue messages as ``(topic, RECEIVED, message)`` (see RECEIVED)

    def push(self, item: Pushed) -> bool:
        """For an in-process transport: queue ``(topic, payload copy, local)``, as `deliver`.

        Only for a sink with `takes_payloads` set: a live, non-retained message whose payload
        the publisher already copied for this subscription alone (see `Message.local` for
        ``local``), so the worker neither decodes nor copies it. Returns like `deliver`.

        A transport may inline the common case: while ``len(sink._buf) < sink._push_high``,
        append the item and call `_wake` if ``sink._waiter`` is set (`MemoryTransport`).
        Pushed items are not counted in ``_received`` / ``_processed``: those track a
        retained replay's progress, and a pushed message is never one.
        """
        buf = self._buf
        if self._closed:
            self._stats.drop(self._end_reason)
            return True
        if len(buf) >= self._cap:
            self._stats.drop(DropReason.OVERFLOW)
            self._warn_overflow()
            if self._overflow != "drop_oldest":
                return self._overflow == "drop_newest"
            oldest = buf.popleft()
            self._release(oldest)
            if type(oldest) is not tuple or oldest[1] is RECEIVED:
                self._processed += 1  # the discarded one will never be handled
        buf.append(item)
        if self._waiter is not None:
            self._wake()
        return len(buf) < self._high or self._overflow != "block"

    async def _call_handler(self, env: Envelope[Any]) -> None:
        """Adapt a plain (or awaitable-returning) handler to the async chain."""
        assert self._handler is not None
        result = self._handler(env)
        if result is not None and inspect.isawaitable(result):
            await result

    # -- MessageSink: called by the transport ------------------------------------------------

    def deliver(self, message: Message) -> bool:
        """Queue a message from the transport (see `MessageSink.deliver`)."""
        if self._closed:
            self._stats.drop(self._end_reason)
            self._release(message)
            return True
        if self._filter is not None and not topic_matches(self._filter, message.topic):
            self._release(message)
            return True
        ledger = self._ledger
        if ledger is not None:
            if (
                message.retained or message.retain or message.topic in ledger.known
            ) and not ledger.note(message):
                self._release(message)  # a resync replay of a value already handled
                return True
        elif (message.retained or message.retain) and message.local is None and not self.queue:
            self._ledger = ledger = RetainedLedger()
            ledger.note(message)
        buf = self._buf
        if len(buf) >= self._cap:
            self._stats.drop(DropReason.OVERFLOW)
            self._warn_overflow()
            if self._overflow != "drop_oldest":
                self._release(message)
                return self._overflow == "drop_newest"
            self._release(buf.popleft())
            self._processed += 1  # the discarded one will never be handled
        if message.ack is not None and message.retained and self._handler is None:
            # An iterator cannot run before subscribe() returns, so holding retained replays
            # unacknowledged could fill the broker's in-flight window and keep subscribe()
            # from completing. The broker keeps the retained copy: acknowledging now is safe.
            self._release(message)
            message = msgspec.structs.replace(message, ack=None)
        buf.append((message.topic, RECEIVED, message) if self._wrap else message)
        self._received += 1
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)
        return len(buf) < self._high or self._overflow != "block"

    def resync_begin(self) -> None:
        """A reconnect's retained replay follows (see `MessageSink.resync_begin`)."""
        if self.queue is None:
            if self._ledger is None:
                self._ledger = RetainedLedger()
            self._ledger.begin()

    def resync_end(self) -> None:
        """Deliver a clear for each retained topic cleared while away (`MessageSink`)."""
        if self._ledger is None or self._closed:
            return
        gone = self._ledger.end()
        # Past the overflow cap if need be: there are never more clears than retained topics
        # this subscription held, and the transport cannot be slowed down for them.
        clears = [Message(topic, b"", retained=True) for topic in gone]
        self._buf.extend([(m.topic, RECEIVED, m) for m in clears] if self._wrap else clears)
        self._received += len(gone)
        if gone:
            self._wake()

    async def ready(self) -> None:
        """Wait (bounded by the bus's ``flow_timeout``) until the queue is half empty."""
        if len(self._buf) <= self._low or self._closed:
            return
        if self._task is not None and asyncio.current_task() is self._task:
            return  # a handler publishing to its own subscription must not wait on itself
        # One turn of the loop first: a handler that does not wait drains the queue in it,
        # which costs far less than a wait with a timeout.
        await asyncio.sleep(0)
        if len(self._buf) <= self._low or self._closed:
            return
        if self._room is None:
            self._room = asyncio.Event()
        room = self._room
        timeout = self._host.flow_timeout
        try:
            async with asyncio.timeout(timeout):
                await room.wait()
        except TimeoutError:
            log.warning(
                "subscription %r stayed full for %.1fs; publishing on without waiting",
                self.pattern,
                timeout,
            )

    def _release(self, message: Queued) -> None:
        """Acknowledge now a message that will not be acknowledged after a handler ran.

        That is one this subscription dropped (counted), or an iterator's retained replay.
        Without the ack an at-least-once transport would keep it in flight forever and stall.
        """
        received = message[2] if type(message) is tuple and message[1] is RECEIVED else message
        if type(received) is Message and received.ack is not None:  # not a pushed payload
            self._host.spawn(self._ack(received))

    async def _ack(self, message: Message) -> None:
        assert message.ack is not None
        try:
            await message.ack()
        except Exception as exc:  # the broker will redeliver; report, don't stop
            self._host.report(exc, message.topic, None)

    def _warn_overflow(self) -> None:
        if self._host.overflow_warning_due():
            log.warning(
                "subscription %r is full (%d messages, overflow=%s); dropped messages are "
                "counted in stats().dropped['overflow']",
                self.pattern,
                self._limit,
                self._overflow,
            )

    def _made_room(self) -> None:
        room = self._room
        if room is not None and len(self._buf) <= self._low:
            self._room = None
            room.set()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)


def as_decode_error(exc: Exception, topic: str) -> DecodeError:
    """``exc`` from decoding a message on ``topic`` as a `DecodeError` (chained)."""
    if isinstance(exc, DecodeError):
        return exc
    error = DecodeError(f"message on {topic!r} could not be decoded: {exc}", topic=topic)
    error.__cause__ = exc
    return error
