"""Subscribing: `Bus.subscribe` checks pattern and policy, then starts a `Subscription`.

It returns once the broker confirmed and the retained messages were handed over (with a
handler: handled), bounded by ``subscribe_timeout`` and ``retained_timeout``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, TypeVar, overload

from ._bus_publish import BusPublishing
from ._codec import decoder_for
from ._errors import BusError, SubscribeError, UnsupportedFeature
from ._middleware import Middleware, steps
from ._policy import Handler, Overflow, SubscriptionPolicy
from ._stats import DropReason
from ._subscription import SubscribeCall, Subscription
from ._topics import has_wildcards, validate_pattern, validate_topic
from ._transport import LocalPublisher

__all__ = ["BusSubscribing"]

T = TypeVar("T")


class BusSubscribing(BusPublishing):
    """Subscribe (part of `Bus`)."""

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

        return SubscribeCall(start, pattern)

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
            self._host,
            pattern,
            handler=handler,
            queue=queue,
            qos=qos,
            decoder=decoder,
            policy=policy,
            exact_filter=self._exact_filter,
            middleware=chain,
            on_close=self._subs.discard,
        )
        self._subs.add(sub)
        if handler is not None:
            name = getattr(handler, "__qualname__", type(handler).__name__)
            sub.start(
                f"cascade_bus[{self.id}].handler[{pattern}:{name}]",
                in_process=isinstance(self.transport, LocalPublisher),
            )
        try:
            async with asyncio.timeout(self._subscribe_timeout):
                sub.attach(await self.transport.subscribe(pattern, sub, qos=qos, queue=queue))
        except BaseException as exc:
            await sub.shutdown(drain=0.0, reason=DropReason.UNSUBSCRIBED)
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
        await sub.caught_up(self._retained_timeout)
        return sub
