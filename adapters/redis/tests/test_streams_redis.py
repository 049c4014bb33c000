"""QoS 1 and queue groups on Redis Streams: routing, acks, claims, mixed QoS, key layout."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
import redis.asyncio as aredis

from cascade_bus import Envelope
from cascade_bus.testing.conformance import WILDCARD_MATRIX, WILDCARD_TOPICS

pytestmark = pytest.mark.redis


async def test_qos1_subscription_gets_both_qos_and_acks(redis_url, open_bus, prefix, kit):
    """A QoS 1 wildcard subscription gets QoS 0 and QoS 1 publishes; all acked afterwards."""
    bus, publisher = await open_bus(redis_url), await open_bus(redis_url)
    inbox = kit.Inbox()
    await bus.subscribe(f"{prefix}/+/x", inbox, qos=1)
    for i in range(20):
        await publisher.publish(f"{prefix}/{i}/x", i, qos=i % 2)
    await publisher.publish(f"{prefix}/a/b/x", "too deep")
    await publisher.publish(f"{prefix}/end/x", "end", qos=1)
    await inbox.wait_for(21)
    assert inbox.payloads == [*range(20), "end"]
    assert all(env.topic == f"{prefix}/{env.payload}/x" for env in inbox.envelopes[:20])
    # The handler ran for all of them: after a flush of the acks nothing is pending.
    transport = kit.redis_transport(bus)
    (sub,) = [s for s in transport._subs if s.stream is not None]
    client = aredis.Redis.from_url(redis_url, protocol=2)
    try:
        async with asyncio.timeout(kit.WAIT):
            while True:
                await bus.flush()
                pending = await client.xpending(sub.stream.key, "cascade_bus")
                if pending["pending"] == 0:
                    break
                await asyncio.sleep(0.01)  # polling the server's PEL (no event for it)
    finally:
        await client.aclose()


@pytest.mark.parametrize("batched", [False, True], ids=["one-per-call", "one-call"])
async def test_stream_routes_follow_the_wildcard_matrix(redis_url, open_bus, prefix, kit, batched):
    """The publish script routes to QoS 1 streams exactly as pub/sub matches, whether it runs
    each message in its own call (routes scanned per message) or many in one call (routes
    parsed once)."""
    bus, publisher = await open_bus(redis_url), await open_bus(redis_url)
    inboxes = {pattern: kit.Inbox() for pattern in WILDCARD_MATRIX}
    for pattern, inbox in inboxes.items():
        await bus.subscribe(f"{prefix}/{pattern}", inbox, qos=1)
    if batched:
        for name in WILDCARD_TOPICS:  # QoS 0: each returns without yielding to the loop
            await publisher.publish(f"{prefix}/{name}", {"t": name})
        assert len(kit.redis_transport(publisher)._publisher._parts) == len(WILDCARD_TOPICS)
    else:
        for name in WILDCARD_TOPICS:  # QoS 1: each waits for its own script call
            await publisher.publish(f"{prefix}/{name}", {"t": name}, qos=1)
    for pattern in WILDCARD_MATRIX:  # one sentinel per pattern, after the rest (FIFO streams)
        concrete = "/".join("s" if level in "+#" else level for level in pattern.split("/"))
        await publisher.publish(f"{prefix}/{concrete}", {"end": pattern}, qos=1)
    for pattern, inbox in inboxes.items():
        end = {"end": pattern}
        await inbox.wait_until(lambda inbox=inbox, end=end: end in inbox.payloads, str(end))
        got = sorted(p["t"] for p in inbox.payloads if "t" in p)
        assert got == sorted(WILDCARD_MATRIX[pattern]), pattern
        assert all(env.topic == f"{prefix}/{env.payload['t']}" for env in inbox.envelopes[:1])


async def test_qos0_subscriber_sees_qos1_publishes(redis_url, open_bus, prefix, kit):
    bus, publisher = await open_bus(redis_url), await open_bus(redis_url)
    inbox = kit.Inbox()
    await bus.subscribe(f"{prefix}/#", inbox)
    await publisher.publish(f"{prefix}/a", 1, qos=1)
    await publisher.publish(f"{prefix}/a/b", 2, qos=1)
    assert await inbox.wait_for(2) == [1, 2]


async def test_queue_group_qos1_across_buses_each_once(redis_url, open_bus, prefix, kit):
    members = [kit.Inbox() for _ in range(3)]
    for inbox in members:
        await (await open_bus(redis_url)).subscribe(f"{prefix}/jobs/+", inbox, qos=1, queue="w")
    publisher = await open_bus(redis_url)
    await asyncio.gather(
        *(publisher.publish(f"{prefix}/jobs/{i % 3}", i, qos=1) for i in range(300))
    )
    everything = asyncio.Event()

    def count(env: Envelope[Any]) -> None:
        if sum(len(m) for m in members) >= 300:
            everything.set()

    for inbox in members:  # every member also reports to one shared event
        inbox.envelopes = _Notifying(inbox.envelopes, count)
    count(None)  # type: ignore[arg-type]
    async with asyncio.timeout(kit.WAIT):
        await everything.wait()
    got = sorted(p for m in members for p in m.payloads)
    assert got == list(range(300))


async def test_dead_members_pending_messages_are_claimed(redis_url, open_bus, prefix, kit):
    """A member that took messages and died without acking: another member gets them."""
    url = redis_url
    stuck = asyncio.Event()
    taken: list[Any] = []

    async def hang(env: Envelope[Any]) -> None:
        taken.append(env.payload)
        stuck.set()
        await asyncio.Event().wait()  # never finishes: never acks

    doomed = await open_bus(url, claim_idle=0.3, read_count=1, close_timeout=0.2)
    await doomed.subscribe(f"{prefix}/work", hang, qos=1, queue="pool")
    publisher = await open_bus(url)
    for i in range(5):
        await publisher.publish(f"{prefix}/work", i, qos=1)
    async with asyncio.timeout(kit.WAIT):
        await stuck.wait()
    # "Crash": cut its connections without acking or leaving the group.
    transport = kit.redis_transport(doomed)
    transport._closing = True
    for sub in list(transport._subs):
        sub.closed = True
        if sub.stream and sub.stream.task:
            sub.stream.task.cancel()
        if sub.stream and sub.stream.conn:
            sub.stream.conn.abort()
    survivor = kit.Inbox()
    other = await open_bus(url, claim_idle=0.3)
    await other.subscribe(f"{prefix}/work", survivor, qos=1, queue="pool")
    payloads = await survivor.wait_for(5)
    assert sorted(payloads) == [0, 1, 2, 3, 4]
    assert taken
    assert taken[0] in payloads
    assert other.stats().duplicates >= 1  # the claimed ones were redeliveries


async def test_qos1_retained_replay_and_key_layout(redis_url, open_bus, prefix, kit):
    publisher = await open_bus(redis_url)
    await publisher.publish(f"{prefix}/state", {"on": True}, retain=True)
    bus = await open_bus(redis_url, client_id=f"fixed-{prefix.rsplit('/', 1)[1]}")
    inbox = kit.Inbox()
    sub = await bus.subscribe(f"{prefix}/#", inbox, qos=1)
    assert inbox.payloads == [{"on": True}]
    client = aredis.Redis.from_url(redis_url, protocol=2)
    try:
        stored = await client.hget("cascade_bus:retained", f"{prefix}/state")
        assert json.loads(stored)["data"] == {"on": True}  # the CloudEvents envelope, as sent
        key = f"cascade_bus:s:{kit.redis_transport(bus).client_id}:0/{prefix}/#"
        assert await client.exists(key) == 1
        assert await client.hexists("cascade_bus:routes", key)
        await publisher.publish(f"{prefix}/state", b"", retain=True)
        await inbox.wait_for(2)
        assert inbox.envelopes[1].is_clear
        await bus.close()
        # Closing keeps the stream and its route, as a crash would: a process restarted with
        # the same client_id resumes them (within stream_ttl) ...
        assert await client.exists(key) == 1
        assert await client.hexists("cascade_bus:routes", key)
        again = await open_bus(redis_url, client_id=f"fixed-{prefix.rsplit('/', 1)[1]}")
        sub = await again.subscribe(f"{prefix}/#", kit.Inbox(), qos=1)
        # ... and unsubscribing removes both.
        await sub.unsubscribe()
        assert await client.exists(key) == 0
        assert not await client.hexists("cascade_bus:routes", key)
    finally:
        await client.aclose()


class _Notifying(list):  # type: ignore[type-arg]
    """A list that calls ``hook`` after every append (to wait on several inboxes at once)."""

    def __init__(self, items: list[Any], hook: Any) -> None:
        super().__init__(items)
        self._hook = hook

    def append(self, item: Any) -> None:
        super().append(item)
        self._hook(item)
