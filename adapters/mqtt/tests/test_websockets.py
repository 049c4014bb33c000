"""ws:// and wss:// schemes: MQTT over websockets against a private Mosquitto listener."""

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
    url = f"ws://127.0.0.1:{ws_port}"
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


def test_websocket_options_and_default_ports():
    from cascade_bus_mqtt import MqttOptions

    from cascade_bus.spi import BusURL

    ws = MqttOptions.parse(BusURL("ws://h"), {"ws_path": "/mqtt-ws"})
    assert (ws.transport, ws.port, ws.ws_path, ws.tls) == ("websockets", 80, "/mqtt-ws", None)
    wss = MqttOptions.parse(BusURL("wss://h"), {})
    assert (wss.transport, wss.port) == ("websockets", 443)
    assert wss.tls is not None
    assert MqttOptions.parse(BusURL("mqtt://h"), {}).transport == "tcp"
