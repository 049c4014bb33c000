"""The shared fault suite (cascade_bus.testing.faults) on the shared nats-server."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import nats
import pytest
from cascade_bus_nats._mapper import subject_from_topic

from cascade_bus import Bus
from cascade_bus.testing.brokers import BrokerProcess
from cascade_bus.testing.faults import JUNK_ENVELOPE, FaultSuite, Restartable

pytestmark = [pytest.mark.nats, pytest.mark.fault]


class TestNatsFaults(FaultSuite):
    reconnect_options: ClassVar[dict[str, Any]] = {
        "reconnect_min": 0.02,
        "reconnect_max": 0.2,
        "connect_attempt_timeout": 1.0,
    }

    async def send_internal_junk(self, bus: Bus, transport_url: str, topic: str) -> None:
        """Junk in the retained bucket and on inbox subjects (QoS 1 subjects are user topics)."""
        subject = subject_from_topic(f"{topic}/junk")
        client = await nats.connect(transport_url)
        try:
            for body in (b"", b"\xff\x00junk", JUNK_ENVELOPE):
                await client.publish(f"$KV.cascade_retained.{subject}", body)
                await client.publish("_INBOX.junk", body)
            await client.flush()
        finally:
            await client.close()

    @pytest.fixture
    def restartable_broker(self, private_nats: Callable[..., BrokerProcess]) -> Restartable:
        return private_nats()

    def durable_options(self) -> dict[str, Any]:
        # Pushed but unacked messages come back after ack_wait once the server is back.
        return {**super().durable_options(), "ack_wait": 1.0}

    @pytest.fixture
    def transport_url(self, nats_url: str) -> str:
        return nats_url
