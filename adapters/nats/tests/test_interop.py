"""Interop with plain nats-py clients on the shared server, both ways.

A plain client publishing bare JSON reaches a bus subscriber; what a `Connector` publishes a
plain client reads as the same dict (QoS 0 on the plain subject, QoS 1 under the QoS-1 prefix);
headers travel natively; a plain NATS request is answered through ``bus.reply``; retained
values are readable as KV entries.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import nats
import pytest
from cascade_bus_nats import NatsTopicMapper
from nats.aio.msg import Msg

import cascade_bus
from cascade_bus import Connector

pytestmark = pytest.mark.nats

MAPPER = NatsTopicMapper()


async def _next(sub: Any, timeout: float = 5.0) -> Msg:
    msg: Msg = await sub.next_msg(timeout=timeout)
    return msg


async def test_plain_client_bare_json_reaches_a_bus_subscriber(
    plain, nats_url, unique_topic, kit, buses
):
    bus = await cascade_bus.connect(nats_url)
    buses.append(bus)
    inbox = kit.Inbox()
    await bus.subscribe(f"{unique_topic}/+/reading", inbox)
    subject = MAPPER.to_native(f"{unique_topic}/sensor.1/reading")
    assert subject.endswith(".sensor%2E1.reading")
    await plain.publish(subject, b'{"a": 1, "b": [true, null]}')
    await plain.publish(subject, b"not json at all")
    await kit.settle(plain)
    await inbox.wait_for(2)
    first, second = inbox.envelopes
    assert first.topic == f"{unique_topic}/sensor.1/reading"
    assert first.payload == {"a": 1, "b": [True, None]}
    assert second.payload == b"not json at all"


async def test_connector_output_is_read_by_a_plain_client_as_the_same_dict(
    plain, nats_url, unique_topic, kit
):
    connector = Connector(nats_url, presence=False)
    await connector.connect()
    try:
        event = {"run": "r1", "task": "extract", "attempt": 1, "state": "running", "n": 2.5}
        q0 = await plain.subscribe(MAPPER.to_native(f"{unique_topic}/events"))
        q1 = await plain.subscribe("$CASCADE.Q1." + MAPPER.to_native(f"{unique_topic}/events"))
        await kit.settle(plain)
        await connector.publish(f"{unique_topic}/events", event)
        await connector.publish(f"{unique_topic}/events", {"qos": 1}, qos=1)
        assert json.loads((await _next(q0)).data) == event
        assert json.loads((await _next(q1)).data) == {"qos": 1}
        assert connector.publish_failures == 0
    finally:
        await connector.disconnect()


async def test_headers_travel_natively_both_ways(plain, nats_url, unique_topic, kit, buses):
    bus = await cascade_bus.connect(nats_url, format="raw")
    buses.append(bus)
    subject = MAPPER.to_native(f"{unique_topic}/h")
    sub = await plain.subscribe(subject)
    await kit.settle(plain)
    await bus.publish(f"{unique_topic}/h", {"x": 1}, headers={"tenant": "acme"}, type="t.reading")
    msg = await _next(sub)
    assert json.loads(msg.data) == {"x": 1}
    assert msg.headers is not None
    assert msg.headers["ce-tenant"] == "acme"  # an extension attribute, as the binding says
    assert msg.headers["ce-type"] == "t.reading"
    assert msg.headers["ce-datacontenttype"] == "application/json"

    inbox = kit.Inbox()
    await bus.subscribe(f"{unique_topic}/from-plain", inbox)
    await plain.publish(
        MAPPER.to_native(f"{unique_topic}/from-plain"),
        b'{"y": 2}',
        headers={"trace": "abc", "ce-id": "id-7", "ce-source": "/plain"},
    )
    await inbox.wait_for(1)
    (env,) = inbox.envelopes
    assert env.payload == {"y": 2}
    assert env.headers == {"trace": "abc"}
    assert (env.id, env.source) == ("id-7", "/plain")


async def test_plain_nats_request_is_answered_by_bus_reply(plain, nats_url, unique_topic, buses):
    responder = await cascade_bus.connect(nats_url)
    buses.append(responder)

    async def answer(env: cascade_bus.Envelope[Any]) -> None:
        await responder.reply(env, {"echo": env.payload})

    await responder.subscribe(f"{unique_topic}/svc", answer)
    reply = await plain.request(MAPPER.to_native(f"{unique_topic}/svc"), b'{"q": 1}', timeout=5)
    envelope = json.loads(reply.data)  # the bus replies with its JSON envelope
    assert envelope["data"] == {"echo": {"q": 1}}


async def test_retained_values_are_kv_entries(plain, nats_url, unique_topic, buses):
    bus = await cascade_bus.connect(nats_url)
    buses.append(bus)
    topic = f"{unique_topic}/ret.x/y z"
    await bus.publish(topic, {"r": 1}, retain=True)
    kv = await plain.jetstream().key_value("cascade_retained")
    entry = await kv.get(MAPPER.to_native(topic), validate_keys=False)
    assert entry.value is not None
    assert json.loads(entry.value)["data"] == {"r": 1}
    await bus.publish(topic, b"", retain=True)
    with pytest.raises(nats.js.errors.KeyNotFoundError):
        await kv.get(MAPPER.to_native(topic), validate_keys=False)


async def test_bus_request_reply_over_inboxes(nats_url, unique_topic, buses):
    """The bus's own request/reply (``_inbox/<bus id>/<id>`` topics) works over NATS."""
    requester = await cascade_bus.connect(nats_url)
    responder = await cascade_bus.connect(nats_url, format="raw")
    buses.extend([requester, responder])

    async def answer(env: cascade_bus.Envelope[Any]) -> None:
        await responder.reply(env, {"n": env.payload["n"] * 2})

    await responder.subscribe(f"{unique_topic}/double", answer)
    replies = await asyncio.gather(
        *(requester.request(f"{unique_topic}/double", {"n": n}, timeout=5) for n in range(5))
    )
    assert [r.payload for r in replies] == [{"n": 2 * n} for n in range(5)]
    assert all(r.topic.startswith(f"_inbox/{requester.id}/") for r in replies)
