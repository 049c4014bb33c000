"""CloudEvents over Redis pub/sub: structured JSON bodies (Redis has no headers), SDK-checked.

What a bus publishes a plain redis-py subscriber parses with the ``cloudevents`` SDK, and what
the SDK writes, published by a plain client, arrives as an envelope with the same fields.
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import pytest
import redis.asyncio as aredis
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent

pytestmark = pytest.mark.redis

FORMAT = JSONFormat()


async def test_events_we_publish_parse_with_the_sdk(redis_url, open_bus, prefix):
    client = aredis.Redis.from_url(redis_url, protocol=2)
    pubsub = client.pubsub()
    await pubsub.subscribe(f"{prefix}/ce")
    bus = await open_bus(redis_url, source="urn:bus")
    try:
        headers = {"tenant": "acme", "x-death-topic": "orders/new"}
        await bus.publish(f"{prefix}/ce", {"t": 1}, headers=headers, type="com.example.t")
        await bus.publish(f"{prefix}/ce", b"\x00\xff")
        bodies: list[bytes] = []
        async with asyncio.timeout(10):
            while len(bodies) < 2:
                msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5)
                if msg is not None:
                    bodies.append(msg["data"])
    finally:
        await pubsub.aclose()
        await client.aclose()
    event = FORMAT.read(None, bodies[0])
    assert (event.get_type(), event.get_source()) == ("com.example.t", "urn:bus")
    assert event.get_subject() == f"{prefix}/ce"
    assert event.get_data() == {"t": 1}
    assert event.get_extension("tenant") == "acme"
    assert msgspec.json.decode(event.get_extension("cascadeheaders")) == {
        "x-death-topic": "orders/new"
    }
    assert FORMAT.read(None, bodies[1]).get_data() == b"\x00\xff"


async def test_sdk_events_arrive_as_envelopes(redis_url, open_bus, prefix, kit):
    bus = await open_bus(redis_url)
    inbox = kit.Inbox()
    await bus.subscribe(f"{prefix}/sdk", inbox)
    attributes: dict[str, Any] = {
        "type": "com.example.reading",
        "source": "/sensors/7",
        "subject": f"{prefix}/sdk",
        "tenant": "acme",
        "priority": 5,  # a non-string extension: its canonical string
    }
    event = CloudEvent(attributes, {"a": 1})
    client = aredis.Redis.from_url(redis_url, protocol=2)
    try:
        await client.publish(f"{prefix}/sdk", FORMAT.write(event))
    finally:
        await client.aclose()
    await inbox.wait_for(1)
    (env,) = inbox.envelopes
    assert (env.id, env.source, env.type) == (event.get_id(), "/sensors/7", "com.example.reading")
    assert (env.topic, env.payload) == (f"{prefix}/sdk", {"a": 1})
    assert env.headers == {"tenant": "acme", "priority": "5"}
    assert env.time == event.get_time()
