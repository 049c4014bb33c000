"""Interop with plain MQTT clients on the shared broker: mosquitto_pub/mosquitto_sub, bare aiomqtt.

The wire contract (DESIGN.md, "Wire format and interop"): a bare JSON body from a foreign client
arrives as an envelope whose payload is that value; a `Connector` (``format=raw``) publishes the
bare JSON dict, which plain clients read back exactly; an empty retained body clears.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from typing import Any

import aiomqtt
import pytest

import cascade_bus
from cascade_bus import Connector
from cascade_bus.testing.brokers import host_port

pytestmark = pytest.mark.mqtt

VERSIONS = ["5", "3.1.1"]
CLI_VERSION = {"5": "mqttv5", "3.1.1": "mqttv311"}
DICT = {"a": 1, "nested": {"b": [1, 2.5, "x", None, True]}, "text": "grüße ✓"}


@pytest.fixture
def broker(mqtt_url) -> tuple[str, int]:
    return host_port(mqtt_url, 1883)


class MosquittoSub:
    """``mosquitto_sub -C 1`` run in the background, ready once its SUBACK came back."""

    def __init__(self, sub: str, host: str, port: int, topic: str, version: str) -> None:
        # Its stdout is block-buffered into a pipe: without stdbuf the "Subscribed" line would
        # only show up when it exits.
        stdbuf = shutil.which("stdbuf")
        if stdbuf is None:
            pytest.skip("stdbuf (coreutils) not found: cannot tell when mosquitto_sub is ready")
        self.argv = [
            stdbuf, "-oL", sub, "-h", host, "-p", str(port), "-t", topic,
            "-V", CLI_VERSION[version], "-q", "1", "-C", "1", "-W", "10", "-d",
            "-F", "PAYLOAD:%p",
        ]  # fmt: skip
        self.proc: asyncio.subprocess.Process | None = None
        self.lines: list[str] = []

    async def __aenter__(self) -> MosquittoSub:
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        assert self.proc.stdout is not None
        async with asyncio.timeout(10):
            while True:  # -d prints "Subscribed (mid: 1): <qos>" once the SUBACK arrived
                line = (await self.proc.stdout.readline()).decode()
                assert line, f"mosquitto_sub exited before subscribing: {self.lines}"
                self.lines.append(line)
                if line.startswith("Subscribed"):
                    return self

    async def payload(self) -> bytes:
        """Wait (bounded) for the one message and mosquitto_sub's exit; return the body."""
        assert self.proc is not None
        async with asyncio.timeout(10):
            rest, _ = await self.proc.communicate()
        output = "".join(self.lines) + rest.decode()
        assert self.proc.returncode == 0, output
        payloads = [line for line in output.splitlines() if line.startswith("PAYLOAD:")]
        assert len(payloads) == 1, output
        return payloads[0].removeprefix("PAYLOAD:").encode()

    async def __aexit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


@pytest.mark.parametrize("cli_version", VERSIONS, ids=lambda v: f"cli-{v}")
@pytest.mark.parametrize("version", VERSIONS, ids=lambda v: f"bus-{v}")
async def test_mosquitto_pub_reaches_a_bus_subscriber(
    mqtt_url, broker, mosquitto_clients, unique_topic, kit, version, cli_version
):
    pub, _ = mosquitto_clients
    host, port = broker
    topic = f"{unique_topic}/from-cli"
    async with cascade_bus.connect(mqtt_url, version=version) as bus:
        got = kit.Inbox()
        await bus.subscribe(topic, got)
        await kit.run_cli(
            pub, "-h", host, "-p", str(port), "-V", CLI_VERSION[cli_version],
            "-t", topic, "-m", '{"a":1}',
        )  # fmt: skip
        assert await got.wait_for(1) == [{"a": 1}]
        env = got.envelopes[0]
        assert env.topic == topic
        assert bus.stats().dropped == {}


@pytest.mark.parametrize("version", VERSIONS)
async def test_mosquitto_pub_retained_arrives_before_subscribe_returns(
    mqtt_url, broker, mosquitto_clients, unique_topic, kit, version
):
    pub, _ = mosquitto_clients
    host, port = broker
    topic = f"{unique_topic}/retained"
    await kit.run_cli(pub, "-h", host, "-p", str(port), "-t", topic, "-r", "-m", '{"r":true}')
    try:
        async with cascade_bus.connect(mqtt_url, version=version) as bus:
            got = kit.Inbox()
            await bus.subscribe(topic, got)
            assert got.payloads == [{"r": True}]  # no wait: handed over before subscribe returned
    finally:
        await kit.run_cli(pub, "-h", host, "-p", str(port), "-t", topic, "-r", "-n")


@pytest.mark.parametrize("version", VERSIONS)
async def test_connector_publish_is_read_by_mosquitto_sub(
    mqtt_url, broker, mosquitto_clients, unique_topic, version
):
    _, sub = mosquitto_clients
    host, port = broker
    topic = f"{unique_topic}/to-cli"
    connector = Connector(f"{mqtt_url}?version={version}", presence=False)
    await connector.connect()
    try:
        async with MosquittoSub(sub, host, port, topic, version) as cli:
            await connector.publish(topic, DICT, qos=1)
            body = await cli.payload()
    finally:
        await connector.disconnect()
    assert json.loads(body) == DICT  # exactly the dict: no envelope around it
    assert connector.publish_failures == 0


@pytest.mark.parametrize("version", VERSIONS)
async def test_connector_publish_is_read_by_bare_aiomqtt(mqtt_url, broker, unique_topic, version):
    host, port = broker
    topic = f"{unique_topic}/to-aiomqtt"
    v5 = version == "5"
    protocol = aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311
    connector = Connector(mqtt_url, version=version, presence=False)
    await connector.connect()
    try:
        async with asyncio.timeout(10), aiomqtt.Client(host, port, protocol=protocol) as bare:
            await bare.subscribe(topic, qos=1)
            await connector.publish(topic, DICT, qos=1)
            message = await anext(aiter(bare.messages))
    finally:
        await connector.disconnect()
    assert isinstance(message.payload, bytes)
    assert json.loads(message.payload) == DICT
    assert message.retain is False


@pytest.mark.parametrize("version", VERSIONS)
async def test_empty_retained_from_mosquitto_pub_clears(
    mqtt_url, broker, mosquitto_clients, unique_topic, kit, version
):
    """``mosquitto_pub -r -n`` clears what the bus retained; a live Connector gets ``{}``."""
    pub, _ = mosquitto_clients
    host, port = broker
    topic = f"{unique_topic}/state"
    received: list[tuple[str, dict[str, Any]]] = []
    changed = asyncio.Event()

    async def callback(t: str, payload: dict[str, Any]) -> None:
        received.append((t, payload))
        changed.set()

    async def wait_for(count: int) -> None:
        async with asyncio.timeout(10):
            while len(received) < count:
                changed.clear()
                await changed.wait()

    live = Connector(mqtt_url, version=version, presence=False)
    await live.connect()
    try:
        await live.subscribe(topic, callback)
        async with cascade_bus.connect(mqtt_url, version=version) as bus:
            await bus.publish(topic, {"on": True}, qos=1, retain=True)
            await wait_for(1)
        async with cascade_bus.connect(mqtt_url, version=version) as newcomer:
            late = kit.Inbox()
            await newcomer.subscribe(topic, late)
            assert late.payloads == [{"on": True}]  # it is retained

        await kit.run_cli(pub, "-h", host, "-p", str(port), "-t", topic, "-r", "-n")
        await wait_for(2)
        assert received == [(topic, {"on": True}), (topic, {})]

        async with cascade_bus.connect(mqtt_url, version=version) as newcomer:
            later = kit.Inbox()
            await newcomer.subscribe(topic, later)
            assert later.payloads == []  # cleared: nothing retained any more
    finally:
        await live.disconnect()
