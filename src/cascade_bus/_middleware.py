"""Middleware: ordered hooks around publishing and around handling, per bus and per subscription.

A middleware is a `Middleware` subclass overriding `publish`, `handle` or both; each receives the
envelope and ``call_next`` and must await ``call_next(env)`` (possibly with a changed envelope)
to continue. The first middleware in a list is the outermost. OpenTelemetry and metrics are built
on this hook. When no middleware overrides a hook, that path costs nothing extra.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from ._envelope import Envelope

__all__ = ["Middleware", "Next", "compose"]

#: The rest of the chain: await it with the (possibly replaced) envelope.
Next = Callable[[Envelope[Any]], Awaitable[None]]
Step = Callable[[Envelope[Any], Next], Awaitable[None]]


class Middleware:
    """Base class for middleware; override `publish` and/or `handle`.

    Example::

        class Timing(Middleware):
            async def handle(self, env, call_next):
                started = time.perf_counter()
                try:
                    await call_next(env)
                finally:
                    observe(time.perf_counter() - started)

    An exception raised in `handle` counts as a failed handling (``handler_error``, error
    hook) and never stops the subscription; one raised in `publish` reaches the publisher.
    """

    async def publish(self, env: Envelope[Any], call_next: Next) -> None:
        """Wrap one publish; ``env`` is the envelope about to be encoded and sent."""
        await call_next(env)

    async def handle(self, env: Envelope[Any], call_next: Next) -> None:
        """Wrap one handler call; ``env`` is the decoded envelope the handler will get."""
        await call_next(env)


def steps(middleware: Sequence[Middleware], hook: str) -> tuple[Step, ...]:
    """Return the bound ``hook`` methods of the middleware that actually override it."""
    base = getattr(Middleware, hook)
    return tuple(getattr(m, hook) for m in middleware if getattr(type(m), hook) is not base)


def compose(final: Next, chain: Sequence[Step]) -> Next:
    """Wrap ``final`` in ``chain`` (first = outermost); returns ``final`` itself if empty."""
    call = final
    for step in reversed(chain):
        call = _link(step, call)
    return call


def _link(step: Step, call_next: Next) -> Next:
    async def linked(env: Envelope[Any]) -> None:
        await step(env, call_next)

    return linked
