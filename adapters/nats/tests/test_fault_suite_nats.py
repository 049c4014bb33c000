"""The shared fault suite (cascade_bus.testing.faults) on the shared nats-server."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import pytest

from cascade_bus.testing.brokers import BrokerProcess
from cascade_bus.testing.faults import FaultSuite, Restartable

pytestmark = [pytest.mark.nats, pytest.mark.fault]


class TestNatsFaults(FaultSuite):
    reconnect_options: ClassVar[dict[str, Any]] = {
        "reconnect_min": 0.02,
        "reconnect_max": 0.2,
        "connect_attempt_timeout": 1.0,
    }

    @pytest.fixture
    def restartable_broker(self, private_nats: Callable[..., BrokerProcess]) -> Restartable:
        return private_nats()

    def durable_options(self) -> dict[str, Any]:
        # Pushed but unacked messages come back after ack_wait once the server is back.
        return {**super().durable_options(), "ack_wait": 1.0}

    @pytest.fixture
    def transport_url(self, nats_url: str) -> str:
        return nats_url
