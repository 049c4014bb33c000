"""Interop with a plain aio-pika client on the same exchange, both ways (CloudEvents included)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aio_pika
import msgspec
import pytest

from cascade_bus import connect
from cascade_bus.testing.inbox import Inbox
from cascade_bus.testing.waits import WAIT

pytestmark = pytest.mark.amqp


async def _declared(pika: aio_pika.abc.AbstractChannel, exchange: str) -> Any:
    return await pika.declare_exchange(exchange, aio_pika.ExchangeType.TOPIC, durable=True)


async def test_plain_client_publish_reaches_a_subscriber(
    amqp_url: str, amqp_exchange: str, pika: aio_pika.abc.AbstractChannel, unique_topic: str
) -> None:
    """A bare JSON body from aio-pika arrives as an envelope whose payload is that value."""
    exchange = await _declared(pika, amqp_exchange)
    async with connect(amqp_url) as bus:
        inbox = Inbox()
        await bus.subscribe(f"{unique_topic}/+/state", inbox)
        key = unique_topic.replace("/", ".") + ".pump-1.state"
        await exchange.publish(aio_pika.Message(b'{"running": true}'), routing_key=key)
        await inbox.wait_until(lambda: len(inbox) >= 1, "the message")
        env = inbox.envelopes[0]
        assert (env.topic, env.payload) == (f"{unique_topic}/pump-1/state", {"running": True})


async def test_plain_client_binary_cloudevent(
    amqp_url: str, amqp_exchange: str, pika: aio_pika.abc.AbstractChannel, unique_topic: str
) -> None:
    """CloudEvents AMQP binding, binary mode: ``cloudEvents_*`` headers fill the envelope."""
    exchange = await _declared(pika, amqp_exchange)
    async with connect(amqp_url) as bus:
        inbox = Inbox()
        await bus.subscribe(f"{unique_topic}/ce", inbox)
        message = aio_pika.Message(
            b'{"v": 1}',
            content_type="application/json",
            headers={
                "cloudEvents_specversion": "1.0",
                "cloudEvents_id": "evt-1",
                "cloudEvents_source": "urn:plain-client",
                "cloudEvents:type": "com.example.reading",
                "tenant": "acme",
            },
        )
        await exchange.publish(message, routing_key=unique_topic.replace("/", ".") + ".ce")
        await inbox.wait_until(lambda: len(inbox) >= 1, "the message")
        env = inbox.envelopes[0]
        assert (env.id, env.source, env.type) == (
            "evt-1",
            "urn:plain-client",
            "com.example.reading",
        )
        assert env.payload == {"v": 1}
        assert env.content_type == "application/json"
        assert env.headers["tenant"] == "acme"


async def test_bus_publish_reaches_a_plain_client(
    amqp_url: str, amqp_exchange: str, pika: aio_pika.abc.AbstractChannel, unique_topic: str
) -> None:
    """``format=raw``: the plain client reads the bare JSON and the CloudEvents headers."""
    exchange = await _declared(pika, amqp_exchange)
    queue = await pika.declare_queue(exclusive=True)
    await queue.bind(exchange, routing_key=unique_topic.replace("/", ".") + ".#")
    received: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage] = asyncio.Queue()
    await queue.consume(received.put, no_ack=True)
    async with connect(amqp_url, format="raw") as bus:
        await bus.publish(f"{unique_topic}/a.b/c", {"a": 1}, headers={"tenant": "acme"}, qos=1)
        async with asyncio.timeout(WAIT):
            message = await received.get()
    assert message.routing_key == unique_topic.replace("/", ".") + ".a%2Eb.c"
    assert json.loads(message.body) == {"a": 1}
    headers = message.headers
    assert headers["cloudEvents_specversion"] == "1.0"
    assert headers["cloudEvents_subject"] == f"{unique_topic}/a.b/c"
    assert headers["cloudEvents_tenant"] == "acme"  # an extension attribute
    assert message.content_type == "application/json"
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT  # QoS 1


async def test_structured_envelope_for_a_plain_client(
    amqp_url: str, amqp_exchange: str, pika: aio_pika.abc.AbstractChannel, unique_topic: str
) -> None:
    """The default format: a structured CloudEvent (JSON) that any JSON reader can parse."""
    exchange = await _declared(pika, amqp_exchange)
    queue = await pika.declare_queue(exclusive=True)
    await queue.bind(exchange, routing_key=unique_topic.replace("/", ".") + ".s")
    received: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage] = asyncio.Queue()
    await queue.consume(received.put, no_ack=True)
    async with connect(amqp_url) as bus:
        await bus.publish(f"{unique_topic}/s", {"x": 2})
        async with asyncio.timeout(WAIT):
            message = await received.get()
    event = msgspec.json.decode(message.body)
    assert event["specversion"] == "1.0"
    assert event["data"] == {"x": 2}
    assert event["subject"] == f"{unique_topic}/s"
