"""Adapter kit: the reconnect supervisor, written once for every network transport.

Loss -> backoff -> reopen (connect, resubscribe, resync) -> restore (resend) -> connected: one
named task per transport, one log line per lost connection, per failed attempt and per
reconnect, jittered exponential backoff between ``reconnect_min`` and ``reconnect_max``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from ._backoff import backoff_delays
from ._errors import BusError
from ._netopts import NetworkOptions
from ._transport import NetworkTransport

__all__ = ["Reconnectable", "Supervisor", "describe_cause"]

log = logging.getLogger("cascade_bus")


class Reconnectable(Protocol):
    """What a transport gives its `Supervisor`: the steps only it knows how to do."""

    async def wait_lost(self) -> BaseException | None:
        """Return once the current connection is gone, with its cause (None: closed cleanly)."""

    async def on_lost(self, cause: BaseException | None) -> None:
        """Tidy up the dead connection: forget it, requeue what it never acknowledged."""

    async def reopen(self) -> None:
        """Connect again, resubscribe everything and resync retained state.

        Raise `BusError` or `OSError` when the attempt failed (the supervisor retries; any
        other exception is logged with its traceback and retried too).
        """

    async def abandon(self) -> None:
        """Drop a connection a failed `reopen` left half open."""

    async def restore(self) -> None:
        """The connection is back: send what was held while down."""

    async def give_up(self, cause: BaseException | None) -> None:
        """``reconnect`` is off: fail everything that waits (the loss is final)."""


def describe_cause(cause: BaseException | None) -> str:
    """Say why a connection ended, in words (never ``None``)."""
    if cause is None:
        return "the connection was closed"
    text = str(cause)
    return f"{type(cause).__name__}: {text}" if text else type(cause).__name__


class Supervisor:
    """Runs ``loss -> backoff -> reopen -> restore`` for one transport, for its whole life.

    Args:
        transport: The transport whose connection state it records (``_set_connected``) and
            whose ``stats.reconnects`` it counts.
        steps: The transport-specific steps (usually the transport itself).
        options: The shared network options (``reconnect``, ``reconnect_min/max``).
    """

    def __init__(
        self, transport: NetworkTransport, steps: Reconnectable, options: NetworkOptions
    ) -> None:
        self._transport = transport
        self._steps = steps
        self._options = options
        self.closing = False
        """Set by the transport's ``aclose`` before it cancels the supervisor task."""

    async def run(self) -> None:
        """The supervisor task's body: returns when closing or when reconnect is off."""
        transport, steps = self._transport, self._steps
        where = transport.url.endpoint()
        while not self.closing:
            cause = await steps.wait_lost()
            if self.closing:
                return
            transport._set_connected(False)
            await steps.on_lost(cause)
            if not self._options.reconnect:
                log.error("lost the connection to %s (%s)", where, describe_cause(cause))
                await steps.give_up(cause)
                return
            log.warning(
                "lost the connection to %s (%s); reconnecting", where, describe_cause(cause)
            )
            attempts = await self._reconnect(where)
            if attempts is None:
                return
            transport.stats.reconnects += 1
            await steps.restore()
            transport._set_connected(True)
            log.warning("reconnected to %s after %d attempt(s)", where, attempts)

    async def _reconnect(self, where: str) -> int | None:
        """Try `reopen` with backoff until it works; the number of attempts (None: closing)."""
        attempt = 0
        for delay in backoff_delays(self._options.reconnect_min, self._options.reconnect_max):
            if self.closing:
                return None
            attempt += 1
            await asyncio.sleep(delay)
            try:
                await self._steps.reopen()
            except (BusError, OSError) as exc:
                log.info("reconnect attempt %d to %s failed: %s", attempt, where, exc)
                await self._steps.abandon()
                continue
            except Exception as exc:  # untranslated: still never the end of reconnecting
                log.warning(
                    "reconnect attempt %d to %s failed unexpectedly: %s",
                    attempt,
                    where,
                    describe_cause(exc),
                    exc_info=exc,
                )
                await self._steps.abandon()
                continue
            return attempt
        return None  # pragma: no cover - backoff_delays never ends
