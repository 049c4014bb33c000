"""How many messages a queue-group member may hold (read from its stream, not yet handled).

A consumer-group reader takes whatever ``XREADGROUP COUNT n`` returns, so one that reads 256 at a
time takes a whole burst while the other members idle. A member therefore reads only while it
holds fewer than its *limit*: about ``HORIZON`` seconds of work at the rate its handler has been
finishing messages, at least ``floor`` (option ``queue_prefetch``) and at most ``cap``
(``read_count``). Slow handlers hold a few messages (the rest stays in the stream for the
members that have time: an AMQP prefetch count), fast ones hold many (a read round trip never
starves them).
"""

from __future__ import annotations

import asyncio
import time

__all__ = ["HORIZON", "Prefetch"]

#: Seconds of work a member claims ahead, at its measured rate.
HORIZON = 0.05
_WEIGHT = 0.25  # of the newest interval in the moving average


class Prefetch:
    """The limit of one queue member, learned from the intervals between finished messages."""

    __slots__ = ("cap", "floor", "interval", "limit", "mark", "room")

    def __init__(self, floor: int, cap: int) -> None:
        self.floor = floor
        self.cap = max(cap, floor)
        self.limit = floor
        self.interval = HORIZON / floor  # seconds per message while busy (moving average)
        self.mark = 0.0  # when the last message finished, or the member became busy
        self.room: asyncio.Future[None] | None = None  # the reader waits here while full

    def room_for(self, held: int) -> int:
        """How many messages to read now, holding ``held`` (0: wait); recomputes the limit.

        A read waits for a quarter of the limit to be free, so that a fast member reads in
        batches rather than one entry per round trip.
        """
        limit = int(HORIZON / self.interval) if self.interval > 0 else self.cap
        self.limit = limit = min(self.cap, max(self.floor, limit))
        room = limit - held
        return room if room >= self._batch() else 0

    def _batch(self) -> int:
        return max(1, self.limit // 4)

    def started(self) -> None:
        """The member got a message while holding none: it is busy from now on."""
        self.mark = time.monotonic()

    def finished(self, held: int) -> None:
        """A handler finished a message (``held`` left); wake the reader if it has room."""
        now = time.monotonic()
        self.interval += (now - self.mark - self.interval) * _WEIGHT
        self.mark = now
        room = self.room
        if room is not None and self.limit - held >= self._batch():
            self.room = None
            if not room.done():
                room.set_result(None)

    async def wait(self) -> None:
        """Wait until the member finished enough messages for the next read."""
        room = self.room
        if room is None or room.done():
            room = self.room = asyncio.get_running_loop().create_future()
        await room
