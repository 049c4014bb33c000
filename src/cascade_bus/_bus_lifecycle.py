"""Opening and closing a `Bus`: bounded connect, then a draining, idempotent close.

A bus is single-use (`State`): open once, close once; close finishes publishes in flight,
flushes, lets handlers finish (all bounded by ``close_timeout``) and then disconnects.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Generator
from types import TracebackType
from typing import Any, Self

from ._bus_core import BusCore, State
from ._errors import BusClosed, BusError, ConnectError
from ._stats import DropReason

__all__ = ["BusLifecycle"]

log = logging.getLogger("cascade_bus")


class BusLifecycle(BusCore):
    """Open and close (part of `Bus`)."""

    async def open(self) -> Self:
        """Connect the transport (bounded by ``connect_timeout``); idempotent while open.

        Raises:
            ConnectError: the broker could not be reached.
            BusClosed: the bus was closed already.
        """
        if self._state is State.OPEN:
            return self
        if self._state is not State.NEW:
            raise BusClosed(f"{self!r} cannot be opened again; create a new bus")
        self._state = State.OPENING
        try:
            async with asyncio.timeout(self._connect_timeout):
                await self.transport.connect()
                if self._presence is not None:
                    await self._presence.start()
        except TimeoutError:
            self._state = State.CLOSED
            await self._abort()
            raise ConnectError(
                f"could not connect to {self.url.endpoint()} within {self._connect_timeout}s"
            ) from None
        except BusError:
            self._state = State.CLOSED
            await self._abort()
            raise
        except Exception as exc:
            self._state = State.CLOSED
            await self._abort()
            raise ConnectError(f"could not connect to {self.url.endpoint()}: {exc}") from exc
        except BaseException:
            self._state = State.CLOSED
            await self._abort()
            raise
        self._state = State.OPEN
        self._live = True
        log.debug("bus %s open", self.url.redacted())
        return self

    async def _abort(self) -> None:
        if self._presence is not None:
            await self._presence.cancel()
        try:
            await asyncio.shield(self.transport.aclose())
        except Exception as exc:
            log.debug("closing %s after a failed open: %r", self.url.redacted(), exc)

    def __await__(self) -> Generator[Any, None, Self]:
        return self.open().__await__()

    async def __aenter__(self) -> Self:
        return await self.open()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def is_open(self) -> bool:
        """True between a successful `open` and the start of `close`."""
        return self._state is State.OPEN

    async def close(self) -> None:
        """Drain and disconnect cleanly; once it returns, every earlier publish reached the broker.

        Publishes in flight finish, the transport flushes, handlers finish what they hold (all
        bounded by ``close_timeout``), then the transport disconnects.

        Idempotent: a second call waits for the first to finish.
        """
        if self._state in (State.CLOSING, State.CLOSED):
            if self._closed_event is not None:
                await self._closed_event.wait()
            return
        if self._state is State.NEW:
            self._state = State.CLOSED
            return
        self._state = State.CLOSING
        self._live = False
        self._closed_event = closed = asyncio.Event()
        try:
            await asyncio.shield(self._drain_and_close())
        finally:
            self._state = State.CLOSED
            closed.set()

    async def _drain_and_close(self) -> None:
        deadline = asyncio.get_running_loop().time() + self._close_timeout

        def left() -> float:
            return max(0.0, deadline - asyncio.get_running_loop().time())

        if self._presence is not None:  # offline first, flushed with the rest below
            await self._presence.stop(left())
        if self._inflight:
            self._idle = asyncio.Event()
            try:
                async with asyncio.timeout(left()):
                    await self._idle.wait()
            except TimeoutError:
                log.warning(
                    "close(): %d publishes still in flight after the timeout", self._inflight
                )
        try:
            await self.transport.flush(left())
        except Exception as exc:
            log.warning("close(): flush of %s failed: %r", self.url.redacted(), exc)
        subs = list(self._subs)
        await asyncio.gather(
            *(s.shutdown(drain=left(), reason=DropReason.CLOSED, detach=False) for s in subs),
            return_exceptions=True,
        )
        for fut in self._replies.values():
            if not fut.done():
                fut.set_exception(BusClosed("the bus was closed while waiting for a reply"))
        self._replies.clear()
        try:
            async with asyncio.timeout(max(left(), 1.0)):
                await self.transport.aclose()
        except Exception as exc:
            log.warning("close(): disconnect from %s failed: %r", self.url.redacted(), exc)
        log.debug("bus %s closed", self.url.redacted())
