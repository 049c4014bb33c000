"""Bounded, event-driven waits on a bus's connection state, for fault tests of any transport.

Adapters' own tests import these instead of writing them again: fast reconnect options (the
names every transport shares), a default bound, and waits on `NetworkTransport` state.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from .. import Bus
from .._transport import NetworkTransport
from .inbox import Inbox

__all__ = [
    "FAST_RECONNECT",
    "WAIT",
    "fault_kit",
    "network_transport",
    "wait_connected",
    "wait_disconnected",
]

#: Small reconnect backoff so that fault tests recover in tens of milliseconds.
FAST_RECONNECT: dict[str, Any] = {"reconnect_min": 0.02, "reconnect_max": 0.2}
#: Upper bound for any single wait in a fault test, in seconds.
WAIT = 10.0


def network_transport(bus: Bus) -> NetworkTransport:
    """The bus's transport; fails the test unless it is a `NetworkTransport`."""
    transport = bus.transport
    assert isinstance(transport, NetworkTransport), f"{transport!r} has no connection state"
    return transport


async def wait_connected(bus: Bus, *, reconnects: int = 0, timeout: float = WAIT) -> None:
    """Wait (bounded) until the bus is connected after at least ``reconnects`` reconnects."""
    async with asyncio.timeout(timeout):
        await network_transport(bus).wait_connected(reconnects=reconnects)


async def wait_disconnected(bus: Bus, timeout: float = WAIT) -> None:
    """Wait (bounded) until the bus noticed that its connection is gone."""
    async with asyncio.timeout(timeout):
        await network_transport(bus).wait_disconnected()


def fault_kit(**extra: Any) -> SimpleNamespace:
    """These helpers and `Inbox` in one namespace, plus an adapter's own ``extra`` ones.

    For an adapter's ``kit`` fixture: its tests run with ``--import-mode=importlib`` and cannot
    import their conftest, so the conftest hands its helpers over as a fixture.
    """
    return SimpleNamespace(
        FAST_RECONNECT=FAST_RECONNECT,
        WAIT=WAIT,
        Inbox=Inbox,
        wait_connected=wait_connected,
        wait_disconnected=wait_disconnected,
        **extra,
    )
