"""Conformance cases: presence (``Capabilities.presence``): online, offline on close, on a crash.

The crash case runs a bus in a child process and SIGKILLs it: nothing of the bus runs after
that, so the offline status comes from the broker (a last will) or from the sweep of a
surviving bus (emulated presence), within the bound the docs state (5 presence intervals).
"""

from __future__ import annotations

import asyncio
import sys
import textwrap
import time

import pytest

from .. import Connector, InvalidURL, UnsupportedFeature, connect
from .._presence import CRASH_BOUND_INTERVALS, LeasedPresence, default_presence_topic
from .._transport import NetworkTransport
from ._base import SuiteBase
from ._helpers import BusFactory, CallbackRecorder, Collector, ConnectorFactory

__all__ = ["PresenceCases"]

ONLINE = {"status": "online"}
OFFLINE = {"status": "offline"}
#: presence_interval of the buses in these cases (a crash shows within 5 of them).
INTERVAL = 0.4
#: Slack over the stated bound for a loaded machine (process scheduling, broker round trips).
SLACK = 2.0

VICTIM = textwrap.dedent(
    """
    import asyncio, sys
    import cascade_bus

    async def main() -> None:
        url, topic, interval = sys.argv[1], sys.argv[2], float(sys.argv[3])
        await cascade_bus.connect(url, presence=topic, presence_interval=interval)
        print("ready", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())
    """
)


class PresenceCases(SuiteBase):
    """The ``presence`` option: one contract on every transport that declares it."""

    async def test_presence_online_then_offline_on_close(
        self, make_bus: BusFactory, topic: str
    ) -> None:
        """Online (retained) while open; offline (retained) once closed."""
        observer = await make_bus(presence_sweep=True, presence_interval=INTERVAL)
        self.require(observer, "presence")
        status = f"{topic}/status"
        victim = await make_bus(presence=status, presence_interval=INTERVAL)
        assert victim.presence_topic == status
        seen = Collector()
        await observer.subscribe(status, seen, qos=1)
        assert seen.payloads == [ONLINE]  # retained: handed over before subscribe returned
        await victim.close()
        await seen.wait_count(2, self.wait_timeout)
        assert seen.payloads == [ONLINE, OFFLINE]
        late = Collector()
        await observer.subscribe(status, late)
        assert late.payloads == [OFFLINE]

    async def test_presence_bodies_are_options(self, make_bus: BusFactory, topic: str) -> None:
        """presence_online / presence_offline replace the bodies (dicts as JSON)."""
        observer = await make_bus()
        self.require(observer, "presence")
        status = f"{topic}/custom"
        victim = await make_bus(
            presence=status, presence_online={"up": 1}, presence_offline=b'{"up":0}'
        )
        seen = Collector()
        await observer.subscribe(status, seen, qos=1)
        await victim.close()
        await seen.wait_count(2, self.wait_timeout)
        assert seen.payloads == [{"up": 1}, {"up": 0}]

    async def test_presence_is_refused_where_undeclared(self, transport_url: str) -> None:
        """Without the capability, asking for presence names the transport and the feature."""
        probe = connect(transport_url)
        if probe.capabilities.presence:
            with pytest.raises(InvalidURL, match="presence"):
                connect(transport_url, presence="a/+")
            with pytest.raises(InvalidURL, match="presence_offline"):
                connect(transport_url, presence="a/b", presence_offline=b"")
            return
        with pytest.raises(UnsupportedFeature, match="presence"):
            connect(transport_url, presence="a/b")

    async def test_connector_presence_by_default(
        self, make_connector: ConnectorFactory, topic: str, make_bus: BusFactory, transport_url: str
    ) -> None:
        """A Connector announces itself as upstream's does; presence=False turns it off."""
        default = Connector(transport_url)  # never connected: nothing is published
        observer = await make_bus()
        if not observer.capabilities.presence:
            assert default.presence_topic is None
            return
        assert default.presence_topic is not None
        assert default.presence_topic.startswith(default_presence_topic())
        assert make_connector(presence=False).presence_topic is None
        engine = make_connector(presence=f"{topic}/engine")
        seen = CallbackRecorder()
        watcher = make_connector(presence=False)
        await watcher.connect()
        await engine.connect()
        await watcher.subscribe(f"{topic}/engine", seen)
        assert seen.calls == [(f"{topic}/engine", ONLINE)]
        await engine.disconnect()
        await seen.wait_for(lambda: len(seen.calls) == 2, "the offline status", self.wait_timeout)
        assert seen.calls[1] == (f"{topic}/engine", OFFLINE)

    async def test_presence_offline_after_sigkill(
        self, make_bus: BusFactory, topic: str, transport_url: str
    ) -> None:
        """A bus in a child process is SIGKILLed: offline arrives within the stated bound, once."""
        observer = await make_bus(presence_sweep=True, presence_interval=INTERVAL)
        self.require(observer, "presence")
        other = await make_bus(presence_sweep=True, presence_interval=INTERVAL)
        if not isinstance(observer.transport, NetworkTransport):
            pytest.skip(f"{observer.url.scheme} is in-process: its broker dies with the process")
        status = f"{topic}/killed"
        seen = Collector()
        await observer.subscribe(status, seen, qos=1)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            VICTIM,
            transport_url,
            status,
            str(INTERVAL),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            assert proc.stdout is not None
            async with asyncio.timeout(30.0):  # interpreter start and imports
                line = await proc.stdout.readline()
            assert line == b"ready\n", (line, await _stderr(proc))
            await seen.wait_count(1, self.wait_timeout)
            assert seen.payloads == [ONLINE]
            proc.kill()  # SIGKILL: no close, no DISCONNECT, no last words
            killed = time.monotonic()
            bound = INTERVAL * CRASH_BOUND_INTERVALS
            await seen.wait_count(2, bound + SLACK)
            took = time.monotonic() - killed
        finally:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
        assert seen.payloads == [ONLINE, OFFLINE]
        assert took <= bound + SLACK, f"offline after {took:.2f}s (bound {bound:.1f}s)"
        transport = observer.transport
        if isinstance(transport, LeasedPresence):  # two sweepers: one claim, the lease gone
            assert sum(b._presence.claimed for b in (observer, other) if b._presence) == 1
            leases = await transport.presence_leases().scan()
            assert status not in [name for name, _, _ in leases]


async def _stderr(proc: asyncio.subprocess.Process) -> bytes:
    if proc.stderr is None:
        return b""
    proc.kill()
    return await proc.stderr.read()
