"""Shared helpers for the NATS adapter's own tests (faults, auth/TLS, interop, retained).

Every wait here is event-driven and bounded: a helper waits for a handler call or a transport
state change, never for time to pass.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import nats as nats_py
import pytest
from cascade_bus_nats import NatsTransport
from nats.aio.client import Client as NatsClient

from cascade_bus import Bus
from cascade_bus.testing.waits import FAST_RECONNECT as SHARED_FAST_RECONNECT
from cascade_bus.testing.waits import fault_kit

#: The shared fast reconnect, and a short connect attempt (nats-py's own bound).
FAST_RECONNECT: dict[str, Any] = {**SHARED_FAST_RECONNECT, "connect_attempt_timeout": 1.0}


def nats(bus: Bus) -> NatsTransport:
    """The bus's transport, as the NATS transport."""
    transport = bus.transport
    assert isinstance(transport, NatsTransport)
    return transport


def wait_stopped(pid: int, timeout: float = 5.0) -> None:
    """Wait (bounded) until a process that got SIGSTOP shows as stopped in /proc."""
    stat = Path(f"/proc/{pid}/stat")
    if not stat.exists():
        pytest.skip("needs /proc to see that the server stopped")
    deadline = time.monotonic() + timeout
    while stat.read_text().rsplit(")", 1)[1].split()[0] != "T":
        if time.monotonic() >= deadline:
            raise TimeoutError(f"process {pid} did not stop within {timeout}s")
        time.sleep(0.001)


async def settle(nc: NatsClient) -> None:
    """Make sure the server has processed this client's SUBs and PUBs.

    nats-py's ``flush()`` writes its PING ahead of commands still in its write buffer, so one
    PONG does not prove they arrived (a SUB may be processed after another connection's
    publish); the second PING goes out after them.
    """
    await nc.flush()
    await nc.flush()


@pytest.fixture
async def plain(nats_url: str) -> AsyncIterator[NatsClient]:
    """A plain nats-py client on the test's server (for interop checks)."""
    nc = await nats_py.connect(nats_url)
    yield nc
    await nc.close()


@pytest.fixture
def kit() -> SimpleNamespace:
    """This module's helpers (tests run with --import-mode=importlib and cannot import it)."""
    kit = fault_kit(nats=nats, wait_stopped=wait_stopped, settle=settle)
    kit.FAST_RECONNECT = FAST_RECONNECT
    return kit


@pytest.fixture(params=["fast", "public"])
def api(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with the fast paths into nats-py, and again with its public API only."""
    if request.param == "public":
        monkeypatch.setattr("cascade_bus_nats._transport.supported", lambda nc: False)
    return str(request.param)
