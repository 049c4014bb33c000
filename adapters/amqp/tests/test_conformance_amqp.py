"""The core conformance suite, unchanged, against the shared RabbitMQ (this session's exchange).

Run twice: with the adapter's publish path into aiormq's frame queue (the default), and with
aiormq's public API only — what the adapter falls back to when an aiormq release changes the
internals the fast path relies on (see ``cascade_bus_amqp._wire``).
"""

from __future__ import annotations

from typing import ClassVar

import pytest

from cascade_bus import Bus
from cascade_bus.testing import ConformanceSuite

pytestmark = pytest.mark.amqp


class TestAmqp(ConformanceSuite):
    # RabbitMQ's default max_message_size is 128 MiB: allocate past it for the oversized case.
    max_oversized: ClassVar[int] = 129 * 1024 * 1024

    @pytest.fixture
    def transport_url(self, amqp_url: str) -> str:
        return amqp_url

    async def test_fast_path_is_in_use(self, bus: Bus) -> None:
        assert bus.transport._wire.fast  # type: ignore[attr-defined]


class TestAmqpPublicApi(ConformanceSuite):
    max_oversized: ClassVar[int] = 129 * 1024 * 1024

    @pytest.fixture(autouse=True)
    def _public_api_only(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr("cascade_bus_amqp._wire.supported", lambda channel: False)

    @pytest.fixture
    def transport_url(self, amqp_url: str) -> str:
        return amqp_url

    async def test_public_api_is_in_use(self, bus: Bus) -> None:
        assert not bus.transport._wire.fast  # type: ignore[attr-defined]
