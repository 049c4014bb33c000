"""Retained messages emulated with the KV bucket: the snapshot/live hand-over is exact.

One publisher keeps overwriting a retained topic with 1, 2, 3, ... while subscriptions start at
random moments. Each subscription must see a contiguous run ``k, k+1, ..., N``: the snapshot
value (or the first live one) and then every later value exactly once — a gap would be a
message lost between the snapshot and the live subscription, a repeat a duplicate.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import cascade_bus

pytestmark = pytest.mark.nats

N = 300
SUBSCRIBERS = 24


@pytest.mark.parametrize(("pub_qos", "sub_qos"), [(0, 0), (1, 1), (1, 0), (0, 1)])
async def test_snapshot_and_live_hand_over_without_loss_or_duplicates(
    nats_url, unique_topic, buses, pub_qos, sub_qos
):
    topic = f"{unique_topic}/race"
    publisher = await cascade_bus.connect(nats_url)
    subscriber = await cascade_bus.connect(nats_url)
    buses.extend([publisher, subscriber])
    runs: list[list[int]] = [[] for _ in range(SUBSCRIBERS)]
    finished = [asyncio.Event() for _ in range(SUBSCRIBERS)]
    progress = asyncio.Event()
    written = 0

    def handler(i: int) -> Any:
        def record(env: cascade_bus.Envelope[Any]) -> None:
            runs[i].append(env.payload)
            if env.payload == N:
                finished[i].set()

        return record

    async def publish() -> None:
        nonlocal written
        for value in range(1, N + 1):
            await publisher.publish(topic, value, retain=True, qos=pub_qos)
            written = value
            progress.set()

    async def subscribe_all() -> None:
        for i in range(SUBSCRIBERS):
            # Spread the subscriptions over the run: wait for the publisher to move on.
            target = (i * N) // SUBSCRIBERS
            while written < target:
                progress.clear()
                await progress.wait()
            await subscriber.subscribe(topic, handler(i), qos=sub_qos)

    async with asyncio.timeout(30):
        await asyncio.gather(publish(), subscribe_all())
        for event in finished:
            await event.wait()
    for i, run in enumerate(runs):
        assert run, f"subscriber {i} got nothing"
        assert run == list(range(run[0], N + 1)), f"subscriber {i}: {run[:5]}...{run[-5:]}"
    assert subscriber.stats().dropped_total == 0
    await publisher.publish(topic, b"", retain=True)


async def test_retained_replay_keeps_headers_and_metadata_in_raw_format(
    nats_url, unique_topic, buses, kit
):
    publisher = await cascade_bus.connect(nats_url, format="raw")
    buses.append(publisher)
    await publisher.publish(
        f"{unique_topic}/meta", {"v": 1}, retain=True, headers={"k": "v"}, type="t.kind"
    )
    inbox = kit.Inbox()
    late = await cascade_bus.connect(nats_url, format="raw")
    buses.append(late)
    await late.subscribe(f"{unique_topic}/#", inbox)
    (env,) = inbox.envelopes
    assert (env.topic, env.payload, env.type) == (f"{unique_topic}/meta", {"v": 1}, "t.kind")
    assert env.headers == {"k": "v"}
    await publisher.publish(f"{unique_topic}/meta", b"", retain=True)


async def test_clear_then_set_again_and_wildcard_snapshot_order(nats_url, unique_topic, buses):
    """The snapshot of a wildcard arrives oldest write first; cleared keys are skipped."""
    bus = await cascade_bus.connect(nats_url)
    buses.append(bus)
    for name in ("c", "a", "b"):
        await bus.publish(f"{unique_topic}/w/{name}", name, retain=True)
    await bus.publish(f"{unique_topic}/w/a", b"", retain=True)
    await bus.publish(f"{unique_topic}/w/a", "a2", retain=True)
    await bus.publish(f"{unique_topic}/w/b", b"", retain=True)
    got: list[tuple[str, Any]] = []
    await bus.subscribe(f"{unique_topic}/w/+", lambda env: got.append((env.topic, env.payload)))
    assert [(t.rsplit("/", 1)[1], p) for t, p in got] == [("c", "c"), ("a", "a2")]
    for name in ("a", "c"):
        await bus.publish(f"{unique_topic}/w/{name}", b"", retain=True)


async def test_retain_disabled_refuses_retained_publishes(nats_url, unique_topic, buses):
    bus = await cascade_bus.connect(nats_url, retain=False)
    buses.append(bus)
    assert not bus.capabilities.retain
    with pytest.raises(cascade_bus.UnsupportedFeature):
        await bus.publish(f"{unique_topic}/x", 1, retain=True)


async def test_wildcard_snapshot_lists_few_keys_and_streams_many(
    nats_url, unique_topic, buses, monkeypatch
):
    """Wildcard snapshots: a few keys listed and read one by one, many through a consumer.

    Up to ``_LISTED_MAX`` matching keys are listed by the bucket's leader and read one by one;
    beyond that a consumer streams them. Both give every value, oldest write first.
    """
    from cascade_bus_nats import _retained

    bus = await cascade_bus.connect(nats_url)
    buses.append(bus)
    transport = bus.transport
    streamed: list[str] = []
    original = transport._retained._snapshot_consumer

    async def spy(filter_subject: str) -> Any:
        streamed.append(filter_subject)
        return await original(filter_subject)

    monkeypatch.setattr(transport._retained, "_snapshot_consumer", spy)
    many = _retained.LISTED_MAX + 20
    for i in range(many):
        await bus.publish(f"{unique_topic}/many/{i}", i, retain=True)
    for i in range(3):
        await bus.publish(f"{unique_topic}/few/{i}", i, retain=True)
    few: list[Any] = []
    await bus.subscribe(f"{unique_topic}/few/+", lambda env: few.append(env.payload))
    assert few == [0, 1, 2]
    assert streamed == []
    got: list[Any] = []
    await bus.subscribe(f"{unique_topic}/many/+", lambda env: got.append(env.payload))
    assert got == list(range(many))
    assert len(streamed) == 1
    for i in range(many):
        await bus.publish(f"{unique_topic}/many/{i}", b"", retain=True)
    for i in range(3):
        await bus.publish(f"{unique_topic}/few/{i}", b"", retain=True)


async def test_bucket_without_direct_gets_is_read_through_its_leader(
    private_nats, unique_topic, buses
):
    """A bucket without direct gets (made elsewhere, or replicated) is read via its leader.

    Reads use ``STREAM.MSG.GET``, which the stream's leader answers.
    """
    import nats

    server = private_nats()
    nc = await nats.connect(server.url)
    try:
        await nc.jetstream().create_key_value(bucket="cascade_retained", history=1, direct=False)
    finally:
        await nc.close()
    bus = await cascade_bus.connect(server.url)
    buses.append(bus)
    assert bus.transport._js.kv_direct is False
    await bus.publish(f"{unique_topic}/a", {"v": 1}, retain=True, headers={"k": "v"})
    await bus.publish(f"{unique_topic}/b", "b", retain=True)
    await bus.publish(f"{unique_topic}/b", b"", retain=True)
    exact: list[Any] = []
    await bus.subscribe(f"{unique_topic}/a", lambda env: exact.append((env.payload, env.headers)))
    assert exact == [({"v": 1}, {"k": "v"})]
    wild: list[Any] = []
    await bus.subscribe(f"{unique_topic}/+", lambda env: wild.append(env.payload))
    assert wild == [{"v": 1}]
    gone: list[Any] = []
    await bus.subscribe(f"{unique_topic}/b", lambda env: gone.append(env.payload))
    assert gone == []
