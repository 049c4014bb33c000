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
from cascade_bus.testing.waits import FAST_RECONNECT as SHARED_FAST_RECONNECT
from cascade_bus.testing.waits import WAIT, wait_connected, wait_disconnected

#: The shared fast reconnect, and a short connect attempt (nats-py's own bound).
FAST_RECONNECT: dict[str, Any] = {**SHARED_FAST_RECONNECT, "connect_attempt_timeout": 1.0}


def nats(bus: Bus) -> NatsTransport:
    """The bus's transport, as the NATS transport."""
    transport = bus.transport
    assert isinstance(transport, NatsTransport)
    return transport


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
