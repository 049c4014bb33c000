"""The core conformance suite, unchanged, against a real Mosquitto over MQTT 5 and MQTT 3.1.1."""

from __future__ import annotations

import pytest

from cascade_bus.testing import ConformanceSuite, with_query

pytestmark = pytest.mark.mqtt


class TestMqtt5(ConformanceSuite):
    @pytest.fixture
    def transport_url(self, mqtt_url: str) -> str:
        return with_query(mqtt_url, version="5")


class TestMqtt311(ConformanceSuite):
    @pytest.fixture
    def transport_url(self, mqtt_url: str) -> str:
        return with_query(mqtt_url, version="3.1.1")
