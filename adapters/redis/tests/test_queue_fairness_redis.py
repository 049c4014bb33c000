"""Queue groups share a burst: a member reads only while it holds less than its prefetch limit."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from cascade_bus import InvalidURL, connect

pytestmark = pytest.mark.redis

BURST = 20
WORK = 0.05  # seconds each message "takes" in the handler (simulated work)


@pytest.mark.parametrize("qos", [0, 1], ids=["qos0", "qos1"])
async def test_a_burst_is_shared_by_slow_members(redis_url, open_bus, prefix, kit, qos):
    """20 messages in one script call, two members that need 50 ms each: both get a share."""
    got: dict[int, list[Any]] = {0: [], 1: []}
    everything = asyncio.Event()

    def member(i: int) -> Callable[[Any], Awaitable[None]]:
        async def handle(env: Any) -> None:
            await asyncio.sleep(WORK)  # the work itself, not a synchronisation
            got[i].append(env.payload)
            if len(got[0]) + len(got[1]) == BURST:
                everything.set()

        return handle

    for i in got:
        bus = await open_bus(redis_url)
        await bus.subscribe(f"{prefix}/jobs", member(i), qos=qos, queue="g")
    publisher = await open_bus(redis_url)
    for n in range(BURST):  # QoS 0 publishes return at once: one batch, one script call
        await publisher.publish(f"{prefix}/jobs", n)
    assert len(kit.redis_transport(publisher)._publisher._parts) == BURST
    async with asyncio.timeout(kit.WAIT):
        await everything.wait()
    assert sorted(got[0] + got[1]) == list(range(BURST))
    assert min(len(got[0]), len(got[1])) >= 5, got


async def test_plain_subscriptions_keep_reading_in_bulk(redis_url, open_bus, prefix, kit):
    """Only queue members are bounded; a QoS 1 subscription reads ``read_count`` at a time."""
    bus = await open_bus(redis_url, queue_prefetch=3)
    await bus.subscribe(f"{prefix}/a", kit.Inbox(), qos=1)
    await bus.subscribe(f"{prefix}/b", kit.Inbox(), qos=1, queue="g")
    await bus.subscribe(f"{prefix}/c", kit.Inbox(), queue="g")
    streams = {s.pattern: s.stream for s in kit.redis_transport(bus)._subs}
    assert streams[f"{prefix}/a"].prefetch is None
    assert [streams[f"{prefix}/{q}"].prefetch.limit for q in "bc"] == [3, 3]


def test_queue_prefetch_must_be_positive(redis_url):
    with pytest.raises(InvalidURL, match="queue_prefetch"):
        connect(redis_url, queue_prefetch=0)
