"""CloudEvents over NATS exactly as the NATS protocol binding says, checked with the SDK.

Both ways, on the shared server: structured bodies carry ``Content-Type:
application/cloudevents+json``; binary mode (``format=raw``) maps every attribute, extensions
and ``datacontenttype`` included, to a ``ce-`` header with a percent-encoded value; what the
SDK produces, sent by a plain nats-py client in either mode, arrives as an envelope.
"""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from cascade_bus_nats import NatsTopicMapper
from cloudevents.core.bindings.common import decode_header_value, encode_header_value
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent
from nats.aio.msg import Msg

import cascade_bus

pytestmark = pytest.mark.nats

MAPPER = NatsTopicMapper()
FORMAT = JSONFormat()
HEADERS = {"tenant": "acme", "x-death-topic": "orders/new"}  # an attribute name, and not


async def _next(sub: Any) -> Msg:
    msg: Msg = await sub.next_msg(timeout=10)
    return msg


def _lower(headers: dict[str, str] | None) -> dict[str, str]:
    """Header names compared case-insensitively, as NATS defines them."""
    return {k.lower(): v for k, v in (headers or {}).items()}


def _sdk_event(topic: str, data: Any, **extra: str) -> CloudEvent:
    attributes: dict[str, Any] = {
        "type": "com.example.reading",
        "source": "/sensors/7",
        "subject": topic,
        "datacontenttype": "application/json",
        "tenant": "acme",
        **extra,
    }
    return CloudEvent(attributes, data)


async def test_structured_events_we_publish_parse_with_the_sdk(plain, nats_url, unique_topic, kit):
    topic = f"{unique_topic}/structured"
    sub = await plain.subscribe(MAPPER.to_native(topic))
    await kit.settle(plain)
    async with cascade_bus.connect(nats_url, source="urn:bus") as bus:
        await bus.publish(topic, {"t": 21.5}, headers=HEADERS, type="com.example.t")
        await bus.publish(topic, b"\x00\xff")
        first, second = await _next(sub), await _next(sub)
    for msg in (first, second):
        assert _lower(msg.headers) == {"content-type": "application/cloudevents+json"}
    event = FORMAT.read(None, first.data)
    assert (event.get_type(), event.get_source()) == ("com.example.t", "urn:bus")
    assert event.get_subject() == topic
    assert event.get_data() == {"t": 21.5}
    assert event.get_extension("tenant") == "acme"
    bag = msgspec.json.decode(event.get_extension("cascadeheaders"))
    assert bag == {"x-death-topic": "orders/new"}
    binary = FORMAT.read(None, second.data)
    assert binary.get_data() == b"\x00\xff"


async def test_binary_events_we_publish_parse_with_the_sdk(plain, nats_url, unique_topic, kit):
    topic = f"{unique_topic}/binary"
    sub = await plain.subscribe(MAPPER.to_native(topic))
    await kit.settle(plain)
    async with cascade_bus.connect(nats_url, format="raw", source="urn:bus €") as bus:
        await bus.publish(topic, {"t": 1}, headers=HEADERS, type="com.example.t")
        await bus.publish(topic, [2])  # no per-message metadata: the constant headers
        first, second = await _next(sub), await _next(sub)
    headers = _lower(first.headers)
    assert "content-type" not in headers  # the binding's header is ce-datacontenttype
    assert headers["ce-datacontenttype"] == "application/json"
    assert headers["ce-source"] == "urn:bus%20%E2%82%AC"  # percent-encoded, upper-case hex
    assert headers["x-death-topic"] == "orders/new"  # not an attribute name: a plain header
    attributes = {
        k[3:]: decode_header_value(k[3:], v) for k, v in headers.items() if k.startswith("ce-")
    }
    event = CloudEvent(attributes, FORMAT.read_data(first.data, attributes["datacontenttype"]))
    assert (event.get_type(), event.get_source(), event.get_subject()) == (
        "com.example.t",
        "urn:bus €",
        topic,
    )
    assert event.get_extension("tenant") == "acme"
    assert event.get_data() == {"t": 1}
    constant = _lower(second.headers)
    assert constant["ce-specversion"] == "1.0"
    assert constant["ce-datacontenttype"] == "application/json"
    assert constant["ce-id"]  # the binding maps every attribute: id is required
    assert constant["ce-id"] != headers["ce-id"]


async def test_sdk_structured_events_arrive_as_envelopes(plain, nats_url, unique_topic, kit, buses):
    topic = f"{unique_topic}/sdk-structured"
    bus = await cascade_bus.connect(nats_url)
    buses.append(bus)
    inbox = kit.Inbox()
    await bus.subscribe(topic, inbox)
    event = _sdk_event(topic, {"a": 1})
    await plain.publish(
        MAPPER.to_native(topic),
        FORMAT.write(event),
        headers={"Content-Type": FORMAT.get_content_type()},
    )
    await inbox.wait_for(1)
    (env,) = inbox.envelopes
    assert (env.id, env.source, env.type) == (event.get_id(), "/sensors/7", "com.example.reading")
    assert (env.topic, env.payload, env.headers) == (topic, {"a": 1}, {"tenant": "acme"})
    assert env.time == event.get_time()


async def test_sdk_binary_events_arrive_as_envelopes(plain, nats_url, unique_topic, kit, buses):
    topic = f"{unique_topic}/sdk-binary"
    bus = await cascade_bus.connect(nats_url)
    buses.append(bus)
    inbox = kit.Inbox()
    await bus.subscribe(topic, inbox)
    event = _sdk_event(topic, {"b": 2}, note="100% €")
    headers = {f"ce-{k}": encode_header_value(v) for k, v in event.get_attributes().items()}
    headers["ce-type"] = '"com.example.reading"'  # the quoted form older senders use
    await plain.publish(
        MAPPER.to_native(topic),
        FORMAT.write_data(event.get_data(), event.get_datacontenttype()),
        headers=headers,
    )
    await inbox.wait_for(1)
    (env,) = inbox.envelopes
    assert (env.id, env.source, env.type) == (event.get_id(), "/sensors/7", "com.example.reading")
    assert (env.topic, env.payload) == (topic, {"b": 2})
    assert env.content_type == "application/json"
    assert env.headers == {"tenant": "acme", "note": "100% €"}
    assert env.time == event.get_time()


@pytest.mark.parametrize("fmt", ["json", "raw"])
async def test_round_trip_between_buses(nats_url, unique_topic, kit, buses, fmt):
    """Both modes keep every field, odd header names and values included."""
    publisher = await cascade_bus.connect(nats_url, format=fmt, source="urn:a b")
    subscriber = await cascade_bus.connect(nats_url)
    buses.extend([publisher, subscriber])
    topic = f"{unique_topic}/round"
    inbox = kit.Inbox()
    await subscriber.subscribe(topic, inbox)
    headers = {**HEADERS, "id": "not the id", "note": 'a "quoted" 100% €'}
    await publisher.publish(topic, {"r": 1}, headers=headers, type="t 1", reply_to="r/x")
    await inbox.wait_for(1)
    (env,) = inbox.envelopes
    assert env.headers == headers
    assert (env.source, env.type, env.reply_to, env.topic) == ("urn:a b", "t 1", "r/x", topic)
    assert env.payload == {"r": 1}


async def test_raw_messages_without_metadata_keep_one_id_for_every_subscriber(
    nats_url, unique_topic, kit, buses
):
    """Binary mode sends ``ce-id`` on every message: receivers agree on the publisher's id."""
    publisher = await cascade_bus.connect(nats_url, format="raw")
    first, second = await cascade_bus.connect(nats_url), await cascade_bus.connect(nats_url)
    buses.extend([publisher, first, second])
    topic = f"{unique_topic}/ids"
    one, two = kit.Inbox(), kit.Inbox()
    await first.subscribe(topic, one)
    await second.subscribe(topic, two)
    for n in range(3):
        await publisher.publish(topic, {"n": n})
    await one.wait_for(3)
    await two.wait_for(3)
    ids = [env.id for env in one.envelopes]
    assert ids == [env.id for env in two.envelopes]
    assert len(set(ids)) == 3
    assert [env.payload for env in one.envelopes] == [{"n": 0}, {"n": 1}, {"n": 2}]
