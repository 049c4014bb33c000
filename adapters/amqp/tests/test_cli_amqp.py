"""The command line on RabbitMQ: ``doctor`` and ``watch`` as a user runs them (a real process)."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import uuid

import pytest

from cascade_bus import Connector
from cascade_bus.testing.waits import WAIT

pytestmark = pytest.mark.amqp

CLI = [sys.executable, "-m", "cascade_bus.cli"]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=60, check=False)


def test_doctor_passes(amqp_url: str) -> None:
    result = run_cli("doctor", amqp_url, "--timeout", "10")
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "Traceback" not in out
    assert re.search(r"│ connect\s+│ ok\s+│", result.stdout)
    assert re.search(r"│ publish and subscribe\s+│ ok\s+│", result.stdout)
    assert re.search(r"│ retain\s+│ yes", result.stdout)
    assert ":guest@" not in out  # the password is masked
    assert "amqp://guest:[secure]@" in result.stdout


def test_watch_once_shows_the_retained_state(amqp_url: str) -> None:
    run = f"run-{uuid.uuid4().hex[:8]}"

    async def publish() -> None:
        engine = Connector(amqp_url, presence=False)
        async with asyncio.timeout(WAIT):
            await engine.connect()
            for task, state in [("extract", "succeeded"), ("load", "running")]:
                event = {"run": run, "task": task, "attempt": 1, "state": state}
                await engine.publish(f"cascade/telemetry/{run}/{task}/1/events", event, retain=True)
            await engine.publish(
                f"cascade/constraints/{run}", {"paused": True, "reason": "cli test"}, retain=True
            )
            await engine.disconnect()

    async def clear() -> None:
        engine = Connector(amqp_url, presence=False)
        async with asyncio.timeout(WAIT):
            await engine.connect()
            for topic in [
                f"cascade/telemetry/{run}/extract/1/events",
                f"cascade/telemetry/{run}/load/1/events",
                f"cascade/constraints/{run}",
            ]:
                await engine.publish(topic, {}, retain=True)
            await engine.disconnect()

    asyncio.run(publish())
    try:
        result = run_cli("watch", amqp_url, "--once")
    finally:
        asyncio.run(clear())
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "Traceback" not in out
    assert re.search(rf"│ {run}\s+│ paused\s+│ 1 running, 1 succeeded\s+│", result.stdout), out
    assert re.search(rf"│ {run}\s+│ extract\s+│\s+1 │ succeeded\s+│", result.stdout), out
    assert ":guest@" not in out
