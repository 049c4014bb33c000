"""`Subscription`: what `Bus.subscribe` returns, a handler subscription or an async iterator.

Each subscription owns its queue (`SubscriptionSink`) and, in handler mode, one worker task
(`HandlerWorker`), so a slow or failing handler delays only its own subscription. Order is FIFO
per subscription; nothing is promised across subscriptions. It sees its bus only as a
`SubscriptionHost`.
"""

from __future__ import annotations

import asyncio
import logging
import warnings
from collections.abc import Awaitable, Callable, Generator
from types import TracebackType
from typing import Any, Generic, TypeVar, cast

import msgspec

from ._envelope import Envelope
from ._errors import BusClosed
from ._policy import Handler, Overflow, SubscriptionPolicy
from ._sink import as_decode_error
from ._stats import DropReason
from ._transport import Message, TransportSubscription
from ._worker import HandlerWorker

__all__ = ["Handler", "Overflow", "SubscribeCall", "Subscription", "SubscriptionPolicy"]

T = TypeVar("T")
log = logging.getLogger("cascade_bus")


class Subscription(HandlerWorker, Generic[T]):
    """One subscription of a `Bus`: a pattern, a bounded queue, and a handler or an iterator.

    Obtain one from `Bus.subscribe`. With a handler, a worker task calls it for each message in
    arrival order; without one, iterate it (``async for env in sub``). Iteration ends
    (``StopAsyncIteration``) when the subscription or its bus is closed.

    Attributes:
        pattern: The portable pattern subscribed.
        queue: The queue-group name, or None.
        qos: The QoS requested.
    """

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
                message = cast(Message, buf.popleft())  # an iterator is never pushed to
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
                    if message.retained is not env.retained:  # receipt decides, not the body
                        env = msgspec.structs.replace(env, retained=message.retained)
                except Exception as exc:  # a bad message must never end the iteration
                    self._stats.drop(DropReason.DECODE_ERROR)
                    self._host.report(as_decode_error(exc, message.topic), message.topic, None)
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
        await self.shutdown(drain=0.0, reason=DropReason.UNSUBSCRIBED)

    def attach(self, transport_sub: TransportSubscription) -> None:
        """For the bus: the transport's side of this subscription, detached on unsubscribe."""
        self._transport_sub = transport_sub

    async def shutdown(self, *, drain: float, reason: str, detach: bool = True) -> None:
        """For the bus: stop the transport side, let the handler finish (bounded), count the rest.

        ``detach=False`` (the bus is closing) leaves the transport subscription for the
        transport's own close, so durable state (persistent sessions, stream consumers) is
        kept as after a crash instead of being removed as after `unsubscribe`.
        """
        self._closed = True
        self._push_high = 0  # in-process publishers take the slow path (`push`): dropped
        self._end_reason = reason
        if self._on_close is not None:
            self._on_close(self)
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


class SubscribeCall(Generic[T]):
    """What `Bus.subscribe` returns: await it, or use it as ``async with``.

    ``await bus.subscribe(...)`` gives the `Subscription`; ``async with bus.subscribe(...) as
    sub`` also unsubscribes on exit. Nothing happens until one of them: a call left neither
    awaited nor entered warns (`RuntimeWarning`) when it is garbage-collected, like a coroutine
    that was never awaited, because the subscription it promised was never made.
    """

    __slots__ = ("_pattern", "_start", "_sub", "_used")

    def __init__(self, start: Callable[[], Awaitable[Subscription[T]]], pattern: str = "?") -> None:
        self._start = start
        self._pattern = pattern
        self._sub: Subscription[T] | None = None
        self._used = False

    def __del__(self) -> None:
        if not getattr(self, "_used", True):
            warnings.warn(
                f"bus.subscribe({self._pattern!r}, ...) was never awaited, so nothing was "
                "subscribed: write `await bus.subscribe(...)` or `async with bus.subscribe(...)`",
                RuntimeWarning,
                stacklevel=2,
            )

    def close(self) -> None:
        """Discard the call without subscribing and without the warning (as `coroutine.close`)."""
        self._used = True

    def __await__(self) -> Generator[Any, None, Subscription[T]]:
        self._used = True
        return self._start().__await__()

    async def __aenter__(self) -> Subscription[T]:
        self._used = True
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
