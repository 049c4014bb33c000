"""The fault suite on memory://: the outage cases skip (no network), the rest must pass."""

from __future__ import annotations

import pytest

from cascade_bus import Bus
from cascade_bus.testing.faults import FaultSuite, Restartable


class TestMemoryFaults(FaultSuite):
    url = "memory://faults"

    async def send_internal_junk(self, bus: Bus, transport_url: str, topic: str) -> None:
        pytest.skip("memory:// uses no internal channels: there is nothing to inject junk into")

    @pytest.fixture
    def restartable_broker(self) -> Restartable:
        pytest.skip("memory:// has no broker process to restart (it lives in this process)")
