"""mqtt+ws:// and mqtt+wss:// (older names ws://, wss://): MQTT over websockets, on Mosquitto."""

from __future__ import annotations

import asyncio

import pytest

import cascade_bus
from cascade_bus.testing.brokers import free_port, wait_for_port

pytestmark = pytest.mark.mqtt


async def test_mqtt_over_websockets_round_trip_retained_and_request(
    private_mosquitto, unique_topic
):
    ws_port = free_port()
    private_mosquitto(extra_config=f"listener {ws_port} 127.0.0.1\nprotocol websockets\n")
    # The fixture waits for the main listener; the websockets one opens just after it.
    await asyncio.to_thread(wait_for_port, "127.0.0.1", ws_port, 5.0)
    url = f"mqtt+ws://127.0.0.1:{ws_port}"
    async with cascade_bus.connect(url) as bus, cascade_bus.connect(url) as other:
        assert type(bus.transport).__name__ == "MqttTransport"
        await other.publish(f"{unique_topic}/state", {"on": True}, retain=True, qos=1)
        got: list = []
        await bus.subscribe(f"{unique_topic}/#", lambda env: got.append(env.payload), qos=1)
        assert got == [{"on": True}]  # retained, before subscribe() returned
        async with other.subscribe(f"{unique_topic}/req") as requests:

            async def answer() -> None:
                env = await requests.get(timeout=5)
                await other.reply(env, {"pong": env.payload})

            responder = asyncio.create_task(answer())
            reply = await bus.request(f"{unique_topic}/req", 1, timeout=5)
            await responder
        assert reply.payload == {"pong": 1}
        await other.publish(f"{unique_topic}/state", b"", retain=True, qos=1)


@pytest.mark.parametrize(("ws", "wss"), [("mqtt+ws", "mqtt+wss"), ("ws", "wss")])
def test_websocket_options_and_default_ports(ws, wss):
    from cascade_bus_mqtt import MqttOptions

    from cascade_bus.spi import BusURL

    plain = MqttOptions.parse(BusURL(f"{ws}://h"), {"ws_path": "/mqtt-ws"})
    assert (plain.transport, plain.port, plain.ws_path, plain.tls) == (
        "websockets",
        80,
        "/mqtt-ws",
        None,
    )
    secure = MqttOptions.parse(BusURL(f"{wss}://h"), {})
    assert (secure.transport, secure.port) == ("websockets", 443)
    assert secure.tls is not None
    assert MqttOptions.parse(BusURL("mqtt://h"), {}).transport == "tcp"


@pytest.mark.parametrize("scheme", ["mqtt+ws", "mqtt+wss", "ws", "wss"])
def test_websocket_schemes_are_the_mqtt_transport(scheme):
    from cascade_bus_mqtt import MqttTransport

    assert type(cascade_bus.connect(f"{scheme}://h").transport) is MqttTransport
