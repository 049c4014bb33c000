"""A third-party transport plugs in through the public extension point and passes the suite.

`LoopbackTransport` is written here from scratch against the public SPI only
(``cascade_bus.spi``: ``Transport``, ``TransportSubscription``, ``Message``, ``MessageSink``,
``Capabilities``, ``topic_matches``, ``parse_int``): an in-process broker with a receive loop
per subscription, as a network client has. It is registered twice, the two ways a real
package can do it:

- at run time with ``register_transport("loopback", ...)``, then the whole `ConformanceSuite`
  runs against it (``TestLoopback``);
- through an installed distribution's ``cascade_bus.transports`` entry point: the test writes a
  ``*.dist-info`` with ``entry_points.txt`` into a temporary directory on ``sys.path``.

Nothing is installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Iterator, Mapping
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, ClassVar

import pytest

import cascade_bus
from cascade_bus import (
    ConnectError,
    InvalidURL,
    PublishError,
    available_transports,
    register_transport,
    unregister_transport,
)
from cascade_bus import _registry as registry
from cascade_bus.spi import (
    BusURL,
    Capabilities,
    Message,
    MessageSink,
    Transport,
    TransportSubscription,
    parse_int,
    topic_matches,
)
from cascade_bus.testing import ConformanceSuite

# -- the third-party transport -----------------------------------------------------------------


class _LoopbackBroker:
    """One named in-process broker: subscriptions, retained bodies, queue-group cursors."""

    brokers: ClassVar[dict[str, _LoopbackBroker]] = {}

    def __init__(self) -> None:
        self.subs: list[_LoopbackSubscription] = []
        self.retained: dict[str, tuple[bytes, dict[str, str] | None]] = {}
        self.cursors: dict[tuple[str, str], Iterator[int]] = {}

    @classmethod
    def named(cls, name: str) -> _LoopbackBroker:
        return cls.brokers.setdefault(name, cls())

    def attach(self, sub: _LoopbackSubscription) -> None:
        """Queue the matching retained messages for a new subscription, then make it live.

        Both happen without yielding, so no live message can slip in between or before them.
        """
        if sub.queue is None:
            for name, (data, headers) in self.retained.items():
                if topic_matches(sub.pattern, name):
                    sub.inbox.put_nowait(Message(name, data, _copy(headers), retained=True))
        self.subs.append(sub)

    def detach(self, sub: _LoopbackSubscription) -> None:
        with contextlib.suppress(ValueError):
            self.subs.remove(sub)

    def publish(
        self, topic: str, data: bytes, qos: int, retain: bool, headers: dict[str, str] | None
    ) -> None:
        if retain:
            if data:
                self.retained[topic] = (data, headers)
            else:
                self.retained.pop(topic, None)
        groups: dict[tuple[str, str], list[_LoopbackSubscription]] = {}
        for sub in self.subs:
            if not topic_matches(sub.pattern, topic):
                continue
            if sub.queue is None:
                sub.inbox.put_nowait(Message(topic, data, _copy(headers), qos=min(qos, sub.qos)))
            else:
                groups.setdefault((sub.queue, sub.pattern), []).append(sub)
        for key, members in groups.items():  # round robin within each queue group
            cursor = self.cursors.setdefault(key, itertools.count())
            chosen = members[next(cursor) % len(members)]
            chosen.inbox.put_nowait(Message(topic, data, _copy(headers), qos=min(qos, chosen.qos)))


def _copy(headers: Mapping[str, str] | None) -> dict[str, str] | None:
    return dict(headers) if headers else None


class _LoopbackSubscription(TransportSubscription):
    """A subscription with its own receive loop that honours the sink's flow control."""

    _CAUGHT_UP: ClassVar[object] = object()

    def __init__(
        self,
        transport: LoopbackTransport,
        pattern: str,
        sink: MessageSink,
        qos: int,
        queue: str | None,
    ) -> None:
        self.transport = transport
        self.pattern = pattern
        self.sink = sink
        self.qos = qos
        self.queue = queue
        self.inbox: asyncio.Queue[Message | object | None] = asyncio.Queue()
        self.caught_up = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Go live; return once the retained messages were handed to the sink."""
        self.transport.broker.attach(self)
        self.inbox.put_nowait(self._CAUGHT_UP)
        self.task = asyncio.get_running_loop().create_task(self._receive())
        await self.caught_up.wait()

    async def _receive(self) -> None:
        while True:
            item = await self.inbox.get()
            if item is None:
                return
            if item is self._CAUGHT_UP:
                self.caught_up.set()
                continue
            assert isinstance(item, Message)
            if not self.sink.deliver(item):
                await self.sink.ready()  # flow control: wait until the sink has room

    async def unsubscribe(self) -> None:
        self.transport.broker.detach(self)
        with contextlib.suppress(ValueError):
            self.transport.subs.remove(self)
        task, self.task = self.task, None
        if task is not None and not task.done():
            self.inbox.put_nowait(None)
            # Stop at once: what is still queued is not ours to deliver any more.
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


class LoopbackTransport(Transport):
    """``loopback://[name]``: a third-party transport over an in-process broker.

    Options:
        max_payload: Largest body in bytes (default 64 KiB).
    """

    capabilities = Capabilities(
        max_qos=1,
        retain=True,
        wildcards=True,
        headers=True,
        queue_groups=True,
        request_reply=True,
        ordering=True,
        max_payload=64 * 1024,
    )
    package: ClassVar[str] = "cascade-bus-loopback (test)"

    def __init__(self, url: BusURL, options: Mapping[str, Any]) -> None:
        super().__init__(url, options)
        unknown = set(self.options) - {"max_payload"}
        if unknown:
            raise InvalidURL(f"loopback:// does not know option(s) {sorted(unknown)}")
        self._max_payload = parse_int("max_payload", self.options.get("max_payload", 64 * 1024))
        self.broker = _LoopbackBroker.named(url.host or "default")
        self.subs: list[_LoopbackSubscription] = []
        self.connected = False

    @property
    def max_payload(self) -> int | None:
        return self._max_payload

    async def connect(self) -> None:
        if self.url.host == "unreachable":
            raise ConnectError("loopback://unreachable refuses connections")
        self.connected = True

    async def aclose(self) -> None:
        self.connected = False
        for sub in list(self.subs):
            await sub.unsubscribe()

    def send(
        self,
        topic: str,
        data: bytes,
        qos: int,
        retain: bool,
        headers: Mapping[str, str] | None,
        reply_to: str | None = None,
    ) -> None:
        if not self.connected:
            raise PublishError("loopback transport is not connected", topic=topic)
        self.broker.publish(topic, data, qos, retain, _copy(headers))

    async def subscribe(
        self,
        pattern: str,
        sink: MessageSink,
        *,
        qos: int = 0,
        queue: str | None = None,
    ) -> TransportSubscription:
        sub = _LoopbackSubscription(self, pattern, sink, qos, queue)
        self.subs.append(sub)
        await sub.start()
        return sub


# -- (a) registered at run time, running the whole conformance suite ----------------------------


@pytest.fixture(scope="module", autouse=True)
def loopback_registered() -> Iterator[None]:
    register_transport("loopback", LoopbackTransport)
    try:
        yield
    finally:
        unregister_transport("loopback")


class TestLoopback(ConformanceSuite):
    """The full suite on the third-party transport (a URL that already has a query)."""

    url = "loopback://conformance?max_payload=65536"


@pytest.mark.asyncio
async def test_flow_control_waits_for_a_slow_handler() -> None:
    """With a tiny buffer the receive loop must wait on the sink instead of dropping."""
    handled: list[int] = []
    done = asyncio.Event()
    gate = asyncio.Event()

    async def slow(env: cascade_bus.Envelope[Any]) -> None:
        await gate.wait()
        handled.append(env.payload)
        if len(handled) == 200:
            done.set()

    async with cascade_bus.connect("loopback://flow", buffer_size=4) as bus:
        await bus.subscribe("flow/x", slow)
        for i in range(200):
            await bus.publish("flow/x", i)
        gate.set()
        async with asyncio.timeout(5):
            await done.wait()
        assert handled == list(range(200))
        assert bus.stats().dropped == {}


@pytest.mark.asyncio
async def test_connect_error_is_typed() -> None:
    with pytest.raises(ConnectError):
        async with cascade_bus.connect("loopback://unreachable"):
            pass


# -- (b) discovered through an installed distribution's entry point -----------------------------


def test_core_registers_memory_through_the_entry_point() -> None:
    found = {ep.name: ep.value for ep in entry_points(group=registry.ENTRY_POINT_GROUP)}
    assert found.get("memory") == "cascade_bus._memory:MemoryTransport"


def _write_distribution(root: Path, scheme: str, target: str) -> None:
    dist_info = root / "cascade_bus_loopback2-0.1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: cascade-bus-loopback2\nVersion: 0.1.0\n"
        "Summary: A third-party cascade-bus transport (test fixture)\n",
        encoding="utf-8",
    )
    (dist_info / "entry_points.txt").write_text(
        f"[cascade_bus.transports]\n{scheme} = {target}\n", encoding="utf-8"
    )


@pytest.mark.asyncio
async def test_transport_found_through_an_entry_point(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert "loopback2" not in available_transports()
    target = f"{LoopbackTransport.__module__}:{LoopbackTransport.__qualname__}"
    _write_distribution(tmp_path, "loopback2", target)
    try:
        with monkeypatch.context() as patch:
            patch.syspath_prepend(str(tmp_path))
            registry.refresh()
            declared = {ep.name: ep.value for ep in entry_points(group="cascade_bus.transports")}
            assert declared.get("loopback2") == target
            assert available_transports().get("loopback2") == target
            assert cascade_bus.get_transport("loopback2") is LoopbackTransport

            async with cascade_bus.connect("loopback2://") as bus:
                assert isinstance(bus.transport, LoopbackTransport)
                await bus.publish("ep/retained", {"kept": True}, retain=True)
                async with bus.subscribe("ep/#") as sub:
                    assert sub.pending == 1  # the retained message, before subscribe returned
                    await bus.publish("ep/live", [1, 2, 3], headers={"h": "v"})
                    first = await sub.get(timeout=5)
                    second = await sub.get(timeout=5)
                assert (first.topic, first.payload) == ("ep/retained", {"kept": True})
                assert (second.topic, second.payload) == ("ep/live", [1, 2, 3])
                assert second.headers == {"h": "v"}
                await bus.publish("ep/retained", b"", retain=True)
    finally:
        registry.refresh()
        unregister_transport("loopback2")  # get_transport caches what it imported
    assert "loopback2" not in available_transports()
    with pytest.raises(cascade_bus.UnknownScheme):
        cascade_bus.connect("loopback2://")
