"""CloudEvents over MQTT exactly as the MQTT protocol binding says, checked with the SDK.

Both ways, on the shared broker: what a bus publishes a plain aiomqtt client reads as a valid
CloudEvent with the ``cloudevents`` SDK (structured on MQTT 3.1.1 and 5, binary on MQTT 5:
attribute-named user properties, ``datacontenttype`` in Content Type), and what the SDK
produces, sent by a plain client with the binding's properties, arrives as an envelope.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

import aiomqtt
import msgspec
import pytest
from cascade_bus_mqtt._packets import RETAIN_PROPERTY, encode_props
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent
from dateutil.parser import isoparse
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

import cascade_bus
from cascade_bus import EncodeError
from cascade_bus.testing.brokers import host_port

pytestmark = pytest.mark.mqtt

FORMAT = JSONFormat()
PROTOCOL = {"5": aiomqtt.ProtocolVersion.V5, "3.1.1": aiomqtt.ProtocolVersion.V311}
HEADERS = {"tenant": "acme", "x-death-topic": "orders/new"}  # an attribute name, and not


@pytest.fixture
def broker(mqtt_url: str) -> tuple[str, int]:
    return host_port(mqtt_url, 1883)


async def _receive(client: aiomqtt.Client) -> aiomqtt.Message:
    async with asyncio.timeout(10):
        return await anext(client.messages)


def _publish_props(content_type: str | None, user: list[tuple[str, str]]) -> Properties:
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    if content_type is not None:
        props.ContentType = content_type
    if user:
        props.UserProperty = user
    return props


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


def _packed(**values: Any) -> bytes:
    """A PUBLISH property block as paho packs it."""
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    for name, value in values.items():
        setattr(props, name, value)
    packed: bytes = props.pack()  # type: ignore[no-untyped-call]
    return packed


@pytest.mark.parametrize("retain", [False, True])
def test_property_blocks_are_what_paho_packs_in_the_cloudevents_binding(retain: bool) -> None:
    """``ce-`` headers: attribute-named user properties, plain values, datacontenttype as
    Content Type (the MQTT binding); byte for byte what paho's own ``pack`` gives."""
    headers = {
        "ce-specversion": "1.0",
        "ce-source": "urn:a%20b%E2%82%AC",
        "ce-datacontenttype": "application/json",
        "x-plain": "ünï",
        RETAIN_PROPERTY: "never sent as given",
    }
    user = [("specversion", "1.0"), ("source", "urn:a b€"), ("x-plain", "ünï")]
    if retain:
        user.append((RETAIN_PROPERTY, "1"))
    expected = _packed(ContentType="application/json", UserProperty=user)
    assert encode_props(headers, retain) == expected
    frozen = MappingProxyType(dict(headers))  # a constant mapping: packed once, then cached
    assert encode_props(frozen, retain) == expected
    assert encode_props(frozen, retain) is encode_props(frozen, retain)
    structured = _packed(ContentType="application/cloudevents+json")
    assert encode_props({"content-type": "application/cloudevents+json"}, False) == structured
    big = "x" * 70_000
    with pytest.raises(EncodeError, match="65,535"):
        encode_props({"ce-id": big}, False)


@pytest.mark.parametrize("version", ["5", "3.1.1"])
async def test_structured_events_we_publish_parse_with_the_sdk(
    mqtt_url, broker, unique_topic, version
):
    host, port = broker
    topic = f"{unique_topic}/structured"
    async with (
        aiomqtt.Client(host, port, protocol=PROTOCOL[version]) as plain,
        cascade_bus.connect(mqtt_url, version=version, source="urn:bus") as bus,
    ):
        await plain.subscribe(topic, qos=1)
        await bus.publish(topic, {"t": 21.5}, qos=1, headers=HEADERS, type="com.example.t")
        await bus.publish(topic, b"\x00\xff", qos=1)
        first, second = await _receive(plain), await _receive(plain)
    for message in (first, second):
        if version == "5":  # 3.1.1 has no Content Type: the JSON format is implied
            assert message.properties.ContentType == "application/cloudevents+json"
            assert not getattr(message.properties, "UserProperty", None)
    event = FORMAT.read(None, first.payload)
    assert event.get_type() == "com.example.t"
    assert event.get_source() == "urn:bus"
    assert event.get_subject() == topic
    assert event.get_data() == {"t": 21.5}
    assert event.get_extension("tenant") == "acme"
    bag = msgspec.json.decode(event.get_extension("cascadeheaders"))
    assert bag == {"x-death-topic": "orders/new"}
    when = event.get_time()
    assert when is not None
    assert when.tzinfo is not None
    binary = FORMAT.read(None, second.payload)
    assert binary.get_data() == b"\x00\xff"  # data_base64: bytes, not base64 text
    assert binary.get_datacontenttype() == "application/octet-stream"


async def test_binary_events_we_publish_parse_with_the_sdk(mqtt_url, broker, unique_topic):
    host, port = broker
    topic = f"{unique_topic}/binary"
    async with (
        aiomqtt.Client(host, port, protocol=aiomqtt.ProtocolVersion.V5) as plain,
        cascade_bus.connect(mqtt_url, version="5", format="raw", source="urn:bus 1") as bus,
    ):
        await plain.subscribe(topic, qos=1)
        await bus.publish(
            topic, {"t": 1}, qos=1, headers=HEADERS, type="com.example.t", correlation_id="c-1"
        )
        await bus.publish(topic, [2], qos=1)  # no per-message metadata: the constant properties
        first, second = await _receive(plain), await _receive(plain)
    props = first.properties
    assert props.ContentType == "application/json"
    user = dict(props.UserProperty)
    assert not any(name.startswith("ce-") for name in user)  # attribute names, unchanged
    assert "datacontenttype" not in user  # it is the Content Type
    assert user["source"] == "urn:bus 1"  # the plain value, not percent-encoded
    assert user["x-death-topic"] == "orders/new"  # not an attribute name: a plain property
    attributes: dict[str, Any] = {k: v for k, v in user.items() if k != "x-death-topic"}
    attributes["time"] = isoparse(attributes["time"])
    attributes["datacontenttype"] = props.ContentType
    event = CloudEvent(attributes, FORMAT.read_data(first.payload, props.ContentType))
    assert (event.get_type(), event.get_source(), event.get_subject()) == (
        "com.example.t",
        "urn:bus 1",
        topic,
    )
    assert event.get_extension("tenant") == "acme"
    assert event.get_extension("correlationid") == "c-1"
    assert event.get_data() == {"t": 1}
    assert second.properties.ContentType == "application/json"
    constant = dict(second.properties.UserProperty)
    assert constant["specversion"] == "1.0"
    assert constant["id"]  # required: every message carries its own
    assert constant["id"] != user["id"]
    assert CloudEvent(dict(constant), FORMAT.read_data(second.payload, "application/json"))


@pytest.mark.parametrize("version", ["5", "3.1.1"])
async def test_sdk_structured_events_arrive_as_envelopes(
    mqtt_url, broker, unique_topic, kit, buses, version
):
    host, port = broker
    topic = f"{unique_topic}/sdk-structured"
    bus = await cascade_bus.connect(mqtt_url, version=version)
    buses.append(bus)
    inbox = kit.Inbox()
    await bus.subscribe(topic, inbox)
    event = _sdk_event(topic, {"a": 1})
    no_subject = CloudEvent({"type": "t.raw", "source": "/s"}, b"\x01\x02")
    props = _publish_props(FORMAT.get_content_type(), []) if version == "5" else None
    async with aiomqtt.Client(host, port, protocol=PROTOCOL[version]) as plain:
        await plain.publish(topic, FORMAT.write(event), qos=1, properties=props)
        await plain.publish(topic, FORMAT.write(no_subject), qos=1, properties=props)
    await inbox.wait_for(2)
    env, raw = inbox.envelopes
    assert (env.id, env.source, env.type) == (event.get_id(), "/sensors/7", "com.example.reading")
    assert env.topic == topic
    assert env.payload == {"a": 1}
    assert env.headers == {"tenant": "acme"}
    assert env.time == event.get_time()
    assert raw.payload == b"\x01\x02"
    assert raw.topic == topic  # no subject: the topic it arrived on
    assert raw.content_type == "application/octet-stream"


async def test_sdk_binary_events_arrive_as_envelopes(mqtt_url, broker, unique_topic, kit, buses):
    host, port = broker
    topic = f"{unique_topic}/sdk-binary"
    bus = await cascade_bus.connect(mqtt_url, version="5")
    buses.append(bus)
    inbox = kit.Inbox()
    await bus.subscribe(topic, inbox)
    event = _sdk_event(topic, {"b": [1, 2]}, replyto=f"{topic}/reply")
    attributes = event.get_attributes()
    user = [
        (name, value.isoformat() if isinstance(value, datetime) else str(value))
        for name, value in attributes.items()
        if name != "datacontenttype"
    ]
    body = FORMAT.write_data(event.get_data(), event.get_datacontenttype())
    async with aiomqtt.Client(host, port, protocol=aiomqtt.ProtocolVersion.V5) as plain:
        props = _publish_props(event.get_datacontenttype(), user)
        await plain.publish(topic, body, qos=1, properties=props)
    await inbox.wait_for(1)
    (env,) = inbox.envelopes
    assert (env.id, env.source, env.type) == (event.get_id(), "/sensors/7", "com.example.reading")
    assert env.topic == topic
    assert env.payload == {"b": [1, 2]}
    assert env.content_type == "application/json"
    assert env.headers == {"tenant": "acme"}
    assert env.reply_to == f"{topic}/reply"
    assert env.time == event.get_time().astimezone(UTC)


async def test_binary_round_trip_between_buses(mqtt_url, unique_topic, kit, buses):
    """Raw (binary mode) on MQTT 5 keeps every field, odd header names and values included."""
    publisher = await cascade_bus.connect(mqtt_url, version="5", format="raw", source="urn:a b")
    subscriber = await cascade_bus.connect(mqtt_url, version="5")
    buses.extend([publisher, subscriber])
    topic = f"{unique_topic}/round"
    inbox = kit.Inbox()
    await subscriber.subscribe(topic, inbox)
    headers = {**HEADERS, "id": "not the id", "note": 'a "quoted" 100% €'}
    await publisher.publish(topic, {"r": 1}, qos=1, headers=headers, type="t 1", reply_to="r/x")
    await inbox.wait_for(1)
    (env,) = inbox.envelopes
    assert env.headers == headers
    assert (env.source, env.type, env.reply_to, env.topic) == ("urn:a b", "t 1", "r/x", topic)
    assert env.payload == {"r": 1}
