"""The core conformance suite, unchanged, against the shared nats-server (JetStream enabled).

Run twice: with the adapter's fast paths into nats-py (the default), and with nats-py's public
API only — what the adapter falls back to when a nats-py release changes the internals the
fast paths rely on (see ``cascade_bus_nats._fastpath``).
"""

from __future__ import annotations

import pytest

from cascade_bus.testing import ConformanceSuite

pytestmark = pytest.mark.nats


class TestNats(ConformanceSuite):
    @pytest.fixture
    def transport_url(self, nats_url: str) -> str:
        return nats_url


class TestNatsPublicApi(ConformanceSuite):
    @pytest.fixture(autouse=True)
    def _public_api_only(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr("cascade_bus_nats._transport.supported", lambda nc: False)

    @pytest.fixture
    def transport_url(self, nats_url: str) -> str:
        return nats_url

    async def test_public_api_is_in_use(self, bus) -> None:
        assert bus.transport._router is None
