"""One timer for many waits that share one timeout (the bus's ``publish_timeout``).

An ``asyncio.timeout`` per QoS >= 1 publish costs a timer handle, `current_task` and a
cancellation each (~5 µs). Deadlines that all lie the same span ahead arrive in the order they
were set, so a FIFO queue and a single timer bound them all.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

__all__ = ["Deadlines"]


class Deadlines:
    """Fails each watched future with `TimeoutError` once ``timeout`` seconds have passed.

    A future settled before its deadline is simply forgotten. The owner of a watched future
    must check ``done()`` before settling it (as it must for a cancelled one already).
    """

    __slots__ = ("_handle", "_queue", "_timeout")

    def __init__(self, timeout: float) -> None:
        self._timeout = timeout
        self._queue: deque[tuple[float, asyncio.Future[Any]]] = deque()
        self._handle: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return len(self._queue)

    def watch(self, fut: asyncio.Future[Any]) -> None:
        """Bound ``fut`` by the timeout, counted from now."""
        queue = self._queue
        while queue and queue[0][1].done():  # settled in order, as acknowledgements mostly are
            queue.popleft()
        loop = fut.get_loop()
        queue.append((loop.time() + self._timeout, fut))
        if self._handle is None:
            self._handle = loop.call_at(queue[0][0], self._expire, loop)

    def _expire(self, loop: asyncio.AbstractEventLoop) -> None:
        queue = self._queue
        now = loop.time()
        while queue and (queue[0][1].done() or queue[0][0] <= now):
            _, fut = queue.popleft()
            if not fut.done():
                fut.set_exception(TimeoutError())
        self._handle = loop.call_at(queue[0][0], self._expire, loop) if queue else None
