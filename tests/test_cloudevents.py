"""The CloudEvents mapping without a broker: JSON event format members, binary-mode headers.

The broker round trips with the SDK live in each adapter's ``test_cloudevents_*.py``.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

import msgspec
import pytest
from cloudevents.core.bindings.common import encode_header_value as sdk_encode
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent

from cascade_bus import DecodeError, Envelope
from cascade_bus._cloudevents_binary import (
    WithId,
    decode_header_value,
    encode_header_value,
    read_binary_headers,
)
from cascade_bus._codec import Codec, decoder_for

FORMAT = JSONFormat()
ODD = {"tenant": "acme", "x-death-topic": "q", "id": "not the id", "Upper": "1"}


def _env(fmt: Any = "json", payload: Any = None, **kwargs: Any) -> Envelope[Any]:
    return Codec(fmt, "urn:src").envelope("a/b", {"v": 1} if payload is None else payload, **kwargs)


@pytest.mark.parametrize("fmt", ["json", "msgpack"])
def test_headers_round_trip_whatever_their_names(fmt: Any) -> None:
    codec = Codec(fmt, "urn:src")
    env = _env(fmt, headers=ODD, correlation_id="c", reply_to="r/1")
    assert decoder_for().decode("a/b", codec.encode_envelope(env)) == env


def test_the_json_body_is_a_valid_event_for_the_sdk() -> None:
    env = _env(headers=ODD, type="com.example.t")
    event = FORMAT.read(None, Codec("json", "s").encode_envelope(env))
    assert isinstance(event, CloudEvent)  # validated: every extension name is legal
    assert event.get_subject() == "a/b"
    assert event.get_extension("tenant") == "acme"
    assert msgspec.json.decode(event.get_extension("cascadeheaders")) == {
        "x-death-topic": "q",
        "id": "not the id",
        "Upper": "1",
    }
    assert event.get_id() == env.id  # a header called "id" never overrides the attribute


def test_sdk_json_with_typed_extensions_decodes() -> None:
    attributes: dict[str, Any] = {
        "type": "t",
        "source": "/s",
        "count": 5,
        "flag": True,
        "gone": None,
        "dataschema": "https://example.com/schema",
    }
    body = FORMAT.write(CloudEvent(attributes, {"a": 1}))
    env = decoder_for().decode("in/topic", body)
    assert env.topic == "in/topic"  # no subject: the topic it arrived on
    # dataschema has no envelope field: a header, like the extensions (nothing is lost).
    assert env.headers == {"count": "5", "flag": "true", "dataschema": "https://example.com/schema"}
    assert env.payload == {"a": 1}


def test_sdk_binary_data_decodes_to_bytes_even_typed() -> None:
    body = FORMAT.write(CloudEvent({"type": "t", "source": "/s"}, b"\x00\x01"))
    for decoder in (decoder_for(), decoder_for(bytes)):
        env = decoder.decode("t", body)
        assert env.payload == b"\x00\x01"
        assert env.content_type == "application/octet-stream"  # no type declared


def test_bad_data_base64_is_a_decode_error() -> None:
    body = b'{"specversion":"1.0","id":"1","source":"s","type":"t","data_base64":"*not*"}'
    with pytest.raises(DecodeError, match="data_base64"):
        decoder_for().decode("t", body)


def test_bodies_from_before_the_mapping_still_decode() -> None:
    old = (
        b'{"specversion":"1.0","id":"1","source":"s","type":"t","time":"2026-01-01T00:00:00Z",'
        b'"topic":"x/y","data":{"a":1},"headers":{"X-Trace":"abc"}}'
    )
    env = decoder_for().decode("x/y", old)
    assert (env.topic, env.payload, env.headers) == ("x/y", {"a": 1}, {"X-Trace": "abc"})
    bad = old.replace(b'"abc"', b"1")  # headers must be strings: not an envelope after all
    assert decoder_for().decode("x/y", bad).payload == msgspec.json.decode(bad)


def test_binary_headers_follow_the_nats_binding() -> None:
    env = _env(headers={**ODD, "content-type": "x", "ce-odd": "y"}, type="t 1")
    headers = Codec.binary_headers(env)
    assert headers["ce-type"] == "t%201"
    assert headers["ce-datacontenttype"] == "application/json"
    assert headers["ce-subject"] == "a/b"
    assert headers["ce-tenant"] == "acme"
    assert headers["x-death-topic"] == "q"  # no attribute name: a plain header
    assert headers["Upper"] == "1"
    # Names that could be read as attributes travel in the bag.
    bag = msgspec.json.decode(decode_header_value(headers["ce-cascadeheaders"]))
    assert bag == {"id": "not the id", "content-type": "x", "ce-odd": "y"}
    back = decoder_for().decode("a/b", b'{"v":1}', headers)
    assert back == msgspec.structs.replace(env, content_type="application/json")


@pytest.mark.parametrize(
    ("text", "encoded"),
    [
        ("plain-ascii/:+", "plain-ascii/:+"),
        ("Euro € 😀", "Euro%20%E2%82%AC%20%F0%9F%98%80"),  # the binding's own example
        ('a "b" 100%', "a%20%22b%22%20100%25"),
        ("tab\there", "tab%09here"),
    ],
)
def test_header_values_are_percent_encoded(text: str, encoded: str) -> None:
    assert encode_header_value(text) == encoded
    assert decode_header_value(encoded) == text
    assert decode_header_value(sdk_encode(text)) == text  # the SDK encodes more: still read


def test_header_values_decoding_rules() -> None:
    assert decode_header_value("%e2%82%ac") == "€"  # lower-case hex accepted
    assert decode_header_value('"quoted \\"value\\" here"') == 'quoted "value" here'
    with pytest.raises(DecodeError, match="UTF-8"):
        decode_header_value("%C0%A0", "ce-x")  # an overlong encoding must be rejected


def test_binary_names_are_case_insensitive_and_a_different_subject_is_a_header() -> None:
    headers = {
        "CE-ID": "id-1",
        "Ce-Source": "/s",
        "ce-type": "t",
        "ce-subject": "elsewhere",
        "Content-Type": "text/plain",
    }
    env = decoder_for().decode("arrived/here", b"hello", headers)
    assert (env.id, env.source, env.type) == ("id-1", "/s", "t")
    assert env.topic == "arrived/here"  # headers may be echoed: the arrival topic is the truth
    assert env.headers == {"subject": "elsewhere"}
    assert env.content_type == "text/plain"
    assert env.payload == b"hello"


def test_to_cloudevent_has_the_members_of_the_json_body() -> None:
    env = _env(payload=b"\x01", headers=ODD)
    event = env.to_cloudevent()
    assert event == msgspec.json.decode(Codec("json", "s").encode_envelope(env))
    assert Envelope.from_cloudevent(event) == env


def test_another_producers_member_order_is_read_right() -> None:
    """Attributes ahead of specversion are not mistaken for our extension attributes."""
    body = (
        b'{"subject":"s/t","datacontenttype":"text/plain","tenant":"acme","specversion":"1.0",'
        b'"id":"1","source":"/s","type":"t","data":"hi"}'
    )
    env = decoder_for().decode("arrived", body)
    assert (env.topic, env.content_type, env.payload) == ("s/t", "text/plain", "hi")
    assert env.headers == {"tenant": "acme"}


def test_shared_binary_headers_are_read_once_and_copied_out() -> None:
    """A transport's cached block (read-only) and a `WithId` over one read as a fresh dict
    each time: the envelope of one message never shares (or changes) another's headers."""
    base = MappingProxyType(
        {"ce-source": "s%20rc", "ce-type": "t", "ce-cascadeheaders": '{"a":"1"}', "x": "y"}
    )
    plain = read_binary_headers(dict(base))
    first = read_binary_headers(WithId(base, "id-1"))
    second = read_binary_headers(WithId(base, "id%2D2"))
    assert first[0] == {**plain[0], "id": "id-1"}
    assert second[0]["id"] == "id-2"
    assert first[1] == second[1] == plain[1] == {"a": "1", "x": "y"}
    first[1]["changed"] = "by a handler"
    assert read_binary_headers(base)[1] == plain[1]
    assert read_binary_headers(base)[0] == plain[0]
