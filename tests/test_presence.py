"""Presence in the core: options, the Connector's default, memory:// at process exit, watch.

The network transports' crash cases (SIGKILL, outage) are in the conformance and fault suites.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import uuid
from typing import Any

import msgspec
import pytest

import cascade_bus
from cascade_bus import Connector, InvalidURL, UnsupportedFeature
from cascade_bus._capabilities import Capabilities
from cascade_bus._memory import MemoryTransport
from cascade_bus._presence import default_presence_topic
from cascade_bus.cli._watch import WatchView
from cascade_bus.spi import NetworkTransport, TransportSubscription
from cascade_bus.testing.inbox import Inbox

ONLINE = {"status": "online"}
OFFLINE = {"status": "offline"}

#: The memory:// "crash": the interpreter exits with the bus still open (it is never closed).
#: The handler registered first runs last, after the bus's own: it prints what is retained.
EXITING = textwrap.dedent(
    """
    import asyncio, atexit, sys
    import cascade_bus
    from cascade_bus._memory import MemoryBroker

    name, topic = sys.argv[1], sys.argv[2]
    atexit.register(lambda: print(MemoryBroker.named(name).retained[topic][0].decode()))

    async def main() -> None:
        bus = await cascade_bus.connect(f"memory://{name}", presence=topic)
        print(MemoryBroker.named(name).retained[topic][0].decode(), flush=True)
        bus.publish  # left open on purpose

    asyncio.run(main())
    """
)


def unique() -> str:
    return uuid.uuid4().hex[:10]


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"presence": "a/+"}, "presence"),
        ({"presence": "a/#"}, "presence"),
        ({"presence": "a/b", "presence_offline": b""}, "presence_offline"),
        ({"presence": "a/b", "presence_online": ""}, "presence_online"),
        ({"presence": "a/b", "presence_interval": "0"}, "presence_interval"),
        ({"presence": "a/b", "presence_interval": "soon"}, "presence_interval"),
        ({"presence": "a/b", "presence_online": {1j}}, "presence_online"),
    ],
)
def test_bad_presence_options_name_the_option(options: dict[str, Any], match: str) -> None:
    with pytest.raises(InvalidURL, match=match):
        cascade_bus.connect("memory://", **options)


def test_presence_from_the_query_and_true_for_the_default_topic() -> None:
    assert cascade_bus.connect("memory://?presence=x/y").presence_topic == "x/y"
    assert cascade_bus.connect("memory://", presence=True).presence_topic == (
        default_presence_topic()
    )
    assert cascade_bus.connect("memory://", presence=False).presence_topic is None
    assert cascade_bus.connect("memory://?presence=false").presence_topic is None
    assert cascade_bus.connect("memory://?presence=true").presence_topic == (
        default_presence_topic()
    )
    assert cascade_bus.connect("memory://").presence_topic is None


def test_presence_is_refused_by_a_transport_that_does_not_declare_it() -> None:
    class Plain(MemoryTransport):
        capabilities = msgspec.structs.replace(MemoryTransport.capabilities, presence=False)

    plain = Plain(cascade_bus.BusURL("memory://plain"), {})
    with pytest.raises(UnsupportedFeature, match="presence") as info:
        cascade_bus.Bus(transport=plain, presence="a/b")
    assert info.value.feature == "presence"
    # Sweeping is a no-op where there is nothing to sweep: a watcher can always ask for it.
    assert cascade_bus.Bus(transport=plain, presence_sweep=True).presence_topic is None
    assert not Capabilities().presence


async def test_memory_online_offline_and_bodies() -> None:
    url = f"memory://{unique()}"
    async with cascade_bus.connect(url) as observer:
        seen = Inbox()
        await observer.subscribe("engines/#", seen)
        async with cascade_bus.connect(url, presence="engines/a"):
            assert await seen.wait_for(1) == [ONLINE]
        assert await seen.wait_for(2) == [ONLINE, OFFLINE]
        async with cascade_bus.connect(
            url, presence="engines/b", presence_online="up", presence_offline={"down": True}
        ):
            pass
        assert (await seen.wait_for(4))[2:] == [b"up", {"down": True}]  # "up" is not JSON
        late = Inbox()
        await observer.subscribe("engines/#", late)
        assert sorted(map(str, late.payloads)) == sorted(map(str, [OFFLINE, {"down": True}]))


def test_memory_offline_at_interpreter_exit() -> None:
    """A memory:// bus never closed: the offline body is retained as the process ends."""
    name, topic = unique(), f"engines/{unique()}"
    done = subprocess.run(
        [sys.executable, "-c", EXITING, name, topic],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode().splitlines() == ['{"status":"online"}', '{"status":"offline"}']


async def test_connector_presence_default_off_and_numbered() -> None:
    url = f"memory://{unique()}"
    first, second = Connector(url), Connector(url)
    assert first.presence_topic is not None
    assert second.presence_topic is not None
    assert first.presence_topic.startswith(default_presence_topic())
    assert second.presence_topic != first.presence_topic  # never two buses on one topic
    assert Connector(url, presence=False).presence_topic is None
    assert Connector(f"{url}?presence=mine/x").presence_topic == "mine/x"
    seen: list[tuple[str, dict[str, Any]]] = []

    async def record(topic: str, payload: dict[str, Any]) -> None:
        seen.append((topic, payload))

    watcher = Connector(url, presence=False)
    await watcher.connect()
    await watcher.subscribe("cascade/status/#", record)
    await first.connect()
    await first.disconnect()
    await first.connect()  # a reconnect announces online again, on the same topic
    await first.disconnect()
    await watcher.disconnect()
    assert seen == [(first.presence_topic, s) for s in (ONLINE, OFFLINE, ONLINE, OFFLINE)]


async def test_watch_lists_engines_online_and_offline() -> None:
    url = f"memory://{unique()}"
    up, gone = Connector(url, presence="cascade/status/up"), Connector(url)
    await up.connect()
    await gone.connect()
    await gone.disconnect()
    view = WatchView("cascade/#", url)
    async with cascade_bus.connect(url) as bus, bus.subscribe("cascade/#") as sub:
        while sub.pending:
            assert view.add(await sub.get(timeout=5.0)) is None  # not a log line
        await bus.publish("cascade/status/up", b"", retain=True)  # cleared: forgotten
        assert view.add(await sub.get(timeout=5.0)) is None
    await up.disconnect()
    assert gone.presence_topic is not None
    engine = gone.presence_topic.rsplit("/", 1)[1]
    assert {name: row.status for name, row in view.engines.rows.items()} == {engine: "offline"}
    assert view.engines.table().title == "Engines (0 online of 1)"


async def test_presence_stays_off_the_publish_path() -> None:
    """No presence work per message: the bus's publish counters are the user's alone."""
    url = f"memory://{unique()}"
    async with cascade_bus.connect(url, presence="p/x") as bus:
        await bus.publish("p/y", 1)
        assert bus.stats().published == 1


def test_a_network_transport_needs_a_presence_mechanism() -> None:
    """Declaring presence without a will or leases would report no crash: refused."""

    class Declared(NetworkTransport):
        capabilities = Capabilities(retain=True, presence=True)

        async def connect(self) -> None:
            raise NotImplementedError

        async def aclose(self) -> None:
            return None

        def send(self, *args: Any, **kwargs: Any) -> None:
            raise NotImplementedError

        async def subscribe(self, *args: Any, **kwargs: Any) -> TransportSubscription:
            raise NotImplementedError

    declared = Declared(cascade_bus.BusURL("tcp://h:1"), {})
    with pytest.raises(UnsupportedFeature, match="LeasedPresence"):
        cascade_bus.Bus(transport=declared, presence="a/b")
