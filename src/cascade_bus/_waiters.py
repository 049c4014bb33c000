"""Adapter kit: futures waiting for a token of the transport's own to come back, by token.

A transport proves ordering with tokens it sends itself: a barrier message on its own topic,
a PING whose PONG comes back on the same connection. Each wait is a future in a `Waiters`
table; the token's arrival settles it (a late one, after its waiter gave up, is recognised as
ours and ignored), and a lost connection fails them all at once, so no wait outlives the
connection it waits on.
"""

from __future__ import annotations

import asyncio

__all__ = ["Waiters"]


class Waiters:
    """Futures by token: `add` one, `arrived` settles it, `fail_all` on a lost connection."""

    __slots__ = ("_waiting",)

    def __init__(self) -> None:
        self._waiting: dict[bytes, asyncio.Future[None]] = {}

    def __len__(self) -> int:
        return len(self._waiting)

    def __contains__(self, token: object) -> bool:
        return token in self._waiting

    def add(self, token: bytes) -> asyncio.Future[None]:
        """Wait for ``token``: the future its arrival settles (`discard` it when done)."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting[token] = fut
        return fut

    def discard(self, token: bytes) -> None:
        """Stop waiting for ``token`` (its waiter is done, settled or not)."""
        self._waiting.pop(token, None)

    def arrived(self, token: bytes) -> bool:
        """``token`` came back: settle its waiter; False if nobody waits for it (late, junk)."""
        fut = self._waiting.pop(token, None)
        if fut is None:
            return False
        if not fut.done():
            fut.set_result(None)
        return True

    def fail_all(self, error: BaseException) -> None:
        """Fail every waiter with ``error`` (the connection their tokens travel on is gone)."""
        waiting, self._waiting = self._waiting, {}
        for fut in waiting.values():
            if not fut.done():
                fut.set_exception(error)
                fut.exception()  # retrieved: a waiter that already gave up logs nothing
