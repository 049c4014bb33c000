"""Scheme names: the documented ``mqtt+ws``, ``mqtt+wss``, ``nats+tls`` beside their older aliases,
and what an unknown scheme says (install the adapter, not supported yet, or a near spelling).
"""

from __future__ import annotations

from importlib.metadata import EntryPoint

import pytest

import cascade_bus
from cascade_bus import BusURL, UnknownScheme, _registry
from cascade_bus._install import install_command


@pytest.fixture
def only_memory_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the registry see exactly the core's entry point, whatever adapters are installed."""
    memory = EntryPoint(
        name="memory",
        value="cascade_bus._memory:MemoryTransport",
        group=_registry.ENTRY_POINT_GROUP,
    )
    monkeypatch.setattr(_registry, "_entry_points", {"memory": memory})
    monkeypatch.setattr(_registry, "_registered", {})


@pytest.mark.parametrize(
    ("scheme", "alias", "package"),
    [
        ("mqtt+ws", "ws", "cascade-bus-mqtt"),
        ("mqtt+wss", "wss", "cascade-bus-mqtt"),
        ("nats+tls", "tls", "cascade-bus-nats"),
    ],
)
def test_documented_names_and_their_aliases_use_the_same_transport(
    scheme: str, alias: str, package: str
) -> None:
    assert _registry.KNOWN_PACKAGES[scheme] == _registry.KNOWN_PACKAGES[alias] == package
    installed = _registry.available_transports()
    if scheme not in installed or alias not in installed:
        pytest.skip(f"{package} is not installed with both names ({install_command(package)})")
    assert installed[scheme] == installed[alias]
    assert _registry.get_transport(scheme) is _registry.get_transport(alias)


@pytest.mark.usefixtures("only_memory_installed")
@pytest.mark.parametrize(
    ("scheme", "package"),
    [("amqp", "cascade-bus-amqp"), ("amqps", "cascade-bus-amqp"), ("nats+tls", "cascade-bus-nats")],
)
def test_a_first_party_scheme_without_its_adapter_says_install_the_adapter(
    scheme: str, package: str
) -> None:
    with pytest.raises(UnknownScheme) as info:
        cascade_bus.connect(f"{scheme}://h")
    message = str(info.value)
    assert f"install the adapter: {install_command(package)}" in message
    assert "did you mean" not in message  # amqp is not a typo of mqtt
    assert info.value.suggestion is None
    assert info.value.scheme == scheme
    assert "installed: memory" in message


@pytest.mark.usefixtures("only_memory_installed")
@pytest.mark.parametrize(
    ("scheme", "protocol"),
    [("kafka", "Apache Kafka"), ("stomp", "STOMP"), ("zmq", "ZeroMQ"), ("pulsar", "Apache Pulsar")],
)
def test_another_protocol_is_not_supported_yet(scheme: str, protocol: str) -> None:
    with pytest.raises(UnknownScheme) as info:
        cascade_bus.connect(f"{scheme}://h")
    message = str(info.value)
    assert f"{protocol} is not supported yet" in message
    assert "did you mean" not in message
    assert "install" not in message.split(" (installed:")[0]
    assert info.value.suggestion is None
    assert info.value.known == ("memory",)


@pytest.mark.usefixtures("only_memory_installed")
def test_a_typo_still_gets_the_near_spelling() -> None:
    with pytest.raises(UnknownScheme) as info:
        cascade_bus.connect("nats+tsl://h")
    assert info.value.suggestion == "nats+tls"
    assert "did you mean nats+tls?" in str(info.value)
    assert install_command("cascade-bus-nats") in str(info.value)


@pytest.mark.parametrize("scheme", ["nats", "nats+tls", "tls"])
def test_a_nats_token_in_the_user_name_is_masked_under_every_name(scheme: str) -> None:
    url = BusURL(f"{scheme}://s3cret-token@h:4222")
    assert "s3cret-token" not in str(url)
    assert "s3cret-token" not in repr(url)
