"""`Inbox`: a recording subscription handler with bounded, event-driven waits (for tests)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from cascade_bus import Envelope

__all__ = ["Inbox"]

#: Default upper bound, in seconds, for any single wait.
WAIT = 10.0


class Inbox:
    """A subscription handler that keeps what it receives and can wait for a condition.

    Every wait is bounded and raises `AssertionError` describing what arrived, so a test
    failure says what was missing instead of hanging.
    """

    def __init__(self) -> None:
        self.envelopes: list[Envelope[Any]] = []
        self._changed = asyncio.Event()

    def __call__(self, env: Envelope[Any]) -> None:
        """Record one envelope (the subscription handler)."""
        self.envelopes.append(env)
        self._changed.set()

    @property
    def payloads(self) -> list[Any]:
        """Every payload received, in arrival order."""
        return [env.payload for env in self.envelopes]

    def __len__(self) -> int:
        return len(self.envelopes)

    async def wait_until(
        self, predicate: Callable[[], bool], what: str, timeout: float = WAIT
    ) -> None:
        """Wait until ``predicate()`` holds, re-checking after every received message.

        Raises:
            AssertionError: it did not hold within ``timeout`` seconds.
        """
        try:
            async with asyncio.timeout(timeout):
                while not predicate():
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            tail = self.payloads[-5:]
            raise AssertionError(
                f"waited {timeout}s for {what}; got {len(self)} message(s), last {tail!r}"
            ) from None

    async def wait_for(self, count: int, timeout: float = WAIT) -> list[Any]:
        """Wait until at least ``count`` messages arrived; return the first ``count`` payloads."""
        await self.wait_until(lambda: len(self) >= count, f"{count} messages", timeout)
        return self.payloads[:count]
