"""CloudEvents binary mode: an envelope as the headers the protocol bindings define, and back.

The headers every transport is handed are the NATS binding's: ``ce-<attribute>`` for every
attribute, ``datacontenttype`` included, values percent-encoded (space, ``"``, ``%`` and
non-ASCII as UTF-8 ``%XX``). A transport whose binding differs translates them (MQTT 5:
attribute-named user properties and the Content Type property). Receiving takes either these
or HTTP-style ``content-type``, names case-insensitively, as the NATS binding asks.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, cast
from urllib.parse import quote, unquote

import msgspec

from ._cloudevents import (
    ENVELOPE_MEMBERS,
    HEADER_BAG,
    RESERVED,
    bag_decoder,
    is_extension_name,
    json_encode,
)
from ._envelope import Envelope, new_id
from ._errors import DecodeError

__all__ = [
    "WithId",
    "bare_envelope",
    "binary_headers",
    "decode_header_value",
    "encode_header_value",
    "static_binary_headers",
]

# What the NATS binding percent-encodes: space, '"', '%' and anything outside printable ASCII.
_NEEDS_ENCODING = re.compile(r'[^\x21-\x7e]|["%]')
_SAFE = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in '"%')
_QUOTED_PAIR = re.compile(r"\\(.)")


def encode_header_value(value: str) -> str:
    """Percent-encode an attribute value for a ``ce-`` header, as the NATS binding says."""
    return quote(value, safe=_SAFE) if _NEEDS_ENCODING.search(value) else value


def decode_header_value(value: str, name: str = "") -> str:
    """The attribute value of a ``ce-`` header: quoted strings unescaped, then percent-decoded.

    Raises:
        DecodeError: the percent-encoded bytes are not UTF-8 (the binding says reject them).
    """
    if len(value) > 1 and value[0] == '"' and value[-1] == '"':
        value = _QUOTED_PAIR.sub(r"\1", value[1:-1])
    if "%" not in value:
        return value
    try:
        return unquote(value, errors="strict")
    except UnicodeDecodeError:
        raise DecodeError(f"header {name or 'value'} {value!r} is not UTF-8 once decoded") from None


def binary_headers(env: Envelope[Any]) -> dict[str, str]:
    """The envelope as binary-mode headers: ``ce-`` attributes, then its other headers.

    A header that is not an attribute name travels as itself, unless it could be read as an
    attribute (a reserved name, ``ce-…``, ``content-type``): those go in ``ce-cascadeheaders``.
    """
    enc = encode_header_value
    out = {
        "ce-specversion": "1.0",
        "ce-id": enc(env.id),
        "ce-source": enc(env.source),
        "ce-type": enc(env.type),
        "ce-time": env.time.isoformat(),
        "ce-datacontenttype": enc(env.content_type),
    }
    if env.topic:
        out["ce-subject"] = enc(env.topic)
    if env.correlation_id is not None:
        out["ce-correlationid"] = enc(env.correlation_id)
    if env.reply_to is not None:
        out["ce-replyto"] = enc(env.reply_to)
    bag: dict[str, str] = {}
    for key, value in env.headers.items():
        if is_extension_name(key):
            out["ce-" + key] = enc(value)
            continue
        lower = key.lower()
        if lower in RESERVED or lower.startswith("ce-") or lower == "content-type":
            bag[key] = value
        else:
            out[key] = value
    if bag:
        out["ce-" + HEADER_BAG] = enc(json_encode(bag).decode())
    return out


class WithId(Mapping[str, str]):
    """Constant binary-mode headers plus one message's ``ce-id`` (the binding requires an id).

    A read-only mapping over ``base`` (the bus's constant headers, a `MappingProxyType`) and
    ``ce-id``: transports that frame ``base`` once (NATS, MQTT 5) add only the id per message.
    """

    __slots__ = ("base", "id")

    def __init__(self, base: Mapping[str, str], id: str) -> None:
        self.base = base
        self.id = id

    def __getitem__(self, key: str) -> str:
        if key == "ce-id":
            return self.id
        return self.base[key]

    def __iter__(self) -> Iterator[str]:
        yield from self.base
        yield "ce-id"

    def __len__(self) -> int:
        return len(self.base) + 1

    def __repr__(self) -> str:
        return f"WithId({dict(self)!r})"


def static_binary_headers(source: str, type: str, content_type: str | None) -> dict[str, str]:
    """The constant binary-mode headers of a bus's messages without per-message metadata."""
    out = {
        "ce-specversion": "1.0",
        "ce-source": encode_header_value(source),
        "ce-type": encode_header_value(type),
    }
    if content_type is not None:
        out["ce-datacontenttype"] = content_type
    return out


def read_binary_headers(
    headers: Mapping[str, str],
) -> tuple[dict[str, str], dict[str, str], str | None]:
    """Received headers as (attributes, other headers, the ``content-type`` header).

    ``ce-`` names are matched case-insensitively (NATS header names are) and their values
    decoded; ``ce-cascadeheaders`` is unpacked into the other headers. Shared read-only
    mappings (a transport's cached blocks, and the base of a `WithId`) are read once.

    Raises:
        DecodeError: a ``ce-`` value is not UTF-8 once percent-decoded.
    """
    kind = type(headers)
    if kind is WithId:
        with_id = cast(WithId, headers)
        base = with_id.base
        if type(base) is MappingProxyType and "ce-id" not in base:
            meta, own, content_type = _read_shared(base)
            msg_id = decode_header_value(with_id.id, "ce-id")
            return {**meta, "id": msg_id}, dict(own), content_type
    elif kind is MappingProxyType:
        meta, own, content_type = _read_shared(headers)
        return dict(meta), dict(own), content_type
    return _read(headers)


# `_read` of shared read-only mappings, by identity (the mapping is kept alive with it).
_SHARED: dict[int, tuple[Mapping[str, str], tuple[dict[str, str], dict[str, str], str | None]]]
_SHARED = {}


def _read_shared(
    headers: Mapping[str, str],
) -> tuple[dict[str, str], dict[str, str], str | None]:
    """`_read` once per shared mapping; callers copy the dicts before handing them on."""
    hit = _SHARED.get(id(headers))
    if hit is not None and hit[0] is headers:
        return hit[1]
    read = _read(headers)
    if len(_SHARED) >= 256:
        _SHARED.clear()
    _SHARED[id(headers)] = (headers, read)
    return read


def _read(headers: Mapping[str, str]) -> tuple[dict[str, str], dict[str, str], str | None]:
    meta: dict[str, str] = {}
    own: dict[str, str] = {}
    content_type: str | None = None
    for key, value in headers.items():
        lower = key.lower()
        if lower.startswith("ce-"):
            name = lower[3:]
            text = decode_header_value(value, key)
            if name in ENVELOPE_MEMBERS:
                meta[name] = text
            elif name == HEADER_BAG:
                try:
                    own.update(bag_decoder.decode(text))
                except (msgspec.ValidationError, msgspec.DecodeError):
                    own[name] = text
            else:
                own[name] = text
        elif lower == "content-type":
            content_type = value
        else:
            own[key] = value
    return meta, own, content_type


def bare_envelope(
    topic: str, payload: Any, headers: Mapping[str, str] | None, content_type: str
) -> Envelope[Any]:
    """Wrap a bare payload, taking its metadata from binary-mode headers if there are any.

    The topic it arrived on is the envelope's topic, unlike a structured body's ``subject``:
    headers get echoed (nats-py's ``respond`` sends the request's back with the reply), so a
    different ``ce-subject`` is kept as the header ``subject`` instead.

    Raises:
        DecodeError: a ``ce-`` value is not UTF-8 once percent-decoded.
    """
    if not headers:
        return Envelope(
            id=new_id(),
            source="",
            type="",
            time=datetime.now(UTC),
            topic=topic,
            payload=payload,
            content_type=content_type,
        )
    meta, own, header_type = read_binary_headers(headers)
    when = None
    if "time" in meta:
        with contextlib.suppress(ValueError):
            when = datetime.fromisoformat(meta["time"])
    subject = meta.get("subject", topic)
    if subject != topic:
        own["subject"] = subject
    if payload != b"":  # an empty body (a clear) keeps its own content type
        if "datacontenttype" in meta:
            content_type = meta["datacontenttype"]
        elif header_type and not header_type.startswith("application/cloudevents"):
            content_type = header_type
    return Envelope(
        id=meta.get("id") or new_id(),
        source=meta.get("source", ""),
        type=meta.get("type", ""),
        time=when or datetime.now(UTC),
        topic=topic,
        payload=payload,
        content_type=content_type,
        headers=own,
        correlation_id=meta.get("correlationid"),
        reply_to=meta.get("replyto"),
    )
