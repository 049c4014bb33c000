"""Shared helpers for the NATS adapter's own tests (faults, auth/TLS, interop, retained).

Every wait here is event-driven and bounded: a helper waits for a handler call or a transport
state change, never for time to pass.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import pytest
from cascade_bus_nats import NatsTransport

from cascade_bus import Bus
from cascade_bus.testing.inbox import Inbox

#: Small reconnect waits so that fault tests recover in tens of milliseconds.
FAST_RECONNECT: dict[str, Any] = {
    "reconnect_min": 0.02,
    "reconnect_max": 0.2,
    "connect_attempt_timeout": 1.0,
}
#: Upper bound for any single wait in these tests.
WAIT = 10.0


def nats(bus: Bus) -> NatsTransport:
    """The bus's transport, as the NATS transport."""
    transport = bus.transport
    assert isinstance(transport, NatsTransport)
    return transport


async def wait_connected(bus: Bus, *, reconnects: int = 0, timeout: float = WAIT) -> None:
    """Wait (bounded) until the bus is connected after at least ``reconnects`` reconnects."""
    async with asyncio.timeout(timeout):
        await nats(bus).wait_connected(reconnects=reconnects)


async def wait_disconnected(bus: Bus, timeout: float = WAIT) -> None:
    """Wait (bounded) until the bus noticed that its connection is gone."""
    async with asyncio.timeout(timeout):
        await nats(bus).wait_disconnected()


@pytest.fixture
def kit() -> SimpleNamespace:
    """This module's helpers (tests run with --import-mode=importlib and cannot import it)."""
    return SimpleNamespace(
        FAST_RECONNECT=FAST_RECONNECT,
        WAIT=WAIT,
        Inbox=Inbox,
        nats=nats,
        wait_connected=wait_connected,
        wait_disconnected=wait_disconnected,
    )


@pytest.fixture(params=["fast", "public"])
def api(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with the fast paths into nats-py, and again with its public API only."""
    if request.param == "public":
        monkeypatch.setattr("cascade_bus_nats._transport.supported", lambda nc: False)
    return str(request.param)


@pytest.fixture
async def buses() -> AsyncIterator[list[Bus]]:
    """A list to append opened buses to; all are closed after the test (bounded)."""
    opened: list[Bus] = []
    yield opened
    async with asyncio.timeout(WAIT * 2):
        await asyncio.gather(*(bus.close() for bus in reversed(opened)), return_exceptions=True)
