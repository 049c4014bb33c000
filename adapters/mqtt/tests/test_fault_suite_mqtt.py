"""The shared fault suite (cascade_bus.testing.faults) on the shared Mosquitto, MQTT 5 and 3.1.1."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import aiomqtt
import pytest
from cascade_bus_mqtt import RESERVED_PREFIX, MqttTransport

from cascade_bus import Bus
from cascade_bus.testing.brokers import BrokerProcess, host_port
from cascade_bus.testing.conformance import with_query
from cascade_bus.testing.faults import JUNK_ENVELOPE, FaultSuite, Restartable

pytestmark = [pytest.mark.mqtt, pytest.mark.fault]


class _MqttFaults(FaultSuite):
    @pytest.fixture
    def restartable_broker(self, private_mosquitto: Callable[..., BrokerProcess]) -> Restartable:
        return private_mosquitto(persistence=True)

    def durable_options(self) -> dict[str, Any]:
        return {**super().durable_options(), "clean_start": False}

    async def send_internal_junk(self, bus: Bus, transport_url: str, topic: str) -> None:
        """Junk on the adapter's reserved topics: this bus's barrier topic and its tree."""
        transport = bus.transport
        assert isinstance(transport, MqttTransport)
        host, port = host_port(transport_url, 1883)
        topics = [transport._barrier_topic, f"{RESERVED_PREFIX}barrier/x", f"{RESERVED_PREFIX}x"]
        async with aiomqtt.Client(host, port) as plain:
            for topic in topics:
                for body in (b"", b"\xff\x00junk", JUNK_ENVELOPE):
                    await plain.publish(topic, body, qos=1)


class TestMqtt5Faults(_MqttFaults):
    @pytest.fixture
    def transport_url(self, mqtt_url: str) -> str:
        return with_query(mqtt_url, version="5")


class TestMqtt311Faults(_MqttFaults):
    """MQTT 3.1.1 has no user properties: a live retained publish looks like any other."""

    live_retain_known = False

    @pytest.fixture
    def transport_url(self, mqtt_url: str) -> str:
        return with_query(mqtt_url, version="3.1.1")
