"""The body limit Redis declares is the one it enforces (``max_payload``, 8 MiB by default)."""

from __future__ import annotations

import pytest
from cascade_bus_redis import RedisTransport

import cascade_bus
from cascade_bus import PayloadTooLarge

pytestmark = pytest.mark.redis

MIB = 1024 * 1024


def test_the_declared_limit_is_the_enforced_default() -> None:
    # Not None ("unbounded" in `cascade-bus doctor`): a larger body is refused.
    assert RedisTransport.capabilities.max_payload == 8 * MIB


async def test_a_body_over_the_declared_limit_is_refused(redis_url: str, unique_topic: str) -> None:
    async with cascade_bus.connect(redis_url, format="raw") as bus:
        limit = bus.transport.max_payload
        assert limit == bus.transport.capabilities.max_payload == 8 * MIB
        with pytest.raises(PayloadTooLarge):
            await bus.publish(unique_topic, b"x" * (limit + 1))
        await bus.publish(unique_topic, b"x" * 1024)  # below it: sent
        assert bus.stats().dropped.get("payload_too_large") == 1
