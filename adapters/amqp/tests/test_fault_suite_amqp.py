"""The shared fault suite (cascade_bus.testing.faults) on the shared RabbitMQ (TCP proxy)."""

from __future__ import annotations

import aio_pika
import pytest

from cascade_bus import Bus
from cascade_bus.testing.faults import JUNK_ENVELOPE, FaultSuite, Restartable

pytestmark = [pytest.mark.amqp, pytest.mark.fault]


class TestAmqpFaults(FaultSuite):
    async def send_internal_junk(self, bus: Bus, transport_url: str, topic: str) -> None:
        """Junk in the retained log (no topic, a foreign barrier, a bad header) and its head."""
        exchange = transport_url.rpartition("exchange=")[2].partition("&")[0]
        connection = await aio_pika.connect(transport_url.partition("?")[0])
        async with connection:
            channel = await connection.channel()
            log = f"{exchange}.retained"
            junk = [
                aio_pika.Message(b"\xff\x00junk"),
                aio_pika.Message(JUNK_ENVELOPE, headers={"x-cascade-topic": 7}),
                aio_pika.Message(b"", headers={"x-cascade-barrier": "not-ours"}),
                aio_pika.Message(b"x" * 300, headers={"x-cascade-retain": 1}),
            ]
            for message in junk:
                await channel.default_exchange.publish(message, routing_key=log)
            # A snapshot that is not one: the next replay reads the whole log instead.
            await channel.default_exchange.publish(
                aio_pika.Message(b"\xff\x00junk"), routing_key=f"{log}.head"
            )

    @pytest.fixture
    def restartable_broker(self) -> Restartable:
        pytest.skip(
            "no private RabbitMQ node: starting one (Erlang VM, node name, cookie, data "
            "directory) takes ~10 s and a free distribution port; the shared one is never "
            "restarted"
        )

    @pytest.fixture
    def transport_url(self, amqp_url: str) -> str:
        return amqp_url


class TestAmqpFaultsPublicApi(TestAmqpFaults):
    """The same cases on aiormq's public API (the fallback when its internals differ)."""

    @pytest.fixture(autouse=True)
    def _public_api_only(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr("cascade_bus_amqp._wire.supported", lambda channel: False)
