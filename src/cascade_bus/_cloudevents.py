"""The CloudEvents 1.0 mapping of an envelope: structured mode, the JSON event format.

Structured mode (the JSON event format): the topic is ``subject``; a header whose name is an
attribute name (``[a-z0-9]+``, not one the spec or the envelope uses) is an extension
attribute; every other header travels, as a JSON object in a string, in the one extension
attribute ``cascadeheaders``, so nothing is lost and any CloudEvents reader accepts the body.
Binary data is ``data_base64``.

Binary mode (the bindings' headers) is in `_cloudevents_binary`.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import re
from collections.abc import Callable, Mapping
from datetime import datetime
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final

import msgspec

from ._errors import DecodeError

if TYPE_CHECKING:
    from ._envelope import Envelope

__all__ = [
    "HEADER_BAG",
    "STRUCTURED_CONTENT_TYPE",
    "STRUCTURED_HEADERS",
    "is_extension_name",
]

STRUCTURED_CONTENT_TYPE: Final = "application/cloudevents+json"
#: The transport headers of a structured JSON body (one shared mapping: adapters may cache by id).
STRUCTURED_HEADERS: Final[Mapping[str, str]] = MappingProxyType(
    {"content-type": STRUCTURED_CONTENT_TYPE}
)
#: The extension attribute holding the headers that cannot be attributes (a JSON object text).
HEADER_BAG: Final = "cascadeheaders"
#: Members an envelope decodes itself (the wire names of its fields).
ENVELOPE_MEMBERS: Final = frozenset(
    {
        "specversion",
        "id",
        "source",
        "type",
        "time",
        "subject",
        "data",
        "datacontenttype",
        "correlationid",
        "replyto",
    }
)
#: Names a header may not take as an extension attribute: the spec's and the envelope's own.
RESERVED: Final = ENVELOPE_MEMBERS | {"dataschema", "data_base64", HEADER_BAG}
_ATTRIBUTE_NAME = re.compile(r"[a-z0-9]+")
json_encode = msgspec.json.Encoder().encode
_msgpack_encode = msgspec.msgpack.Encoder().encode
bag_decoder = msgspec.json.Decoder(dict[str, str])
_json_any = msgspec.json.Decoder()
_msgpack_any = msgspec.msgpack.Decoder()
_OCTETS_JSON = msgspec.Raw(b'"application/octet-stream"')
_OCTETS_MSGPACK = msgspec.Raw(_msgpack_encode("application/octet-stream"))


def is_extension_name(name: str) -> bool:
    """True if ``name`` can be a CloudEvents extension attribute of an envelope."""
    known = _NAMES.get(name)
    if known is None:
        if len(_NAMES) >= 4096:  # header names repeat: a small bounded cache
            _NAMES.clear()
        known = _NAMES[name] = name not in RESERVED and _ATTRIBUTE_NAME.fullmatch(name) is not None
    return known


_NAMES: dict[str, bool] = {}


def _members(env: Envelope[Any], binary: bool) -> tuple[Envelope[Any], dict[str, Any]]:
    """The envelope without what needs its own members, and those members."""
    extra: dict[str, Any] = {}
    bag: dict[str, str] | None = None
    for key, value in env.headers.items():
        known = _NAMES.get(key)
        if known is None:
            known = is_extension_name(key)
        if known:
            extra[key] = value
        elif bag is None:
            bag = {key: value}
        else:
            bag[key] = value
    if bag:
        extra[HEADER_BAG] = json_encode(bag).decode()
    if binary:
        extra["data_base64"] = base64.b64encode(env.payload).decode()
        return msgspec.structs.replace(env, headers={}, payload=None), extra
    return msgspec.structs.replace(env, headers={}), extra


def encode_json(env: Envelope[Any]) -> bytes:
    """The structured-mode JSON body of an envelope (the JSON event format).

    Raises:
        TypeError, ValueError, OverflowError: the payload is not encodable (msgspec's own).
    """
    binary = type(env.payload) is bytes
    if not (env.headers or binary):
        return json_encode(env)
    base, extra = _members(env, binary)
    # The extra members first: a body that does not start with specversion is known to need
    # the decoder's slow path without trying the fast one.
    return json_encode(extra)[:-1] + b"," + json_encode(base)[1:]


def encode_msgpack(env: Envelope[Any]) -> bytes:
    """The envelope in MessagePack, headers mapped as in JSON (bytes stay MessagePack bin)."""
    if not env.headers:
        return _msgpack_encode(env)
    base, extra = _members(env, False)
    fields = msgspec.to_builtins(base, builtin_types=(bytes, bytearray, memoryview, datetime))
    fields.update(extra)
    return _msgpack_encode(fields)


def extensions(members: Mapping[str, Any]) -> dict[str, str]:
    """The headers of a decoded structured event: its extension attributes (and old forms).

    Non-string attribute values become their canonical strings (``true``, ``5``); a null is
    unset. ``cascadeheaders`` is unpacked; an old body's ``headers`` object is merged.

    Raises:
        DecodeError: ``headers`` (old form) is not an object of strings.
    """
    out: dict[str, str] = {}
    for key, value in members.items():
        if key in ENVELOPE_MEMBERS or key == "data_base64":
            continue
        if type(value) is str and key != HEADER_BAG:
            out[key] = value
        elif value is not None:
            try:
                _extension(key, value, out)
            except msgspec.DecodeError as exc:
                raise DecodeError(str(exc)) from None
    return out


def decode_base64(text: Any, topic: str) -> bytes:
    """The bytes of a ``data_base64`` member.

    Raises:
        DecodeError: not a base64 string.
    """
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, TypeError, ValueError) as exc:
        raise DecodeError(
            f"CloudEvent on {topic!r} has bad data_base64: {exc}", topic=topic
        ) from None


def split_members(
    members: dict[str, msgspec.Raw], is_msgpack: bool, topic: str
) -> tuple[dict[str, msgspec.Raw], dict[str, str], bytes | None]:
    """A structured body's members as (envelope members but data, headers, data_base64 bytes).

    For a body the envelope cannot decode alone: one with extension attributes or
    ``data_base64``, or from before the mapping (``topic``, a ``headers`` object). One loop:
    this is the receive path of every message with headers.

    Raises:
        msgspec.DecodeError: a member is not valid JSON / MessagePack (a foreign body).
        DecodeError: ``data_base64`` is not base64.
    """
    known: dict[str, msgspec.Raw] = {}
    headers: dict[str, str] = {}
    binary: Any = None
    decode = (_msgpack_any if is_msgpack else _json_any).decode
    for key, raw in members.items():
        if key in ENVELOPE_MEMBERS:
            if key != "data":
                known[key] = raw
            continue
        if key == "data_base64":
            binary = decode(raw)
        elif key == "topic" and "subject" not in members:  # a body from before the mapping
            known["subject"] = raw
        else:
            value = decode(raw)
            if type(value) is str and key != HEADER_BAG:
                headers[key] = value
            elif value is not None:
                _extension(key, value, headers)
    if binary is None:
        return known, headers, None
    if "datacontenttype" not in known:  # binary data of no declared type
        known["datacontenttype"] = _OCTETS_MSGPACK if is_msgpack else _OCTETS_JSON
    return known, headers, decode_base64(binary, topic)


def own_extended(
    decode: Callable[[bytes], Envelope[Any]], topic: str, data: bytes, cut: int
) -> Envelope[Any] | None:
    """Our JSON body with extension attributes: string members, then the envelope's own.

    ``cut`` is where ``,"specversion":"1.0",`` first occurs: a quote inside a JSON string is
    escaped, so in our body it ends the string members. Two fast decodes instead of the slow
    path's generic one; None if this is not such a body (the slow path then reads it).

    Raises:
        DecodeError: ``data_base64`` is not base64.
    """
    try:
        extra = bag_decoder.decode(data[:cut] + b"}")
        env = decode(b"{" + data[cut + 1 :])
    except (msgspec.ValidationError, msgspec.DecodeError):
        return None
    if not ENVELOPE_MEMBERS.isdisjoint(extra):  # someone else's order: not ours
        return None
    binary = extra.pop("data_base64", None)
    bag = extra.pop(HEADER_BAG, None)
    if bag is not None:
        _extension(HEADER_BAG, bag, extra)
    if binary is not None:
        env = msgspec.structs.replace(env, payload=decode_base64(binary, topic))
    return msgspec.structs.replace(env, headers=extra, topic=env.topic or topic)


def _extension(key: str, value: Any, headers: dict[str, str]) -> None:
    """An extension attribute that is not a plain string, as headers."""
    if key == "headers" and type(value) is dict:  # a body from before the mapping
        if not all(type(v) is str for v in value.values()):
            raise msgspec.DecodeError("envelope headers must be strings")
        headers.update(value)
    elif key == HEADER_BAG and type(value) is str:
        try:
            headers.update(bag_decoder.decode(value))
        except (msgspec.ValidationError, msgspec.DecodeError):
            headers[key] = value  # not ours after all: keep it as it came
    elif type(value) is bool:
        headers[key] = "true" if value else "false"
    else:
        headers[key] = json_encode(value).decode()


def old_bytes(env: Envelope[Any]) -> Envelope[Any]:
    """Bytes an older JSON body carried as base64 text in ``data``, given back as bytes."""
    with contextlib.suppress(binascii.Error, ValueError):  # not base64: keep the text
        return msgspec.structs.replace(env, payload=base64.b64decode(env.payload, validate=True))
    return env
