"""`SubscriptionHost`: the few bus-wide services a subscription uses, so it never sees the `Bus`.

A subscription counts, reports errors, acknowledges in the background, bounds its flow-control
wait and dead-letters through this interface only; `BusHost` is the bus's implementation, so
the subscription modules import nothing of the bus (no import cycle).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from ._envelope import DEFAULT_TYPE
from ._errors import BusError

if TYPE_CHECKING:
    from ._envelope import Envelope
    from ._stats import StatsRecorder

__all__ = ["BusHost", "ErrorHook", "SubscriptionHost"]

log = logging.getLogger("cascade_bus")

#: Called for every error the bus absorbs (handler exceptions, undecodable messages, ...):
#: ``hook(error, topic, envelope_or_None)``.
ErrorHook = Callable[[Exception, str, "Envelope[Any] | None"], object]

#: How the host publishes a dead letter: `Bus.publish` with the keywords it takes.
Publish = Callable[..., Awaitable[None]]


class SubscriptionHost(Protocol):
    """What a `Subscription` may use of the bus that owns it, and nothing more."""

    @property
    def stats(self) -> StatsRecorder:
        """The bus's counters (shared with its transport)."""

    @property
    def flow_timeout(self) -> float:
        """Seconds a publisher waits for room in a full subscription before going on."""

    def report(self, error: Exception, topic: str, env: Envelope[Any] | None) -> None:
        """Hand an absorbed error to the bus's error hook (by default: log it)."""

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` as a background task the bus keeps a reference to."""

    def overflow_warning_due(self) -> bool:
        """True the first time a subscription of this bus overflows (warn once per bus)."""

    async def dead_letter(
        self, topic: str, env: Envelope[Any], error: Exception, attempts: int
    ) -> None:
        """Publish ``env``, whose handler kept failing, to ``topic`` with ``x-death-*`` headers."""


class BusHost:
    """The `SubscriptionHost` of one bus: its counters, error hook, background acks, bounds."""

    __slots__ = (
        "_background",
        "_on_error",
        "_overflow_warned",
        "_publish",
        "flow_timeout",
        "stats",
    )

    def __init__(
        self,
        stats: StatsRecorder,
        *,
        on_error: ErrorHook | None,
        flow_timeout: float,
        publish: Publish,
    ) -> None:
        self.stats = stats
        self.flow_timeout = flow_timeout
        self._on_error = on_error
        self._publish = publish
        self._overflow_warned = False
        self._background: set[asyncio.Task[None]] = set()  # acks of dropped messages

    def report(self, error: Exception, topic: str, env: Envelope[Any] | None) -> None:
        """Call the error hook (a failing hook is logged), or log the error without one."""
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

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` as a task held until it is done (a loose task may be collected)."""
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def overflow_warning_due(self) -> bool:
        """True once: the first overflow of any subscription of this bus is logged."""
        if self._overflow_warned:
            return False
        self._overflow_warned = True
        return True

    async def dead_letter(
        self, topic: str, env: Envelope[Any], error: Exception, attempts: int
    ) -> None:
        """Publish a message whose handler kept failing to its dead-letter topic."""
        headers: Mapping[str, str] = {
            **env.headers,
            "x-death-topic": env.topic,
            "x-death-id": env.id,
            "x-death-error-type": type(error).__name__,
            "x-death-error": str(error)[:1000],
            "x-death-attempts": str(attempts),
        }
        await self._publish(
            topic,
            env.payload,
            headers=headers,
            type=None if env.type == DEFAULT_TYPE else env.type or None,
            correlation_id=env.correlation_id,
        )
