"""The snapshot/live race: subscribing while a publisher keeps rewriting retained topics.

A subscriber that subscribes at any moment must see, per topic, one unbroken run of values
ending with the last one published: the retained value (or the first live one) and then every
later publish exactly once. A gap means a message lost between the snapshot and the live
subscription; a repeat means one delivered twice (once retained, once live).
"""

from __future__ import annotations

import asyncio

import pytest

from cascade_bus.testing.runs import RetainedRuns, retained_storm

pytestmark = pytest.mark.redis

ROUNDS = 300
TOPICS = 4


@pytest.mark.parametrize("qos", [0, 1])
async def test_subscribe_during_retained_storm(redis_url, open_bus, prefix, qos) -> None:
    publisher = await open_bus(redis_url)
    buses = [await open_bus(redis_url) for _ in range(2)]
    topics = [f"{prefix}/r/{i}" for i in range(TOPICS)]
    for topic in topics:
        await publisher.publish(topic, {"v": 0}, retain=True)
    await publisher.flush()
    milestones = [asyncio.Event() for _ in range(12)]

    runs: list[tuple[RetainedRuns, list[str]]] = []

    async def subscriber(i: int) -> None:
        await milestones[i // 2].wait()
        bus = buses[i % 2]
        if i % 3 == 0:
            pattern, wanted = topics[i % TOPICS], [topics[i % TOPICS]]
        elif i % 3 == 1:
            pattern, wanted = f"{prefix}/r/+", topics
        else:
            pattern, wanted = f"{prefix}/#", topics
        rec = RetainedRuns(f"sub{i} {pattern!r} qos={qos}", ROUNDS)
        runs.append((rec, wanted))
        await bus.subscribe(pattern, rec, qos=qos)

    async with asyncio.timeout(30):
        await asyncio.gather(
            retained_storm(publisher, topics, ROUNDS, milestones, qos),
            *(subscriber(i) for i in range(2 * len(milestones) - 2)),
        )
        await publisher.flush()
        for rec, wanted in runs:
            while not rec.complete(wanted):
                rec.changed.clear()
                await rec.changed.wait()
    problems = [p for rec, wanted in runs for p in rec.problems(wanted)]
    assert not problems, "\n".join(problems)
    # Clean up what this test retained.
    for topic in topics:
        await publisher.publish(topic, b"", retain=True)


async def test_live_publish_between_subscribe_and_snapshot_is_not_lost(
    redis_url, open_bus, prefix, kit
) -> None:
    """Non-retained publishes racing a subscribe: every one after the subscribe arrives once."""
    publisher = await open_bus(redis_url)
    bus = await open_bus(redis_url)
    topic = f"{prefix}/mixed"
    await publisher.publish(topic, {"v": 0}, retain=True)
    await publisher.flush()
    inbox = kit.Inbox()
    started = asyncio.Event()

    async def produce() -> None:
        for v in range(1, 501):
            await publisher.publish(topic, {"v": v}, retain=v % 5 == 0)
            if v == 50:
                started.set()
            await asyncio.sleep(0)

    async def subscribe() -> None:
        await started.wait()
        await bus.subscribe(topic, inbox)

    async with asyncio.timeout(20):
        await asyncio.gather(produce(), subscribe())
    await inbox.wait_until(lambda: bool(inbox.payloads) and inbox.payloads[-1]["v"] == 500, "500")
    values = [p["v"] for p in inbox.payloads]
    first = values[0]
    # The first message is the retained one (a multiple of 5) or the first live one; after it,
    # every value exactly once, in order.
    assert values == list(range(first, 501)) or values == [first, *range(values[1], 501)], values
    assert len(values) == len(set(values))
    await publisher.publish(topic, b"", retain=True)
