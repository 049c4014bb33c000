"""Interop with plain redis-py clients on the same server, both ways."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
import redis.asyncio as aredis

from cascade_bus import Connector

pytestmark = pytest.mark.redis


async def test_plain_publish_of_bare_json_reaches_a_bus_subscriber(
    redis_url, open_bus, prefix, kit
):
    bus = await open_bus(redis_url)
    inbox = kit.Inbox()
    await bus.subscribe(f"{prefix}/+/events", inbox)
    client = aredis.Redis.from_url(redis_url, protocol=2)
    try:
        await client.publish(f"{prefix}/run1/events", json.dumps({"state": "running", "n": 1}))
        await client.publish(f"{prefix}/run1/events", b"not json \xff")
    finally:
        await client.aclose()
    envs = [await inbox.wait_for(2)]
    assert envs[0][0] == {"state": "running", "n": 1}
    assert envs[0][1] == b"not json \xff"
    assert inbox.envelopes[0].topic == f"{prefix}/run1/events"


async def test_connector_output_is_the_same_dict_for_a_plain_client(redis_url, prefix):
    client = aredis.Redis.from_url(redis_url, protocol=2)
    pubsub = client.pubsub()
    await pubsub.psubscribe(f"{prefix}/*")
    connector = Connector(redis_url, presence=False)
    await connector.connect()
    sent = {"run": "r1", "task": "t", "state": "succeeded", "attempt": 2, "x": [1.5, None]}
    try:
        await connector.publish(f"{prefix}/telemetry", sent)
        await connector.publish(f"{prefix}/constraint", {"paused": True}, retain=True)
        got: list[Any] = []
        async with asyncio.timeout(5):
            while len(got) < 2:
                msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5)
                if msg is not None:
                    got.append((msg["channel"].decode(), json.loads(msg["data"])))
        assert got == [(f"{prefix}/telemetry", sent), (f"{prefix}/constraint", {"paused": True})]
        # The retained body is stored as is, readable with HGET.
        stored = await client.hget("cascade_bus:retained", f"{prefix}/constraint")
        assert json.loads(stored) == {"paused": True}
        await connector.publish(f"{prefix}/constraint", {}, retain=True)
        await connector.disconnect()
        assert await client.hget("cascade_bus:retained", f"{prefix}/constraint") is None
    finally:
        await connector.disconnect()
        await pubsub.aclose()
        await client.aclose()
