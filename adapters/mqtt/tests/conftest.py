"""Shared helpers for the MQTT adapter's own tests (fault, auth/TLS, interop, will/presence).

Every wait here is event-driven and bounded: a helper waits for a handler call or a transport
state change, never for time to pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from types import SimpleNamespace
from typing import cast

import pytest
from cascade_bus_mqtt import MqttTransport

from cascade_bus import Bus
from cascade_bus.testing.waits import (
    WAIT,
    fault_kit,
)


def mqtt(bus: Bus) -> MqttTransport:
    """The bus's transport, as the MQTT transport."""
    assert isinstance(bus.transport, MqttTransport)
    return cast(MqttTransport, bus.transport)


@pytest.fixture
def kit() -> SimpleNamespace:
    """This module's helpers (tests run with --import-mode=importlib and cannot import it)."""
    return fault_kit(mqtt=mqtt, run_cli=run_cli, kill=kill)


@pytest.fixture
def mosquitto_clients() -> tuple[str, str]:
    """Paths of ``mosquitto_pub`` and ``mosquitto_sub``; skip when they are not installed."""
    pub, sub = shutil.which("mosquitto_pub"), shutil.which("mosquitto_sub")
    if pub is None or sub is None:
        pytest.skip(
            "mosquitto_pub/mosquitto_sub not found; install Debian's mosquitto-clients "
            "(`apt-get install mosquitto-clients`)"
        )
    return pub, sub


async def run_cli(*argv: str, timeout: float = WAIT) -> bytes:
    """Run a command to completion (bounded); return its stdout, fail on a non-zero exit."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate()
    except TimeoutError:
        kill(proc)
        await proc.wait()
        raise AssertionError(f"{argv[0]} did not finish within {timeout}s") from None
    assert proc.returncode == 0, f"{argv} exited {proc.returncode}: {err.decode()}"
    return out


def kill(proc: asyncio.subprocess.Process) -> None:
    """SIGKILL a child we started (by its own pid), if it still runs."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
