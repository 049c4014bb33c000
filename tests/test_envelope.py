"""The envelope and its codec: wire names, round trips, foreign bodies, typed decoding."""

from __future__ import annotations

import base64
import dataclasses
import subprocess
import sys
from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest

from cascade_bus import DecodeError, EncodeError, Envelope
from cascade_bus._codec import Codec, WireFormat, decoder_for
from cascade_bus._envelope import new_id


class Point(msgspec.Struct):
    x: int
    y: int


class Nested(msgspec.Struct):
    name: str
    points: list[Point]


@dataclasses.dataclass
class Reading:
    sensor: str
    value: float


def make(codec: Codec, payload: Any, **kwargs: Any) -> Envelope[Any]:
    return codec.envelope("sensors/t1", payload, **kwargs)


PAYLOADS: list[Any] = [
    {"a": 1, "b": [1, 2.5, None, True], "c": {"d": "é"}},
    [1, 2, 3],
    "text",
    42,
    3.5,
    None,
    True,
    b"\x00\x01\xffbinary",
    b'{"looks": "like json"}',
]


@pytest.mark.parametrize("fmt", ["json", "msgpack"])
@pytest.mark.parametrize("payload", PAYLOADS, ids=repr)
def test_round_trip(fmt: WireFormat, payload: Any) -> None:
    codec = Codec(fmt, "test-source")
    env = make(
        codec,
        payload,
        headers={"trace": "abc", "X-Mixed": "Case"},
        correlation_id="corr-1",
        reply_to="_inbox/1/2",
        type="com.example.reading",
    )
    data = codec.encode_envelope(env)
    back = decoder_for().decode("ignored/topic", data)
    assert back == env
    assert type(back.payload) is type(payload)
    assert back.topic == "sensors/t1"  # the envelope's own topic wins


@pytest.mark.parametrize("fmt", ["json", "msgpack"])
def test_bytes_payload_stays_bytes(fmt: WireFormat) -> None:
    codec = Codec(fmt, "s")
    for payload in (b"\x00\xff", b"plain", b"123", b'"str"', b"{}"):
        back = decoder_for().decode("t", codec.encode_envelope(make(codec, payload)))
        assert back.payload == payload
        assert isinstance(back.payload, bytes)
        assert back.content_type == "application/octet-stream"


def test_msgpack_is_not_json() -> None:
    codec = Codec("msgpack", "s")
    data = codec.encode_envelope(make(codec, {"a": 1}))
    with pytest.raises(msgspec.DecodeError):
        msgspec.json.decode(data)
    assert msgspec.msgpack.decode(data)["specversion"] == "1.0"


def test_struct_and_dataclass_payloads_encode() -> None:
    codec = Codec("json", "s")
    back = decoder_for(Point).decode("t", codec.encode_envelope(make(codec, Point(1, 2))))
    assert back.payload == Point(1, 2)
    back2 = decoder_for(Reading).decode("t", codec.encode_envelope(make(codec, Reading("t1", 2.5))))
    assert back2.payload == Reading("t1", 2.5)


def test_unencodable_payload_raises_encode_error() -> None:
    codec = Codec("json", "s")
    with pytest.raises(EncodeError, match="object"):
        codec.encode_envelope(make(codec, object()))
    with pytest.raises(EncodeError):
        codec.encode_payload({1j: "complex key"})
    assert isinstance(EncodeError("x"), TypeError)


def test_wire_field_names_are_cloudevents() -> None:
    codec = Codec("json", "urn:test")
    env = make(
        codec,
        {"v": 1},
        headers={"h": "v"},
        correlation_id="c-1",
        reply_to="r/1",
        type="t.1",
    )
    wire = msgspec.json.decode(codec.encode_envelope(env))
    assert wire["specversion"] == "1.0"
    assert wire["data"] == {"v": 1}
    assert wire["correlationid"] == "c-1"
    assert wire["replyto"] == "r/1"
    assert wire["id"] == env.id
    assert wire["source"] == "urn:test"
    assert wire["type"] == "t.1"
    assert wire["subject"] == "sensors/t1"  # the topic is the CloudEvents subject
    assert wire["h"] == "v"  # a header is an extension attribute
    assert wire["time"].endswith("Z")
    # The Python names never reach the wire.
    for python_name in ("payload", "content_type", "correlation_id", "reply_to", "topic"):
        assert python_name not in wire
    assert "headers" not in wire
    # datacontenttype is omitted when it is the CloudEvents JSON default, written otherwise.
    assert wire.get("datacontenttype", "application/json") == "application/json"
    binary = msgspec.json.decode(codec.encode_envelope(make(codec, b"\x00")))
    assert binary["datacontenttype"] == "application/octet-stream"
    assert "data" not in binary  # binary data is data_base64, as the JSON format says
    assert base64.b64decode(binary["data_base64"]) == b"\x00"


def test_optional_attributes_are_omitted() -> None:
    codec = Codec("json", "s")
    wire = msgspec.json.decode(codec.encode_envelope(make(codec, 1)))
    assert "correlationid" not in wire
    assert "replyto" not in wire
    assert set(wire) >= {"specversion", "id", "source", "type", "time", "data"}


def test_envelope_is_frozen() -> None:
    env = make(Codec("json", "s"), {"a": 1})
    with pytest.raises(AttributeError):
        env.topic = "other"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        env.payload = 2  # type: ignore[misc]
    replaced = msgspec.structs.replace(env, topic="other")
    assert replaced.topic == "other"
    assert env.topic == "sensors/t1"


def test_ids_are_unique() -> None:
    ids = [new_id() for _ in range(10_000)]
    assert len(set(ids)) == len(ids)
    codec = Codec("json", "s")
    env_ids = {make(codec, i).id for i in range(10_000)}
    assert len(env_ids) == 10_000
    assert not env_ids & set(ids)


_FORK_IDS = """
import os
from cascade_bus._envelope import new_id
read, write = os.pipe()
pid = os.fork()
if pid == 0:
    os.write(write, new_id().encode())
    os._exit(0)
os.close(write)
child = os.read(read, 200).decode()
os.waitpid(pid, 0)
print(child, new_id())
"""


def test_a_forked_child_does_not_repeat_its_parents_ids() -> None:
    # In a fresh interpreter: forking the (threaded) test process itself would be unsafe.
    out = subprocess.run(
        [sys.executable, "-c", _FORK_IDS], capture_output=True, text=True, timeout=60, check=True
    )
    child_id, parent_id = out.stdout.split()
    assert child_id != parent_id
    assert child_id.rsplit("-", 1)[0] != parent_id.rsplit("-", 1)[0]  # a fresh prefix


def test_defaults() -> None:
    env: Envelope[int] = Envelope(id="1", source="s", type="t", time=datetime.now(UTC), payload=1)
    assert env.topic == ""
    assert env.content_type == "application/json"
    assert env.headers == {}
    assert env.correlation_id is None
    assert env.reply_to is None
    assert not env.is_clear


# -- CloudEvents dicts -------------------------------------------------------------------------


def test_cloudevent_round_trip() -> None:
    codec = Codec("json", "urn:src")
    env = make(
        codec,
        {"a": [1, 2]},
        headers={"traceparent": "00-abc", "tenant1": "acme"},
        correlation_id="c",
        reply_to="r/x",
        type="com.example.x",
    )
    event = env.to_cloudevent()
    assert event["specversion"] == "1.0"
    assert event["subject"] == "sensors/t1"
    assert event["data"] == {"a": [1, 2]}
    assert event["traceparent"] == "00-abc"
    assert event["time"].endswith("Z")
    assert msgspec.json.decode(msgspec.json.encode(event)) == event  # plain JSON types only
    assert Envelope.from_cloudevent(event) == env


def test_cloudevent_bytes_use_data_base64() -> None:
    env = make(Codec("json", "s"), b"\x00\x01\x02")
    event = env.to_cloudevent()
    assert "data" not in event
    assert base64.b64decode(event["data_base64"]) == b"\x00\x01\x02"
    back = Envelope.from_cloudevent(event)
    assert back.payload == b"\x00\x01\x02"
    assert back.content_type == "application/octet-stream"
    assert back == env


def test_cloudevent_struct_payload_becomes_builtins() -> None:
    event = make(Codec("json", "s"), Point(1, 2)).to_cloudevent()
    assert event["data"] == {"x": 1, "y": 2}


def test_cloudevent_headers_that_are_not_attribute_names_travel_in_one_attribute() -> None:
    headers = {"X-Upper": "1", "with-dash": "2", "ok": "3", "id": "4"}
    env = make(Codec("json", "s"), 1, headers=headers)
    event = env.to_cloudevent()
    assert "X-Upper" not in event
    assert "with-dash" not in event
    assert event["id"] == env.id  # a header never overrides an attribute
    assert event["ok"] == "3"
    assert msgspec.json.decode(event["cascadeheaders"]) == {
        "X-Upper": "1",
        "with-dash": "2",
        "id": "4",
    }
    assert Envelope.from_cloudevent(event).headers == headers


@pytest.mark.parametrize("missing", ["id", "source", "type"])
def test_from_cloudevent_missing_required_attribute(missing: str) -> None:
    event = {"specversion": "1.0", "id": "1", "source": "s", "type": "t", "data": 1}
    del event[missing]
    with pytest.raises(DecodeError, match=missing):
        Envelope.from_cloudevent(event)


@pytest.mark.parametrize("version", [None, "0.3", "2.0", 1.0])
def test_from_cloudevent_wrong_specversion(version: Any) -> None:
    event: dict[str, Any] = {"id": "1", "source": "s", "type": "t"}
    if version is not None:
        event["specversion"] = version
    with pytest.raises(DecodeError, match=r"CloudEvents 1\.0"):
        Envelope.from_cloudevent(event)


def test_from_cloudevent_bad_time() -> None:
    event = {"specversion": "1.0", "id": "1", "source": "s", "type": "t", "time": "yesterday"}
    with pytest.raises(DecodeError, match="RFC 3339"):
        Envelope.from_cloudevent(event)


def test_from_cloudevent_minimal() -> None:
    env = Envelope.from_cloudevent({"specversion": "1.0", "id": "1", "source": "s", "type": "t"})
    assert env.payload is None
    assert env.topic == ""
    assert env.time.tzinfo is not None


# -- decoding what other clients send ------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "payload"),
    [
        (b'{"a":1}', {"a": 1}),
        (b"[1,2]", [1, 2]),
        (b"3", 3),
        (b'"hello"', "hello"),
        (b"null", None),
        (b'{"specversion": "2.0", "id": "x"}', {"specversion": "2.0", "id": "x"}),
        (b'{"id": "1", "source": "s"}', {"id": "1", "source": "s"}),
    ],
)
def test_foreign_bare_json(body: bytes, payload: Any) -> None:
    env = decoder_for().decode("cascade/telemetry/run1", body)
    assert env.payload == payload
    assert env.topic == "cascade/telemetry/run1"
    assert env.content_type == "application/json"
    assert env.id  # a fresh id, so dedup and logs still work
    assert env.time.tzinfo is not None


@pytest.mark.parametrize(
    "body", [b"hello world", b"\xff\xfe\x00binary", b"{not json", b"\x81\xa1a\x01\xff"]
)
def test_non_json_body_is_bytes(body: bytes) -> None:
    env = decoder_for().decode("raw/t", body)
    assert env.payload == body
    assert isinstance(env.payload, bytes)
    assert env.content_type == "application/octet-stream"
    assert env.topic == "raw/t"


def test_foreign_msgpack_map_is_not_mistaken_for_an_envelope() -> None:
    body = msgspec.msgpack.encode({"a": 1})
    env = decoder_for().decode("t", body)
    assert env.payload == body  # not JSON, not our envelope: opaque bytes


def test_empty_body() -> None:
    env = decoder_for().decode("retained/t", b"")
    assert env.payload == b""
    assert env.is_clear
    assert env.topic == "retained/t"
    typed = decoder_for(Point).decode("retained/t", b"")
    assert typed.is_clear


def test_is_clear_only_for_empty_bytes() -> None:
    payloads: list[Any] = ["", None, {}, [], 0, b"x"]
    for payload in payloads:
        assert not decoder_for().decode("t", msgspec.json.encode(payload)).is_clear


def test_cloudevent_from_another_producer() -> None:
    # The structured-mode example from the CloudEvents JSON format spec: no "topic".
    body = b"""{
        "specversion" : "1.0",
        "type" : "com.example.someevent",
        "source" : "/mycontext",
        "id" : "A234-1234-1234",
        "time" : "2018-04-05T17:31:00Z",
        "comexampleextension1" : "value",
        "datacontenttype" : "application/json",
        "data" : {"appinfoA" : "abc", "appinfoB" : 123}
    }"""
    env = decoder_for().decode("events/in", body)
    assert env.topic == "events/in"
    assert env.id == "A234-1234-1234"
    assert env.source == "/mycontext"
    assert env.type == "com.example.someevent"
    assert env.time == datetime(2018, 4, 5, 17, 31, tzinfo=UTC)
    assert env.payload == {"appinfoA": "abc", "appinfoB": 123}


def test_cloudevent_without_data_from_another_producer() -> None:
    # "data" is OPTIONAL in CloudEvents 1.0: an event without it is still an event.
    body = b'{"specversion":"1.0","id":"ev-1","source":"/x","type":"com.example.ping"}'
    env = decoder_for().decode("events/in", body)
    assert env.id == "ev-1"
    assert env.type == "com.example.ping"
    assert env.payload is None
    assert env.topic == "events/in"


def test_cloudevent_with_data_base64_from_another_producer() -> None:
    body = (
        b'{"specversion":"1.0","id":"ev-2","source":"/x","type":"com.example.blob",'
        b'"datacontenttype":"application/octet-stream","data_base64":"AAEC"}'
    )
    env = decoder_for().decode("events/in", body)
    assert env.id == "ev-2"
    assert env.payload == b"\x00\x01\x02"


@pytest.mark.parametrize("data", ["not base64!", 'with "quotes" inside', "back\\slash"])
def test_octet_stream_envelope_with_text_data_still_decodes(data: str) -> None:
    # Another producer labels text as application/octet-stream: untyped decoding must still
    # give an envelope (never a bare msgspec exception that would kill a receive loop).
    body = msgspec.json.encode(
        {
            "specversion": "1.0",
            "id": "ev-3",
            "source": "/x",
            "type": "t",
            "time": "2020-01-01T00:00:00Z",
            "datacontenttype": "application/octet-stream",
            "data": data,
        }
    )
    env = decoder_for().decode("events/in", body)
    assert env.id == "ev-3"
    assert env.payload == data


def test_from_cloudevent_bad_data_base64() -> None:
    event = {"specversion": "1.0", "id": "1", "source": "s", "type": "t", "data_base64": "abc"}
    with pytest.raises(DecodeError, match="data_base64"):
        Envelope.from_cloudevent(event)


# -- typed decoding ------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["json", "msgpack"])
def test_typed_decode(fmt: WireFormat) -> None:
    codec = Codec(fmt, "s")
    data = codec.encode_envelope(make(codec, {"x": 1, "y": 2}, correlation_id="c"))
    env = decoder_for(Point).decode("t", data)
    assert env.payload == Point(1, 2)
    assert env.correlation_id == "c"
    assert env.topic == "sensors/t1"


def test_typed_decode_of_foreign_json() -> None:
    env = decoder_for(Point).decode("t", b'{"x": 5, "y": 6}')
    assert env.payload == Point(5, 6)
    assert env.topic == "t"


def test_typed_decode_nested() -> None:
    codec = Codec("json", "s")
    data = codec.encode_envelope(make(codec, {"name": "n", "points": [{"x": 1, "y": 2}]}))
    assert decoder_for(Nested).decode("t", data).payload == Nested("n", [Point(1, 2)])


@pytest.mark.parametrize("fmt", ["json", "msgpack"])
@pytest.mark.parametrize(
    ("payload", "path"),
    [
        ({"x": "one", "y": 2}, "$.x"),
        ({"x": 1}, "y"),
        ({"name": "n", "points": [{"x": 1, "y": 2}, {"x": 1, "y": "bad"}]}, "$.points[1].y"),
    ],
)
def test_typed_decode_mismatch_names_the_field(
    fmt: WireFormat, payload: dict[str, Any], path: str
) -> None:
    codec = Codec(fmt, "s")
    tp: type = Nested if "name" in payload else Point
    data = codec.encode_envelope(make(codec, payload))
    with pytest.raises(DecodeError) as info:
        decoder_for(tp).decode("sensors/t1", data)
    assert path in str(info.value)
    assert tp.__name__ in str(info.value)
    assert info.value.topic == "sensors/t1"


def test_typed_decode_mismatch_of_foreign_json() -> None:
    with pytest.raises(DecodeError, match=r"\$\.y") as info:
        decoder_for(Point).decode("in/t", b'{"x": 1, "y": [1]}')
    assert info.value.topic == "in/t"


def test_typed_decode_of_non_json_body() -> None:
    with pytest.raises(DecodeError, match="not JSON"):
        decoder_for(Point).decode("t", b"\xffnope")
    assert decoder_for(bytes).decode("t", b"\xffok").payload == b"\xffok"


def test_decoder_is_cached_per_type() -> None:
    assert decoder_for(Point) is decoder_for(Point)
    assert decoder_for() is decoder_for()
    assert decoder_for(Point) is not decoder_for(Nested)


# -- raw format: bare payload plus CloudEvents binary-mode headers --------------------------


def test_raw_payload_encoding() -> None:
    codec = Codec("raw", "s")
    assert codec.encode_payload({"a": 1}) == b'{"a":1}'
    assert codec.encode_payload(b"\x00raw") == b"\x00raw"
    assert codec.encode_payload("s") == b'"s"'


def test_raw_with_ce_headers_rebuilds_metadata() -> None:
    codec = Codec("raw", "urn:raw-src")
    env = make(
        codec,
        {"v": 1},
        headers={"app": "x"},
        correlation_id="corr-9",
        reply_to="_inbox/a/b",
        type="com.example.raw",
    )
    headers = codec.binary_headers(env)
    assert headers["ce-specversion"] == "1.0"
    # The NATS binding's names: every attribute ce-prefixed, datacontenttype included.
    assert headers["ce-datacontenttype"] == "application/json"
    assert headers["ce-subject"] == "sensors/t1"
    assert headers["ce-app"] == "x"  # a header is an extension attribute
    assert "content-type" not in headers
    body = codec.encode_payload(env.payload)
    assert body == b'{"v":1}'
    back = decoder_for().decode("sensors/t1", body, headers)
    assert back.id == env.id
    assert back.source == "urn:raw-src"
    assert back.type == "com.example.raw"
    assert back.correlation_id == "corr-9"
    assert back.reply_to == "_inbox/a/b"
    assert back.time == env.time
    assert back.payload == {"v": 1}
    assert back.headers == {"app": "x"}  # ce-* and content-type are metadata, not headers
    assert back == env


def test_raw_without_headers_is_a_bare_payload() -> None:
    codec = Codec("raw", "s")
    back = decoder_for().decode("t", codec.encode_payload([1, 2]), None)
    assert back.payload == [1, 2]
    assert back.source == ""
    assert back.correlation_id is None


def test_raw_headers_with_unparsable_time_still_decode() -> None:
    headers = {"ce-id": "id-1", "ce-source": "s", "ce-type": "t", "ce-time": "not a time"}
    env = decoder_for().decode("t", b"1", headers)
    assert env.id == "id-1"
    assert env.payload == 1
    assert env.time.tzinfo is not None
