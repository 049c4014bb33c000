"""What the test suites share: recording handlers, waits, sentinels and URL helpers.

Used by the conformance and fault suites (and by adapters' own tests): every wait is
event-driven and bounded.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Protocol
from urllib.parse import parse_qsl, urlencode

import msgspec

from .. import Bus, Connector, Envelope, ErrorHook

__all__ = [
    "SENTINEL_KEY",
    "BusFactory",
    "CallbackRecorder",
    "Collector",
    "ConnectorFactory",
    "ErrorRecorder",
    "Reading",
    "Signal",
    "is_sentinel",
    "sentinel",
    "with_query",
]

#: The key that marks a sentinel payload (see `sentinel`).
SENTINEL_KEY = "__conformance_sentinel__"


def sentinel(token: str = "end") -> dict[str, str]:
    """Return a sentinel payload: published last, it tells a subscriber it has seen the rest."""
    return {SENTINEL_KEY: token}


def is_sentinel(payload: object, token: str | None = None) -> bool:
    """Tell whether a payload is a sentinel (with the given token, when one is given)."""
    if not isinstance(payload, dict) or SENTINEL_KEY not in payload:
        return False
    return token is None or payload[SENTINEL_KEY] == token


def with_query(url: str, **params: str) -> str:
    """Return ``url`` with query parameters set, replacing any of the same name.

    ``with_query("memory://x", format="raw")`` is ``"memory://x?format=raw"``;
    ``with_query("mqtt://h?client_id=a", format="raw")`` is
    ``"mqtt://h?client_id=a&format=raw"``.
    """
    base, _, query = url.partition("?")
    pairs = [(k, v) for k, v in parse_qsl(query, keep_blank_values=True) if k not in params]
    pairs.extend(params.items())
    return f"{base}?{urlencode(pairs)}" if pairs else base


class Reading(msgspec.Struct, frozen=True):
    """The typed payload the suite decodes into (``type=Reading``)."""

    sensor: str
    value: float


class Signal:
    """Something a test can wait on: ``notify()`` wakes ``wait_for(predicate)``."""

    def __init__(self) -> None:
        self._changed = asyncio.Event()

    def notify(self) -> None:
        """Wake every waiter so it re-checks its predicate."""
        self._changed.set()

    async def wait_for(self, predicate: Callable[[], bool], what: str, timeout: float) -> None:
        """Wait (at most ``timeout`` seconds) until ``predicate()`` is true.

        Raises:
            AssertionError: the predicate stayed false; the message says what was awaited.
        """
        try:
            async with asyncio.timeout(timeout):
                while not predicate():
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            raise AssertionError(
                f"timed out after {timeout}s waiting for {what}; state: {self.describe()}"
            ) from None

    def describe(self) -> str:
        """Say what has been recorded so far (for timeout messages)."""
        return repr(self)


class Collector(Signal):
    """A subscription handler that records every envelope (a plain, synchronous callable).

    Args:
        group: Another `Signal` to notify on every envelope as well (to wait on a condition
            over several collectors).
    """

    def __init__(self, group: Signal | None = None) -> None:
        super().__init__()
        self.envelopes: list[Envelope[Any]] = []
        self._group = group

    def __call__(self, env: Envelope[Any]) -> None:
        """Record one envelope (the subscription handler)."""
        self.envelopes.append(env)
        self.notify()
        if self._group is not None:
            self._group.notify()

    @property
    def payloads(self) -> list[Any]:
        """Every payload received, sentinels included, in arrival order."""
        return [e.payload for e in self.envelopes]

    @property
    def messages(self) -> list[Envelope[Any]]:
        """Every envelope received except sentinels, in arrival order."""
        return [e for e in self.envelopes if not is_sentinel(e.payload)]

    @property
    def values(self) -> list[Any]:
        """Every payload received except sentinels, in arrival order."""
        return [e.payload for e in self.messages]

    def seen_sentinel(self, token: str = "end") -> bool:
        """Tell whether the sentinel with ``token`` has arrived."""
        return any(is_sentinel(e.payload, token) for e in self.envelopes)

    async def wait_count(self, count: int, timeout: float) -> None:
        """Wait until at least ``count`` envelopes (sentinels included) arrived."""
        await self.wait_for(
            lambda: len(self.envelopes) >= count, f"{count} message(s)", timeout=timeout
        )

    async def wait_sentinel(self, timeout: float, token: str = "end") -> None:
        """Wait until the sentinel with ``token`` arrived."""
        await self.wait_for(
            lambda: self.seen_sentinel(token), f"the sentinel {token!r}", timeout=timeout
        )

    def describe(self) -> str:
        """Say how many envelopes arrived and show the last few."""
        tail = [(e.topic, e.payload) for e in self.envelopes[-5:]]
        return f"{len(self.envelopes)} envelope(s), last: {tail!r}"


class ErrorRecorder(Signal):
    """An ``on_error`` hook that records ``(error, topic, envelope)`` for every call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[Exception, str, Envelope[Any] | None]] = []

    def __call__(self, error: Exception, topic: str, env: Envelope[Any] | None) -> None:
        """Record one absorbed error (the ``on_error`` hook)."""
        self.calls.append((error, topic, env))
        self.notify()

    def describe(self) -> str:
        """Show the errors recorded."""
        return repr([(type(e).__name__, t) for e, t, _ in self.calls])


class CallbackRecorder(Signal):
    """A Cascade `Connector` callback that records ``(topic, payload)`` for every call."""

    def __init__(self, keep: Callable[[str], bool] | None = None) -> None:
        super().__init__()
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self._keep = keep

    async def __call__(self, topic: str, payload: dict[str, Any]) -> None:
        """Record one call (the Connector callback), unless ``keep`` rejects the topic."""
        if self._keep is None or self._keep(topic):
            self.calls.append((topic, payload))
            self.notify()

    def describe(self) -> str:
        """Show the last few calls."""
        return f"{len(self.calls)} call(s), last: {self.calls[-5:]!r}"


class BusFactory(Protocol):
    """The ``make_bus`` fixture: ``await make_bus(url=None, on_error=None, **options)``."""

    async def __call__(
        self, url: str | None = None, /, *, on_error: ErrorHook | None = None, **options: Any
    ) -> Bus:
        """Open a bus on ``url`` (default: the transport URL); it is closed after the test."""


class ConnectorFactory(Protocol):
    """The ``make_connector`` fixture: ``make_connector(url=None, **options)``."""

    def __call__(self, url: str | None = None, /, **options: Any) -> Connector:
        """Build a (not yet connected) Connector; it is disconnected after the test."""
