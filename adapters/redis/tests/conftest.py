"""Shared helpers for the Redis adapter's own tests (streams, races, faults, auth/TLS, interop).

Every wait here is event-driven and bounded: a helper waits for a handler call or a transport
state change, never for time to pass.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from types import SimpleNamespace
from typing import Any, cast

import pytest
from cascade_bus_redis import RedisTransport

from cascade_bus import Bus, connect
from cascade_bus.testing.inbox import Inbox

#: Small reconnect backoff so that fault tests recover in tens of milliseconds.
FAST_RECONNECT: dict[str, Any] = {"reconnect_min": 0.02, "reconnect_max": 0.2}
#: Upper bound for any single wait in these tests.
WAIT = 10.0


def redis_transport(bus: Bus) -> RedisTransport:
    """The bus's transport, as the Redis transport."""
    assert isinstance(bus.transport, RedisTransport)
    return cast(RedisTransport, bus.transport)


async def wait_connected(bus: Bus, *, reconnects: int = 0, timeout: float = WAIT) -> None:
    """Wait (bounded) until the bus is connected after at least ``reconnects`` reconnects."""
    async with asyncio.timeout(timeout):
        await redis_transport(bus).wait_connected(reconnects=reconnects)


async def wait_disconnected(bus: Bus, timeout: float = WAIT) -> None:
    """Wait (bounded) until the bus noticed that its connection is gone."""
    async with asyncio.timeout(timeout):
        await redis_transport(bus).wait_disconnected()


@pytest.fixture
def kit() -> SimpleNamespace:
    """This module's helpers (tests run with --import-mode=importlib and cannot import it)."""
    return SimpleNamespace(
        FAST_RECONNECT=FAST_RECONNECT,
        WAIT=WAIT,
        Inbox=Inbox,
        redis_transport=redis_transport,
        wait_connected=wait_connected,
        wait_disconnected=wait_disconnected,
    )


@pytest.fixture
def prefix() -> str:
    """A unique topic prefix for this test."""
    return f"rt/{uuid.uuid4().hex}"


@pytest.fixture
async def open_bus() -> AsyncIterator[Callable[..., Any]]:
    """``await open_bus(url, **options)``: open a bus; all are closed after the test."""
    opened: list[Bus] = []

    async def make(url: str, **options: Any) -> Bus:
        bus = connect(url, **options)
        opened.append(bus)
        async with asyncio.timeout(WAIT):
            await bus.open()
        return bus

    yield make
    async with asyncio.timeout(WAIT * 2):
        await asyncio.gather(*(bus.close() for bus in reversed(opened)), return_exceptions=True)
