"""How a subscription is told to behave: its handler type and its `SubscriptionPolicy`.

Kept apart from the `Subscription` machinery so the bus can check a policy before anything runs.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Literal, TypeAlias, TypeVar

from ._envelope import Envelope

__all__ = ["OVERFLOW_POLICIES", "Handler", "Overflow", "SubscriptionPolicy"]

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
