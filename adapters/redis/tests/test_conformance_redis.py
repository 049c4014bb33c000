"""The core conformance suite, unchanged, against the shared Redis server."""

from __future__ import annotations

import pytest

from cascade_bus.testing import ConformanceSuite

pytestmark = pytest.mark.redis


class TestRedis(ConformanceSuite):
    @pytest.fixture
    def transport_url(self, redis_url: str) -> str:
        return redis_url
