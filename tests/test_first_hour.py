"""Issue 15, the library half: what a new user trips over in the first hour.

A forgotten ``await`` on subscribe, NaN in a payload, retained or live, URL parts that mean
nothing, install hints that work from a checkout, and connect hints that say what is there.
"""

from __future__ import annotations

import asyncio
import gc
import json
import math
import shlex
import socket
import ssl
import time
import uuid
from pathlib import Path
from typing import Any

import msgspec
import pytest

import cascade_bus
from cascade_bus import BusURL, EncodeError, Envelope, InvalidURL, _install
from cascade_bus._codec import Codec
from cascade_bus._finite import find_non_finite
from cascade_bus.cli._hints import connect_hint
from cascade_bus.testing.brokers import free_port

ADAPTERS = cascade_bus.available_transports()
NON_FINITE = [float("nan"), float("inf"), -float("inf")]


def memory_url(fmt: str = "json") -> str:
    return f"memory://first-hour-{uuid.uuid4().hex[:10]}?format={fmt}"


# -- 6: a forgotten await is loud ----------------------------------------------------------


async def test_subscribe_never_awaited_warns_naming_the_pattern() -> None:
    calls: list[Envelope[Any]] = []
    async with cascade_bus.connect(memory_url()) as bus:
        with pytest.warns(RuntimeWarning, match=r"bus\.subscribe\('jobs/#', \.\.\.\) was never"):
            bus.subscribe("jobs/#", calls.append)  # the bug: no await (freed at once)
        async with bus.subscribe("jobs/#") as witness:
            await bus.publish("jobs/1", {"n": 1})
            assert (await witness.get(timeout=5)).payload == {"n": 1}
    assert calls == []  # the forgotten subscription never existed


async def test_awaited_or_entered_subscribe_does_not_warn() -> None:
    async with cascade_bus.connect(memory_url()) as bus:
        sub = await bus.subscribe("a/#", lambda env: None)
        await sub.unsubscribe()
        async with bus.subscribe("b/#") as iterated:
            await bus.publish("b/1", {"n": 1})
            assert (await iterated.get(timeout=5)).payload == {"n": 1}
        gc.collect()  # filterwarnings = error: a warning here would fail the test


# -- 7: NaN and infinity are an EncodeError on every format ---------------------------------


@pytest.mark.parametrize("fmt", ["json", "msgpack", "raw"])
@pytest.mark.parametrize("bad", NON_FINITE, ids=["nan", "inf", "-inf"])
async def test_non_finite_floats_are_refused(fmt: str, bad: float) -> None:
    async with cascade_bus.connect(memory_url(fmt)) as bus, bus.subscribe("m/#") as sub:
        for payload, where in [
            ({"reading": {"celsius": bad}}, "payload['reading']['celsius']"),
            ([1.0, bad], "payload[1]"),
            (bad, "payload"),
        ]:
            with pytest.raises(EncodeError, match="NaN or infinite") as info:
                await bus.publish("m/x", payload)
            assert where in str(info.value)
            assert "'m/x'" in str(info.value)
        # None, null-looking text and huge finite floats still go through, unchanged.
        fine = {"a": None, "b": "null", "c": 1.7e308, "d": -1.7e308}
        await bus.publish("m/x", fine)
        assert (await sub.get(timeout=5)).payload == fine


def test_every_encoder_refuses_non_finite() -> None:
    codec = Codec("json", "test")
    env = codec.envelope("t", {"x": math.nan})
    with pytest.raises(EncodeError):
        codec.encode_payload({"x": math.inf})
    with pytest.raises(EncodeError):
        codec.encode_plain("t", [math.nan])
    for fmt in ("json", "msgpack"):
        with pytest.raises(EncodeError):
            codec.encode_envelope(env, fmt)
    with pytest.raises(EncodeError):
        Codec("msgpack", "test").local(env)


def test_the_walk_finds_floats_inside_structs() -> None:
    class Reading(msgspec.Struct):
        values: list[float]

    assert find_non_finite(Reading([1.0, math.nan])) == "payload['values'][1]"
    assert find_non_finite({"a": [1, 2.5, None, "nan"]}) is None


# -- 8: Envelope.retained: set on receipt, never on the wire --------------------------------


async def test_retained_replay_and_live_messages_are_told_apart() -> None:
    url = memory_url()
    async with cascade_bus.connect(url) as bus:
        await bus.publish("r/kept", {"v": 1}, retain=True)
        got: list[Envelope[Any]] = []
        done = asyncio.Event()

        def handler(env: Envelope[Any]) -> None:
            got.append(env)
            if len(got) == 2:
                done.set()

        sub = await bus.subscribe("r/#", handler)  # the retained one is handled on return
        await bus.publish("r/live", {"v": 2})
        async with asyncio.timeout(5):
            await done.wait()
        assert [(e.topic, e.retained) for e in got] == [("r/kept", True), ("r/live", False)]
        async with bus.subscribe("r/#") as it:  # iterator mode, same rule
            first = await it.get(timeout=5)
            assert (first.topic, first.retained) == ("r/kept", True)
        await sub.unsubscribe()
        await bus.publish("r/kept", b"", retain=True)


def test_retained_is_not_encoded_and_a_body_cannot_claim_it() -> None:
    codec = Codec("json", "test")
    env = msgspec.structs.replace(codec.envelope("t", {"a": 1}), retained=True)
    body = codec.encode_envelope(env)
    assert b"retained" not in body
    assert b"retained" not in codec.encode_envelope(env, "msgpack")
    assert "retained" not in env.to_cloudevent()
    assert codec.envelope("t", 1).retained is False


async def test_a_foreign_body_saying_retained_is_still_live() -> None:
    async with cascade_bus.connect(memory_url()) as bus, bus.subscribe("f/#") as sub:
        liar = json.dumps(
            {"specversion": "1.0", "id": "x", "source": "s", "type": "t", "retained": True}
        )
        await bus.publish("f/1", liar.encode())
        env = await sub.get(timeout=5)
        assert env.retained is False  # how it arrived decides, never what the body says


# -- 9: URL parts that mean nothing are refused ---------------------------------------------


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("memory://a#frag", "#fragment"),
        ("mqtt://h:1883?client_id=a#b", "%23"),
        ("memory://a/b", "memory:// takes one name"),
        ("memory://a:5", "memory:// takes one name"),
    ],
)
def test_meaningless_url_parts_are_refused(url: str, needle: str) -> None:
    with pytest.raises(InvalidURL, match=needle):
        cascade_bus.connect(url)


def test_fragment_error_does_not_echo_the_fragment() -> None:
    with pytest.raises(InvalidURL) as info:
        BusURL("nats://h?token=abc#defsecret")
    assert "defsecret" not in str(info.value)


@pytest.mark.skipif("mqtt" not in ADAPTERS, reason="cascade-bus-mqtt is not installed")
@pytest.mark.parametrize(
    ("url", "needle"),
    [("mqtt://", "needs the broker's host"), ("mqtt://h/db", "no path"), ("mqtts://h/x", "path")],
)
def test_mqtt_url_needs_a_host_and_no_path(url: str, needle: str) -> None:
    with pytest.raises(InvalidURL, match=needle):
        cascade_bus.connect(url)


@pytest.mark.skipif("nats" not in ADAPTERS, reason="cascade-bus-nats is not installed")
def test_nats_url_has_no_path() -> None:
    with pytest.raises(InvalidURL, match="no path"):
        cascade_bus.connect("nats://127.0.0.1:4222/vhost")


def test_meaningful_url_parts_still_work() -> None:
    cascade_bus.connect("memory://name")
    cascade_bus.connect("memory:///name")
    if "redis" in ADAPTERS:
        cascade_bus.connect("redis://127.0.0.1:6379/2")
    if "ws" in ADAPTERS:
        from cascade_bus_mqtt._options import MqttOptions

        options = MqttOptions.parse(BusURL("ws://127.0.0.1:9001/broker-ws"), {})
        assert options.ws_path == "/broker-ws"  # the path of a ws:// URL is the endpoint's


# -- 9 and 3: hints that say what works here ------------------------------------------------


def test_install_command_from_this_checkout() -> None:
    root = _install.checkout_root()
    if root is None:
        pytest.skip("cascade-bus is not installed from a checkout (no editable direct_url.json)")
    command = _install.install_command("cascade-bus-redis[cluster]")
    target = shlex.quote(_shown(root / "adapters/redis") + "[cluster]")
    assert command.endswith(f"install -e {target}")
    assert _install.install_command("cascade-bus-mqtt").endswith(
        f"install -e {_shown(root / 'adapters/mqtt')}"
    )
    assert _install.install_command("something-else").endswith("install something-else")
    pip = command.split(" install ")[0]
    assert pip == "pip" or pip.endswith("-m pip"), pip


def _shown(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def test_unknown_known_scheme_names_the_working_command(monkeypatch: pytest.MonkeyPatch) -> None:
    from cascade_bus import _registry

    monkeypatch.setattr(_registry, "_entry_points", {})
    monkeypatch.setattr(_registry, "_registered", {})
    with pytest.raises(cascade_bus.UnknownScheme) as info:
        cascade_bus.connect("mqtt://127.0.0.1:1883")
    assert _install.install_command("cascade-bus-mqtt") in str(info.value)


def test_hint_for_a_name_that_does_not_resolve() -> None:
    url = BusURL("nats://no-such-host.invalid:4222")
    hint = connect_hint(url, "nats: no servers available for connection")
    assert hint == "check the host name 'no-such-host.invalid': it does not resolve"


def test_hint_when_another_protocol_listens_there() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        hint = connect_hint(BusURL(f"redis://127.0.0.1:{port}"), "connection reset by peer")
    assert "start one" not in hint
    assert f"something listens at 127.0.0.1:{port} but did not answer as a Redis server" in hint
    # On a well-known port of another protocol, it names that protocol.
    hint = connect_hint(BusURL("redis://127.0.0.1:1883"), "connection reset by peer")
    if "is not a Redis server" in hint:  # something listens on 1883 here (the shared broker)
        assert "an MQTT broker (mqtt://)" in hint


def test_hint_when_nothing_listens_suggests_starting_one() -> None:
    port = free_port()
    hint = connect_hint(BusURL(f"mqtt://127.0.0.1:{port}"), "[Errno 111] Connection refused")
    assert f"start one with `mosquitto -p {port}`" in hint


def test_hint_for_tls_against_a_plain_server() -> None:
    hint = connect_hint(
        BusURL("rediss://127.0.0.1:6379"),
        "SSL handshake is taking longer than 3.0 seconds: aborting the connection",
    )
    assert "use redis:// instead of rediss://" in hint


# -- 9: a TLS handshake with a plain Redis fails in seconds ---------------------------------


@pytest.mark.redis
@pytest.mark.skipif("redis" not in ADAPTERS, reason="cascade-bus-redis is not installed")
async def test_tls_handshake_with_a_plain_redis_fails_fast(redis_url: str) -> None:
    from cascade_bus_redis._resp import TLS_HANDSHAKE_TIMEOUT, RespConnection

    plain = BusURL(redis_url)
    context = ssl.create_default_context()
    start = time.monotonic()
    with pytest.raises(OSError, match="handshake"):
        async with asyncio.timeout(TLS_HANDSHAKE_TIMEOUT + 5):
            await RespConnection("tls-probe").open(
                plain.host or "127.0.0.1", plain.port or 6379, tls=context
            )
    took = time.monotonic() - start
    assert took < TLS_HANDSHAKE_TIMEOUT + 2, took  # was the whole 10 s connect timeout
