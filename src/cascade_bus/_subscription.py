"""Subscriptions: a bounded FIFO per subscription, drained by a handler task or an iterator.

Each subscription owns its queue and (in handler mode) one worker task, so a slow or failing
handler delays only its own subscription. Order is FIFO per subscription; nothing is promised
across subscriptions.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Generator
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeAlias, TypeVar, cast

import msgspec

from ._envelope import Envelope
from ._errors import BusClosed, DecodeError
from ._middleware import Next, Step, compose
from ._retained import RetainedLedger
from ._stats import DropReason
from ._topics import topic_matches
from ._transport import Message, TransportSubscription

if TYPE_CHECKING:
    from ._bus import Bus
    from ._codec import EnvelopeDecoder

__all__ = ["Handler", "Overflow", "SubscribeCall", "Subscription", "SubscriptionPolicy"]

T = TypeVar("T")
Handler = Callable[[Envelope[T]], Awaitable[None] | None]
"""A message handler: called with each envelope; a coroutine function or a plain one."""
Overflow: TypeAlias = Literal["block", "drop_oldest", "drop_newest"]
"""What a full subscription queue does with the next message (see `SubscriptionPolicy`)."""
OVERFLOW_POLICIES: tuple[Overflow, ...] = ("block", "drop_oldest", "drop_newest")


class SubscriptionPolicy:
    """How one subscription queues, runs and retries its messages.

    Args:
        buffer_size: Messages the subscription queues before its overflow policy applies.
        overflow: ``block`` (default) holds the transport back (flow control: the memory
            broker's publisher waits, network transports stop reading, so the broker slows);
            deliveries already under way still queue, up to a hard cap of twice
            ``buffer_size`` (at least ``buffer_size + 64``), past which they are counted;
            ``drop_oldest`` / ``drop_newest`` never hold anyone back and count each message
            they discard in ``stats().dropped['overflow']``.
        max_concurrency: Handler calls that may run at once (default 1, which keeps FIFO
            order; more trades order for throughput).
        retries: Extra attempts after a handler raised (default 0).
        retry_delay: Seconds before the first retry, doubling for each further one.
        dead_letter: A topic that receives the message (headers ``x-death-*`` say why) once
            every attempt failed; without one, the failure is counted as ``handler_error``.
        dedupe: Skip a message whose envelope id was among the last ``dedupe`` ones this
            subscription handled (0: off); each skip counts as a duplicate.
    """

    __slots__ = (
        "buffer_size",
        "dead_letter",
        "dedupe",
        "max_concurrency",
        "overflow",
        "retries",
        "retry_delay",
    )

    def __init__(
        self,
        *,
        buffer_size: int = 10_000,
        overflow: Overflow = "block",
        max_concurrency: int = 1,
        retries: int = 0,
        retry_delay: float = 0.1,
        dead_letter: str | None = None,
        dedupe: int = 0,
    ) -> None:
        if overflow not in OVERFLOW_POLICIES:
            raise ValueError(f"overflow={overflow!r}: use one of {', '.join(OVERFLOW_POLICIES)}")
        if buffer_size < 1 or max_concurrency < 1 or retries < 0 or retry_delay < 0:
            raise ValueError(
                "buffer_size and max_concurrency must be >= 1, retries and retry_delay >= 0"
            )
        self.buffer_size = buffer_size
        self.overflow = overflow
        self.max_concurrency = max_concurrency
        self.retries = retries
        self.retry_delay = retry_delay
        self.dead_letter = dead_letter
        self.dedupe = dedupe


log = logging.getLogger("cascade_bus")
_HIGH_WATER = 1024


class Subscription(Generic[T]):
    """One subscription of a `Bus`: a pattern, a bounded queue, and a handler or an iterator.

    Obtain one from `Bus.subscribe`. With a handler, a worker task calls it for each message in
    arrival order; without one, iterate it (``async for env in sub``). Iteration ends
    (``StopAsyncIteration``) when the subscription or its bus is closed.

    Attributes:
        pattern: The portable pattern subscribed.
        queue: The queue-group name, or None.
        qos: The QoS requested.
    """

    def __init__(
        self,
        bus: Bus,
        pattern: str,
        *,
        handler: Handler[T] | None,
        queue: str | None,
        qos: int,
        decoder: EnvelopeDecoder,
        policy: SubscriptionPolicy,
        exact_filter: bool,
        middleware: tuple[Step, ...] = (),
    ) -> None:
        self.pattern = pattern
        self.queue = queue
        self.qos = qos
        self._bus = bus
        self._stats = bus._stats
        self._handler = handler
        self._is_async = handler is not None and (
            inspect.iscoroutinefunction(handler)
            or inspect.iscoroutinefunction(getattr(handler, "__call__", None))  # noqa: B004
        )
        self._decode = decoder.decode
        self._decode_local = decoder.decode_local
        self._json_copy = decoder.untyped_json
        self._policy = policy
        self._buf: deque[Message] = deque()
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
        self._end_reason = DropReason.CLOSED
        self._overflow = policy.overflow
        self._invoke: Next | None = None
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

    def __repr__(self) -> str:
        mode = "handler" if self._handler is not None else "iterator"
        queue = f", queue={self.queue!r}" if self.queue else ""
        state = "closed" if self._closed else f"{len(self._buf)} queued"
        return f"<Subscription {self.pattern!r}{queue} {mode} {state}>"

    @property
    def closed(self) -> bool:
        """True once unsubscribed or the bus closed."""
        return self._closed

    @property
    def pending(self) -> int:
        """Messages received and not yet handled."""
        return len(self._buf)

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
        buf.append(message)
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
        self._buf.extend(Message(topic, b"", retained=True) for topic in gone)
        self._received += len(gone)
        if gone:
            self._wake()

    def _release(self, message: Message) -> None:
        """Acknowledge now a message that will not be acknowledged after a handler ran.

        That is one this subscription dropped (counted), or an iterator's retained replay.
        Without the ack an at-least-once transport would keep it in flight forever and stall.
        """
        if message.ack is not None:
            task = asyncio.get_running_loop().create_task(self._ack(message))
            self._bus._background.add(task)
            task.add_done_callback(self._bus._background.discard)

    def _warn_overflow(self) -> None:
        if self._bus._report_overflow:
            self._bus._report_overflow = False
            log.warning(
                "subscription %r is full (%d messages, overflow=%s); dropped messages are "
                "counted in stats().dropped['overflow']",
                self.pattern,
                self._limit,
                self._overflow,
            )

    async def ready(self) -> None:
        """Wait (bounded by the bus's ``flow_timeout``) until the queue is half empty."""
        if len(self._buf) <= self._low or self._closed:
            return
        if self._task is not None and asyncio.current_task() is self._task:
            return  # a handler publishing to its own subscription must not wait on itself
        if self._room is None:
            self._room = asyncio.Event()
        room = self._room
        try:
            async with asyncio.timeout(self._bus._flow_timeout):
                await room.wait()
        except TimeoutError:
            log.warning(
                "subscription %r stayed full for %.1fs; publishing on without waiting",
                self.pattern,
                self._bus._flow_timeout,
            )

    def _made_room(self) -> None:
        room = self._room
        if room is not None and len(self._buf) <= self._low:
            self._room = None
            room.set()

    # -- handler mode ------------------------------------------------------------------------

    async def _call_handler(self, env: Envelope[Any]) -> None:
        """Adapt a plain (or awaitable-returning) handler to the async chain."""
        assert self._handler is not None
        result = self._handler(env)
        if result is not None and inspect.isawaitable(result):
            await result

    async def _run(self) -> None:
        """Worker task: hand queued messages to the handler in order (FIFO)."""
        buf = self._buf
        invoke = self._invoke
        assert invoke is not None
        decode = self._decode
        decode_local = self._decode_local
        # Untyped JSON from a bus in this process, the common case: `decode_local` inlined.
        json_copy = self._json_copy
        replace = msgspec.structs.replace
        stats = self._stats
        report = self._bus._report
        sem = self._sem
        seen_ids: dict[str, None] | None = {} if self._policy.dedupe else None
        loop = asyncio.get_running_loop()
        while True:
            if not buf:
                if self._closed:
                    return
                self._waiter = waiter = loop.create_future()
                await waiter
                continue
            message = buf.popleft()
            if self._room is not None and len(buf) <= self._low:
                self._made_room()
            try:
                local = message.local
                if local is None:
                    env = decode(message.topic, message.data, message.headers)
                elif json_copy is not None and local[1] is not None and not local[2]:
                    env = local[0]
                    headers = env.headers
                    env = replace(
                        env, payload=json_copy(local[1]), headers=dict(headers) if headers else {}
                    )
                else:
                    env = decode_local(local)
            except Exception as exc:  # a bad message must never stop the subscription
                stats.drop(DropReason.DECODE_ERROR)
                report(_as_decode_error(exc, message.topic), message.topic, None)
                await self._finish(message)
                continue
            if seen_ids is not None and self._seen_before(seen_ids, env.id):
                await self._finish(message)
                continue
            if sem is not None:
                await sem.acquire()
                task = loop.create_task(self._handle_concurrently(message, env, sem))
                self._running.add(task)
                task.add_done_callback(self._running.discard)
                continue
            try:
                await invoke(env)
            except Exception as exc:  # a handler's failure must not stop the subscription
                try:
                    await self._failed(env, exc)
                except asyncio.CancelledError:
                    stats.drop(self._end_reason)
                    raise
            except asyncio.CancelledError:  # the subscription ended under this message
                stats.drop(self._end_reason)
                raise
            else:
                stats.delivered += 1
            if message.ack is None and self._progress is None:
                self._processed += 1  # `_finish` inline: no coroutine per message
            else:
                await self._finish(message)

    def _seen_before(self, seen_ids: dict[str, None], env_id: str) -> bool:
        """The ``dedupe`` window: True (counted) for an id among the last ones handled."""
        if env_id in seen_ids:
            self._stats.duplicates += 1
            self._stats.drop(DropReason.DUPLICATE)
            return True
        seen_ids[env_id] = None
        if len(seen_ids) > self._policy.dedupe:
            del seen_ids[next(iter(seen_ids))]  # oldest first: dicts keep insertion order
        return False

    async def _handle_concurrently(
        self, message: Message, env: Envelope[Any], sem: asyncio.Semaphore
    ) -> None:
        assert self._invoke is not None
        try:
            try:
                await self._invoke(env)
            except Exception as exc:
                await self._failed(env, exc)
            else:
                self._stats.delivered += 1
        except asyncio.CancelledError:  # the subscription ended under this message
            self._stats.drop(self._end_reason)
            raise
        finally:
            sem.release()
        await self._finish(message)

    async def _finish(self, message: Message) -> None:
        """Ack (at-least-once transports) and record progress for retained catch-up."""
        if message.ack is not None:
            await self._ack(message)
        self._processed += 1
        progress = self._progress
        if progress is not None and self._processed >= progress[0]:
            self._progress = None
            if not progress[1].done():
                progress[1].set_result(None)

    async def _failed(self, env: Envelope[Any], error: Exception) -> None:
        """A handler raised: retry with backoff, then dead-letter or count the failure."""
        policy = self._policy
        attempts = 1
        assert self._invoke is not None
        while attempts <= policy.retries and not self._closed:
            await asyncio.sleep(policy.retry_delay * 2 ** (attempts - 1))
            attempts += 1
            try:
                await self._invoke(env)
            except Exception as exc:
                error = exc
            else:
                self._stats.delivered += 1
                return
        if policy.dead_letter is not None:
            try:
                await self._bus._dead_letter(policy.dead_letter, env, error, attempts)
            except Exception as exc:
                self._bus._report(exc, env.topic, env)
            else:
                self._stats.dead_lettered += 1
                self._bus._report(error, env.topic, env)
                return
        self._stats.drop(DropReason.HANDLER_ERROR)
        self._bus._report(error, env.topic, env)

    async def _ack(self, message: Message) -> None:
        assert message.ack is not None
        try:
            await message.ack()
        except Exception as exc:  # the broker will redeliver; report, don't stop
            self._bus._report(exc, message.topic, None)

    async def _caught_up(self, timeout: float) -> None:
        """Wait until the handler ran for everything received so far (retained replay)."""
        if self._handler is None or self._processed >= self._received:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._progress = (self._received, fut)
        try:
            async with asyncio.timeout(timeout):
                await fut
        except TimeoutError:
            log.warning(
                "handler for %r did not finish the retained messages within %.1fs; "
                "subscribe() returns anyway",
                self.pattern,
                timeout,
            )

    # -- iterator mode -----------------------------------------------------------------------

    def __aiter__(self) -> Subscription[T]:
        if self._handler is not None:
            raise TypeError("a subscription with a handler cannot also be iterated")
        return self

    async def __anext__(self) -> Envelope[T]:
        pending = self._pending_ack
        if pending is not None:
            self._pending_ack = None
            await self._ack(pending)
        buf = self._buf
        while True:
            if buf:
                message = buf.popleft()
                if self._room is not None:
                    self._made_room()
                self._processed += 1
                try:
                    local = message.local
                    env: Envelope[T] = (
                        self._decode(message.topic, message.data, message.headers)
                        if local is None
                        else self._decode_local(local)
                    )
                except Exception as exc:  # a bad message must never end the iteration
                    self._stats.drop(DropReason.DECODE_ERROR)
                    self._bus._report(_as_decode_error(exc, message.topic), message.topic, None)
                    if message.ack is not None:
                        await self._ack(message)
                    continue
                self._stats.delivered += 1
                if message.ack is not None:
                    self._pending_ack = message
                return env
            if self._closed:
                raise StopAsyncIteration
            self._waiter = waiter = asyncio.get_running_loop().create_future()
            await waiter

    async def get(self, timeout: float | None = None) -> Envelope[T]:
        """Return the next message, waiting at most ``timeout`` seconds.

        Raises:
            TimeoutError: nothing arrived in time.
            BusClosed: the subscription is closed and empty.
        """
        try:
            async with asyncio.timeout(timeout):
                return await self.__anext__()
        except StopAsyncIteration:
            raise BusClosed(f"subscription {self.pattern!r} is closed") from None

    # -- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> Subscription[T]:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.unsubscribe()

    async def unsubscribe(self) -> None:
        """Stop the subscription now; messages still queued are dropped and counted. Idempotent.

        A handler still running is cancelled and its message counted as ``unsubscribed`` too;
        `Bus.close` is the graceful stop (running handlers finish, bounded).
        """
        if self._closed:
            return
        await self._shutdown(drain=0.0, reason=DropReason.UNSUBSCRIBED)

    async def _shutdown(self, *, drain: float, reason: str, detach: bool = True) -> None:
        """Close: stop the transport side, let the handler finish (bounded), count the rest.

        ``detach=False`` (the bus is closing) leaves the transport subscription for the
        transport's own close, so durable state (persistent sessions, stream consumers) is
        kept as after a crash instead of being removed as after `unsubscribe`.
        """
        self._closed = True
        self._end_reason = reason
        self._bus._forget(self)
        transport_sub, self._transport_sub = self._transport_sub, None
        if transport_sub is not None and detach:
            try:
                await transport_sub.unsubscribe()
            except Exception as exc:  # unsubscribing from a lost connection is not an error
                log.debug("unsubscribe of %r failed: %r", self.pattern, exc)
        task = self._task
        if task is not None and not task.done():
            self._wake()
            if drain > 0:
                await asyncio.wait([task], timeout=drain)
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self._running:
            running = list(self._running)
            if drain > 0:
                await asyncio.wait(running, timeout=drain)
            for job in running:
                job.cancel()
            await asyncio.gather(*running, return_exceptions=True)
        pending, self._pending_ack = self._pending_ack, None
        if pending is not None:  # handed to an iterating consumer: it was handled
            await self._ack(pending)
        if self._buf:
            self._stats.drop(reason, len(self._buf))
            if reason != DropReason.CLOSED:
                # Unsubscribed on a live connection: release them. On close they stay
                # unacknowledged so a persistent session gets them again.
                for message in self._buf:
                    self._release(message)
            self._buf.clear()
        self._wake()
        room = self._room
        if room is not None:
            self._room = None
            room.set()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)


def _as_decode_error(exc: Exception, topic: str) -> DecodeError:
    if isinstance(exc, DecodeError):
        return exc
    error = DecodeError(f"message on {topic!r} could not be decoded: {exc}", topic=topic)
    error.__cause__ = exc
    return error


class SubscribeCall(Generic[T]):
    """What `Bus.subscribe` returns: await it, or use it as ``async with``.

    ``await bus.subscribe(...)`` gives the `Subscription`; ``async with bus.subscribe(...) as
    sub`` also unsubscribes on exit.
    """

    __slots__ = ("_start", "_sub")

    def __init__(self, start: Callable[[], Awaitable[Subscription[T]]]) -> None:
        self._start = start
        self._sub: Subscription[T] | None = None

    def __await__(self) -> Generator[Any, None, Subscription[T]]:
        return self._start().__await__()

    async def __aenter__(self) -> Subscription[T]:
        self._sub = await self._start()
        return self._sub

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()
