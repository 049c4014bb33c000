"""MQTT packets of the hot path, encoded and decoded here (paho keeps the rest of the protocol).

PUBLISH out (`_publish_packet`), PUBLISH in (`_parse_publish`), remaining lengths, MQTT 5
property blocks (`encode_props`), the checked topic cache (`TopicHeads`) and the merging of
paho's write queue into one ``send`` (`_coalesce`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import paho.mqtt.client as paho_mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from cascade_bus import EncodeError
from cascade_bus.spi import WithId

from ._cloudevents import STRUCTURED_PREFIX, to_properties

#: Topics under this prefix are the adapter's own (subscribe barriers); never delivered.
RESERVED_PREFIX = "_cascade_bus/"
#: MQTT 5 user property (value ``"1"``) on every retained publish of a cascade-bus bus, clears
#: and the retained will included. The broker sends a subscriber that is already subscribed the
#: live copy with the RETAIN flag off (no Retain As Published), so without it a receiver could
#: not tell a retained value set while it listened from a plain message; with it the message
#: arrives as ``Message(retain=True)`` and its subscription tracks the topic for a resync. The
#: property is removed on receipt (never in an envelope's headers) and dropped from the headers
#: of a publish that is not retained. MQTT 3.1.1 has no user properties: there it is not sent.
RETAIN_PROPERTY = "cb-retain"
_MAX_PAYLOAD = 268_435_455  # MQTT's largest remaining length
_COALESCE_BYTES = 64 * 1024  # at most this much of paho's queue goes into one send
_NO_MATCHING_SUBSCRIBERS = 0x10  # MQTT 5 PUBACK/PUBREC reason code (a success code)
_PUBLISH, _PUBACK, _PUBREC, _PUBREL, _PUBCOMP = 0x30, 0x40, 0x50, 0x60, 0x70
_TOPIC_CACHE = 4096  # encoded topics kept (cleared when full)


def _marker_props(kind: int) -> Properties:
    """Properties (of packet type ``kind``) carrying just the `RETAIN_PROPERTY` marker."""
    props = Properties(kind)  # type: ignore[no-untyped-call]
    props.UserProperty = [(RETAIN_PROPERTY, "1")]
    return props


# The PUBLISH property block of a retained publish without headers (MQTT 5).
_RETAIN_PROPS: bytes = _marker_props(PacketTypes.PUBLISH).pack()  # type: ignore[no-untyped-call]
_NO_PROPS = b"\x00"


def _props(pairs: list[tuple[str, str]], content_type: str | None) -> bytes:
    """A property block: Content Type, then the user properties (paho's ``pack`` costs ~40 µs).

    Raises:
        EncodeError: a name or value longer than an MQTT string (65,535 bytes of UTF-8).
    """
    if not pairs and content_type is None:
        return _NO_PROPS
    body = _props_body(pairs, content_type)
    return _remaining(len(body)) + body


def _props_body(pairs: list[tuple[str, str]], content_type: str | None) -> bytes:
    """`_props` without its length prefix."""
    parts = [b"\x03" + _string(content_type)] if content_type is not None else []
    parts += [b"\x26" + _string(key) + _string(value) for key, value in pairs]
    return b"".join(parts)


def _string(text: str) -> bytes:
    """An MQTT UTF-8 string: two bytes of length, then the text."""
    raw = text.encode()
    if len(raw) > 0xFFFF:
        raise EncodeError(f"MQTT 5 property {text[:40]!r}... is over 65,535 bytes")
    return len(raw).to_bytes(2, "big") + raw


# Blocks of read-only header mappings passed again and again (the bus's constant ones: a
# structured body's Content Type, raw format's attributes): packed once, found by identity.
_PACKED: dict[tuple[int, bool], tuple[Mapping[str, str], bytes]] = {}


def encode_props(headers: Mapping[str, str] | None, retain: bool) -> bytes:
    """The MQTT 5 PUBLISH property block: ``headers`` as the CloudEvents MQTT binding says.

    ``ce-`` attributes become user properties named after the attribute, ``datacontenttype``
    and a structured body's ``content-type`` the Content Type (see `_cloudevents`). A retained
    publish (a clear too) also carries the `RETAIN_PROPERTY` marker; a marker among
    ``headers`` is never sent as given (only ``retain`` decides it).
    """
    if not headers:
        return _RETAIN_PROPS if retain else _NO_PROPS
    if type(headers) is WithId:  # constant attributes packed once, plus this message's id
        hit = _BODIES.get((id(headers.base), retain))
        body = hit[1] if hit is not None and hit[0] is headers.base else _base_body(headers, retain)
        body += b"\x26\x00\x02id" + _string(headers.id)
        return _remaining(len(body)) + body
    constant = type(headers) is MappingProxyType
    if constant:
        hit = _PACKED.get((id(headers), retain))
        if hit is not None and hit[0] is headers:
            return hit[1]
    pairs, content_type = to_properties(headers)
    pairs = [item for item in pairs if item[0] != RETAIN_PROPERTY]
    if retain:
        pairs.append((RETAIN_PROPERTY, "1"))
    packed = _props(pairs, content_type)
    if constant:
        if len(_PACKED) >= 64:
            _PACKED.clear()
        _PACKED[id(headers), retain] = (headers, packed)
    return packed


# `WithId`'s constant part, packed once per (base, retain) without the length prefix.
_BODIES: dict[tuple[int, bool], tuple[Mapping[str, str], bytes]] = {}


def _base_body(headers: WithId, retain: bool) -> bytes:
    pairs, content_type = to_properties(headers.base)
    pairs = [item for item in pairs if item[0] not in (RETAIN_PROPERTY, "id")]
    if retain:
        pairs.append((RETAIN_PROPERTY, "1"))
    body = _props_body(pairs, content_type)
    if len(_BODIES) >= 64:
        _BODIES.clear()
    _BODIES[id(headers.base), retain] = (headers.base, body)
    return body


class TopicHeads(dict[str, bytes]):
    """Topics as a PUBLISH carries them (length-prefixed UTF-8), checked once and cached."""

    def head(self, topic: str) -> bytes:
        """The head of ``topic``, from the cache or checked and added.

        Raises:
            ValueError: empty, a wildcard, or longer than MQTT allows.
        """
        head = self.get(topic)
        if head is not None:
            return head
        raw = topic.encode()
        if not raw:
            raise ValueError("Invalid topic.")
        if b"+" in raw or b"#" in raw:
            raise ValueError("Publish topic cannot contain wildcards.")
        if len(raw) > 0xFFFF:
            raise ValueError("Publish topic is too long.")
        if len(self) >= _TOPIC_CACHE:
            self.clear()
        head = self[topic] = len(raw).to_bytes(2, "big") + raw
        return head


class _PublishedInfos:
    """Completes the QoS 0 publishes merged into one write (see `_coalesce`)."""

    __slots__ = ("infos",)

    def __init__(self, infos: list[paho_mqtt.MQTTMessageInfo]) -> None:
        self.infos = infos

    def _set_as_published(self) -> None:
        for info in self.infos:
            info._set_as_published()


def _coalesce(out: deque[Any]) -> None:
    """Merge the packets paho queued into one buffer, so that a burst costs one ``send``.

    paho writes each packet with its own ``send`` call (with TCP_NODELAY, its own TCP
    segment too), and on loopback that system call is the largest single cost of a publish.
    After a packet is fully written paho does something for two kinds only: a QoS 0 PUBLISH
    (``on_publish`` and its ``MQTTMessageInfo`` marked published) and DISCONNECT. So packets up
    to the first DISCONNECT become one QoS 0 PUBLISH entry with mid 0 (never a real one: paho
    numbers from 1), whose completion marks every merged QoS 0 publish published; our
    ``_on_publish`` ignores mid 0. A packet already partly written keeps its position; a
    burst stops at ``_COALESCE_BYTES`` so a retry after a short write copies little.
    """
    parts: list[bytes | bytearray | memoryview] = []
    infos: list[paho_mqtt.MQTTMessageInfo] = []
    size = 0
    taken = 0
    for packet in out:
        if packet["command"] & 0xF0 == paho_mqtt.DISCONNECT:
            break
        data = packet["packet"]
        pos = packet["pos"]
        chunk = memoryview(data)[pos:] if pos else data
        if taken and size + len(chunk) > _COALESCE_BYTES:
            break
        parts.append(chunk)
        size += len(chunk)
        taken += 1
        if packet["command"] & 0xF0 == paho_mqtt.PUBLISH and packet["qos"] == 0:
            info = packet["info"]
            if info is not None:
                infos.append(info)
    if taken < 2:
        return
    for _ in range(taken):
        out.popleft()
    merged = b"".join(parts)
    out.appendleft(
        {
            # Completed as a QoS 0 PUBLISH only when it carries some (on_publish, mid 0).
            "command": paho_mqtt.PUBLISH if infos else 0,
            "mid": 0,
            "qos": 0,
            "pos": 0,
            "to_process": len(merged),
            "packet": merged,
            "info": _PublishedInfos(infos),
        }
    )


def _remaining(size: int) -> bytes:
    """MQTT's variable-length encoding of a packet's remaining length."""
    out = bytearray()
    while True:
        byte, size = size & 0x7F, size >> 7
        if size:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _publish_packet(
    head: bytes, data: bytes, qos: int, retain: bool, props: bytes, mid: int
) -> bytes:
    """A whole PUBLISH packet; ``head`` is the length-prefixed topic (see `TopicHeads`)."""
    size = len(head) + len(props) + len(data)
    first = _PUBLISH | qos << 1 | retain
    if qos:
        size += 2
        fixed = bytes((first, size)) if size < 128 else bytes((first,)) + _remaining(size)
        return b"".join((fixed, head, mid.to_bytes(2, "big"), props, data))
    fixed = bytes((first, size)) if size < 128 else bytes((first,)) + _remaining(size)
    return b"".join((fixed, head, props, data))


def _opaque(packet: bytes | memoryview, pos: int = 0) -> dict[str, Any]:
    """An entry for paho's write queue that paho writes and otherwise ignores (command 0).

    paho acts after writing two kinds of packet only (a QoS 0 PUBLISH: its ``on_publish``; a
    DISCONNECT); ours must be neither.
    """
    return {
        "command": 0,
        "mid": 0,
        "qos": 0,
        "pos": pos,
        "to_process": len(packet) - pos,
        "packet": packet,
        "info": None,
    }


class _Malformed(Exception):
    """The broker sent bytes that are not an MQTT packet."""


def _remaining_length(data: bytes | bytearray, at: int, end: int) -> tuple[int, int]:
    """Decode a remaining length at ``at``: (length, where the packet body starts).

    The start is -1 when the length is not all there yet.
    """
    length = 0
    shift = 0
    for index in range(at, min(at + 4, end)):
        byte = data[index]
        length |= (byte & 0x7F) << shift
        if byte < 0x80:
            return length, index + 1
        shift += 7
    if end - at >= 4:
        raise _Malformed("remaining length longer than 4 bytes")
    return 0, -1


# The property block of the last PUBLISH read without headers, and its subscription ids: the
# next message usually carries the same block (no user properties to read anew).
_LAST_PROPS: list[Any] = [b"\x00", None]

_Received = tuple[str, bytes, int, int, bool, bool, "dict[str, str] | None", "list[int] | None"]


def _parse_publish(
    command: int, data: bytes | bytearray, start: int, stop: int, v5: bool
) -> _Received | None:
    """Decode a QoS 0 or 1 PUBLISH: topic, payload, qos, mid, dup, retain, headers, ids.

    None for anything unusual (a malformed or non-UTF-8 topic, an MQTT 5 property we do not
    read): paho then decodes it as before. Of the properties, the user properties (headers)
    and subscription identifiers are read; the ones we ignore are skipped.
    """
    qos = (command >> 1) & 3
    at = start + 2
    if at > stop:
        return None
    end = at + (data[start] << 8 | data[start + 1])
    if end > stop or end == at:
        return None
    try:
        topic = data[at:end].decode()
    except UnicodeDecodeError:
        return None
    mid = 0
    if qos:
        if end + 2 > stop:
            return None
        mid = data[end] << 8 | data[end + 1]
        end += 2
    headers: dict[str, str] | None = None
    ids: list[int] | None = None
    if v5:
        try:
            size, at = _remaining_length(data, end, stop)
        except _Malformed:
            return None
        end = at + size
        if at < 0 or end > stop:
            return None
        block_start = at
        last = _LAST_PROPS[0]
        if len(last) == size and data.startswith(last, at):
            at = end  # the same properties as the last message's (a structured body, one id)
            ids = _LAST_PROPS[1]
        else:
            block_start = -1
        while at < end:
            ident = data[at]
            at += 1
            if ident == 0x0B:  # subscription identifier
                try:
                    value, at = _remaining_length(data, at, end)
                except _Malformed:
                    return None
                if at < 0:
                    return None
                if ids is None:
                    ids = [value]
                else:
                    ids.append(value)
            elif ident == 0x26:  # user property: two UTF-8 strings
                if at + 2 > end:
                    return None
                key_end = at + 2 + (data[at] << 8 | data[at + 1])
                if key_end + 2 > end:
                    return None
                value_end = key_end + 2 + (data[key_end] << 8 | data[key_end + 1])
                if value_end > end:
                    return None
                try:
                    key = data[at + 2 : key_end].decode()
                    value_text = data[key_end + 2 : value_end].decode()
                except UnicodeDecodeError:
                    return None
                if headers is None:
                    headers = {}
                headers[key] = value_text
                at = value_end
            elif ident == 0x01:  # payload format indicator
                at += 1
            elif ident == 0x02:  # message expiry interval
                at += 4
            elif ident == 0x03:  # content type: a structured body's, or datacontenttype
                if at + 2 > end:
                    return None
                value_end = at + 2 + (data[at] << 8 | data[at + 1])
                if value_end > end:
                    return None
                try:
                    value_text = data[at + 2 : value_end].decode()
                except UnicodeDecodeError:
                    return None
                if not value_text.startswith(STRUCTURED_PREFIX):  # the body says it all
                    if headers is None:
                        headers = {}
                    headers["content-type"] = value_text
                at = value_end
            elif ident in (0x08, 0x09):  # response topic, correlation data
                if at + 2 > end:
                    return None
                at += 2 + (data[at] << 8 | data[at + 1])
            else:  # a topic alias, or anything else: paho's
                return None
        if at != end:
            return None
        if block_start < 0 and headers is None and size:  # read anew: kept for the next
            _LAST_PROPS[:] = [bytes(data[end - size : end]), ids]
    return (
        topic,
        bytes(data[end:stop]),
        qos,
        mid,
        bool(command & 0x08),
        bool(command & 0x01),
        headers,
        ids,
    )
