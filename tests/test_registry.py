"""Scheme registry: entry-point discovery, helpful unknown-scheme errors, run-time registration."""

from __future__ import annotations

import inspect
import uuid
from collections.abc import Mapping
from importlib.metadata import EntryPoint
from typing import Any

import pytest

import cascade_bus
from cascade_bus import (
    BusError,
    InvalidURL,
    Message,
    MessageSink,
    Transport,
    TransportSubscription,
    UnknownScheme,
    _registry,
    available_transports,
    get_transport,
    register_transport,
    unregister_transport,
)
from cascade_bus._install import install_command
from cascade_bus._memory import MemoryTransport


@pytest.fixture(autouse=True)
def only_memory_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the registry see exactly the core's entry point, whatever adapters are installed."""
    monkeypatch.setattr(
        _registry,
        "_entry_points",
        {
            "memory": EntryPoint(
                name="memory",
                value="cascade_bus._memory:MemoryTransport",
                group=_registry.ENTRY_POINT_GROUP,
            )
        },
    )
    monkeypatch.setattr(_registry, "_registered", {})


class _Handle(TransportSubscription):
    async def unsubscribe(self) -> None:
        return None


class FakeTransport(Transport):
    """The smallest complete transport: records what the bus asks of it."""

    def __init__(self, url: cascade_bus.BusURL, options: Mapping[str, Any]) -> None:
        super().__init__(url, options)
        self.published: list[tuple[str, bytes]] = []
        self.sinks: list[MessageSink] = []

    async def connect(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    def send(
        self,
        topic: str,
        data: bytes,
        qos: int,
        retain: bool,
        headers: Mapping[str, str] | None,
        reply_to: str | None = None,
    ) -> None:
        self.published.append((topic, data))
        for sink in self.sinks:
            sink.deliver(Message(topic, data, headers))

    async def subscribe(
        self, pattern: str, sink: MessageSink, *, qos: int = 0, queue: str | None = None
    ) -> TransportSubscription:
        self.sinks.append(sink)
        return _Handle()


def scheme() -> str:
    return "fake" + uuid.uuid4().hex[:8]


# -- unknown schemes ---------------------------------------------------------------------------


def test_typo_suggests_the_scheme_and_the_package() -> None:
    with pytest.raises(UnknownScheme) as info:
        cascade_bus.connect("mqqt://h")
    message = str(info.value)
    assert "did you mean mqtt" in message
    assert install_command("cascade-bus-mqtt") in message  # from a checkout: -e adapters/mqtt
    assert info.value.suggestion == "mqtt"
    assert info.value.scheme == "mqqt"
    assert "memory" in info.value.known


@pytest.mark.parametrize(
    ("url", "suggestion", "package"),
    [
        ("nast://h", "nats", "cascade-bus-nats"),
        ("reddis://h", "redis", "cascade-bus-redis"),
        ("memroy://", "memory", None),  # installed: no pip hint needed
    ],
)
def test_other_typos(url: str, suggestion: str, package: str | None) -> None:
    with pytest.raises(UnknownScheme) as info:
        cascade_bus.connect(url)
    assert info.value.suggestion == suggestion
    assert f"did you mean {suggestion}" in str(info.value)
    if package is not None:
        assert install_command(package) in str(info.value)
    else:
        assert " install " not in str(info.value)


def test_known_but_not_installed_scheme_names_the_package() -> None:
    with pytest.raises(UnknownScheme) as info:
        cascade_bus.connect("nats://localhost:4222")
    assert install_command("cascade-bus-nats") in str(info.value)
    assert info.value.scheme == "nats"


def test_unrelated_scheme_lists_installed_schemes() -> None:
    with pytest.raises(UnknownScheme) as info:
        cascade_bus.connect("kafka://h")
    assert info.value.suggestion is None
    assert info.value.scheme == "kafka"
    assert info.value.known == ("memory",)
    assert "installed: memory" in str(info.value)
    assert "did you mean" not in str(info.value)


def test_unknown_scheme_is_raised_by_connect_itself() -> None:
    # connect() is a plain function: the error comes at once, not when the bus is awaited.
    assert not inspect.iscoroutinefunction(cascade_bus.connect)
    with pytest.raises(UnknownScheme):
        cascade_bus.connect("kafka://h")


def test_unknown_scheme_error_types() -> None:
    with pytest.raises(UnknownScheme) as info:
        get_transport("kafka")
    assert isinstance(info.value, InvalidURL)
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, BusError)


def test_scheme_lookup_is_case_insensitive() -> None:
    assert get_transport("MEMORY") is MemoryTransport
    assert isinstance(cascade_bus.connect("Memory://x").transport, MemoryTransport)


def test_installed_transport_that_cannot_be_imported(monkeypatch: pytest.MonkeyPatch) -> None:
    broken = EntryPoint(
        name="broken", value="cascade_bus_no_such_module:X", group=_registry.ENTRY_POINT_GROUP
    )
    monkeypatch.setitem(_registry._discovered(), "broken", broken)
    with pytest.raises(UnknownScheme, match="cannot be imported") as info:
        get_transport("broken")
    assert isinstance(info.value.__cause__, ImportError)


def test_entry_points_are_read_lazily_and_refreshable() -> None:
    _registry.refresh()
    assert _registry._entry_points is None  # nothing read until the first lookup
    assert get_transport("memory") is MemoryTransport  # the real installed metadata
    assert _registry._entry_points is not None
    assert "memory" in available_transports()


# -- registration ------------------------------------------------------------------------------


def test_register_and_use_a_transport() -> None:
    name = scheme()
    register_transport(name, FakeTransport)
    assert get_transport(name) is FakeTransport
    assert available_transports()[name] == f"{__name__}:FakeTransport"
    bus = cascade_bus.connect(f"{name}://host:1?opt=1", extra=2)
    assert isinstance(bus.transport, FakeTransport)
    assert bus.transport.options == {"opt": "1", "extra": 2}


async def test_registered_transport_carries_messages() -> None:
    name = scheme()
    register_transport(name, FakeTransport)
    async with cascade_bus.connect(f"{name}://h") as bus:
        transport = bus.transport
        assert isinstance(transport, FakeTransport)
        async with bus.subscribe("a/b") as sub:
            await bus.publish("a/b", {"v": 1})
            env = await sub.get(timeout=2)
        assert env.payload == {"v": 1}
        assert [t for t, _ in transport.published] == ["a/b"]


async def test_a_transport_implementing_only_publish_still_works_and_is_deprecated() -> None:
    """The first SPI had a coroutine ``publish`` and no ``send``: such a transport is wrapped."""
    with pytest.warns(DeprecationWarning, match="implements publish\\(\\) but not send\\(\\)"):

        class OldTransport(Transport):
            def __init__(self, url: cascade_bus.BusURL, options: Mapping[str, Any]) -> None:
                super().__init__(url, options)
                self.sinks: list[MessageSink] = []

            async def connect(self) -> None:
                return None

            async def aclose(self) -> None:
                return None

            async def publish(
                self,
                topic: str,
                data: bytes,
                *,
                qos: int = 0,
                retain: bool = False,
                headers: Mapping[str, str] | None = None,
            ) -> None:
                for sink in self.sinks:
                    sink.deliver(Message(topic, data, headers))

            async def subscribe(
                self, pattern: str, sink: MessageSink, *, qos: int = 0, queue: str | None = None
            ) -> TransportSubscription:
                self.sinks.append(sink)
                return _Handle()

    name = scheme()
    register_transport(name, OldTransport)  # type: ignore[type-abstract]
    async with cascade_bus.connect(f"{name}://h") as bus:
        async with bus.subscribe("a/b") as sub:
            await bus.publish("a/b", {"v": 1})
            assert (await sub.get(timeout=2)).payload == {"v": 1}
        assert bus.stats().published == 1


def test_register_is_case_insensitive() -> None:
    name = scheme()
    register_transport(name.upper(), FakeTransport)
    assert get_transport(name) is FakeTransport


@pytest.mark.parametrize("bad", [object, int, "cascade_bus._memory:MemoryTransport", None])
def test_register_needs_a_transport_subclass(bad: Any) -> None:
    name = scheme()
    with pytest.raises(ValueError, match="Transport subclass"):
        register_transport(name, bad)
    with pytest.raises(UnknownScheme):
        get_transport(name)


def test_register_an_instance_is_refused() -> None:
    instance = FakeTransport(cascade_bus.BusURL("x://h"), {})
    with pytest.raises(ValueError, match="Transport subclass"):
        register_transport(scheme(), instance)  # type: ignore[arg-type]


def test_duplicate_scheme_needs_replace() -> None:
    name = scheme()
    register_transport(name, FakeTransport)

    class Other(FakeTransport):
        pass

    with pytest.raises(ValueError, match="already registered") as info:
        register_transport(name, Other)
    assert "replace=True" in str(info.value)
    assert get_transport(name) is FakeTransport
    register_transport(name, Other, replace=True)
    assert get_transport(name) is Other


def test_installed_scheme_needs_replace() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_transport("memory", FakeTransport)
    assert get_transport("memory") is MemoryTransport
    register_transport("memory", FakeTransport, replace=True)
    assert get_transport("memory") is FakeTransport
    assert isinstance(cascade_bus.connect("memory://x").transport, FakeTransport)


def test_unregister() -> None:
    name = scheme()
    register_transport(name, FakeTransport)
    unregister_transport(name)
    with pytest.raises(UnknownScheme):
        get_transport(name)
    assert name not in available_transports()
    unregister_transport(name)  # idempotent
    register_transport(name, FakeTransport)  # free again without replace
    assert get_transport(name) is FakeTransport


def test_unregister_a_replacement_restores_the_installed_transport() -> None:
    register_transport("memory", FakeTransport, replace=True)
    unregister_transport("memory")
    assert get_transport("memory") is MemoryTransport


# -- the Transport ABC ----------------------------------------------------------------------------


@pytest.mark.parametrize("missing", ["connect", "aclose", "send", "subscribe"])
def test_transport_missing_an_abstract_method_cannot_be_instantiated(missing: str) -> None:
    namespace = {
        name: getattr(FakeTransport, name)
        for name in ("connect", "aclose", "send", "subscribe")
        if name != missing
    }
    incomplete = type("Incomplete", (Transport,), namespace)
    with pytest.raises(TypeError, match=missing):
        incomplete(cascade_bus.BusURL("x://h"), {})


def test_transport_subscription_needs_unsubscribe() -> None:
    class NoUnsubscribe(TransportSubscription):
        pass

    with pytest.raises(TypeError, match="unsubscribe"):
        NoUnsubscribe()  # type: ignore[abstract]


def test_transport_defaults() -> None:
    transport = FakeTransport.from_url(cascade_bus.BusURL("x://h?a=1"), a=2, b=3)
    assert transport.options == {"a": 2, "b": 3}
    assert transport.capabilities == cascade_bus.Capabilities()
    assert transport.max_payload is None
    assert transport.stats.snapshot().published == 0
    assert FakeTransport.package == "cascade-bus"
