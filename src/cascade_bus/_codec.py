"""Turning payloads into message bodies and bodies back into envelopes, with reused codecs.

Three wire formats: ``json`` (the envelope as CloudEvents structured JSON, the default),
``msgpack`` (the same envelope in MessagePack) and ``raw`` (just the payload; metadata travels
in native headers as CloudEvents binary-mode ``ce-*`` attributes where the transport has them).
Decoding never trusts the sender's format: our envelopes in either encoding, foreign bare JSON
and opaque bytes all arrive as envelopes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from functools import lru_cache, partial
from typing import Any, Literal, TypeAlias

import msgspec

from . import _envelope
from ._cloudevents import (
    encode_json,
    encode_msgpack,
    old_bytes,
    own_extended,
    split_members,
)
from ._cloudevents_binary import bare_envelope, binary_headers
from ._envelope import (
    BYTES_CONTENT_TYPE,
    DEFAULT_TYPE,
    JSON_CONTENT_TYPE,
    Envelope,
    new_id,
)
from ._errors import DecodeError, EncodeError, InvalidURL
from ._finite import check_finite
from ._stub import Stub, envelope_of

__all__ = ["Codec", "EnvelopeDecoder", "WireFormat"]

WireFormat: TypeAlias = Literal["json", "msgpack", "raw"]
FORMATS: tuple[WireFormat, ...] = ("json", "msgpack", "raw")

_json_encoder = msgspec.json.Encoder()
_json_encode = _json_encoder.encode
now_utc = _now = partial(datetime.now, UTC)
"""The current UTC time (an envelope's ``time``), without a Python frame."""
_msgpack_encoder = msgspec.msgpack.Encoder()
_json_any = msgspec.json.Decoder()
# First bytes of a MessagePack map (fixmap, map16, map32): how we tell msgpack from JSON.
_MSGPACK_MAP = frozenset([*range(0x80, 0x90), 0xDE, 0xDF])
_EMPTY: bytes = b""
_NULL = b"null"  # where msgspec writes a NaN or infinity in JSON (see _finite)
# How every JSON envelope we encode starts (the tag field comes first): a 60 ns check that
# spares our own messages the 200 ns search for "specversion" anywhere in the body.
_OWN_JSON = b'{"specversion":"1.0"'
_OWN_TAIL = b',"specversion":"1.0",'  # what follows our extension attributes


def local_payload_encoder(msgpack: bool) -> Callable[[Any], bytes]:
    """The encoder of `Codec.local`'s payload body, for a bus that inlines it."""
    return (_msgpack_encoder if msgpack else _json_encoder).encode


def check_format(value: object) -> WireFormat:
    """Validate a ``format`` option.

    Raises:
        InvalidURL: not one of json, msgpack, raw.
    """
    if value not in FORMATS:
        raise InvalidURL(f"format={value!r} is not one of {', '.join(FORMATS)}")
    return value


class Codec:
    """Encodes outgoing messages for one bus.

    Args:
        fmt: The wire format.
        source: The CloudEvents ``source`` stamped on every envelope.
    """

    __slots__ = ("fmt", "source")

    def __init__(self, fmt: WireFormat, source: str) -> None:
        self.fmt = fmt
        self.source = source

    def encode_payload(self, payload: Any, topic: str = "") -> bytes:
        """Encode just the payload (``raw`` format); bytes pass through unchanged.

        Raises:
            EncodeError: the payload is not encodable.
        """
        if isinstance(payload, bytes):
            return payload
        try:
            body = _json_encoder.encode(payload)
        except (TypeError, ValueError, OverflowError) as exc:
            raise EncodeError(
                f"cannot encode payload of type {type(payload).__name__}: {exc}"
            ) from None
        if body.partition(_NULL)[1]:  # a NaN would have become null: look closer (rarely)
            check_finite(payload, body, topic=topic)
        return body

    def envelope(
        self,
        topic: str,
        payload: Any,
        *,
        headers: Mapping[str, str] | None = None,
        correlation_id: str | None = None,
        reply_to: str | None = None,
        type: str | None = None,
    ) -> Envelope[Any]:
        """Build the envelope for an outgoing message."""
        if not (headers or correlation_id or reply_to):
            # Only what differs from the defaults, but `headers` explicitly: a literal {} is
            # cheaper than msgspec calling the default factory (~90 ns).
            if isinstance(payload, bytes):
                return Envelope(
                    id=_envelope.next_id(),
                    source=self.source,
                    type=type or DEFAULT_TYPE,
                    time=_now(),
                    topic=topic,
                    payload=payload,
                    content_type=BYTES_CONTENT_TYPE,
                    headers={},
                )
            return Envelope(
                id=_envelope.next_id(),
                source=self.source,
                type=type or DEFAULT_TYPE,
                time=_now(),
                topic=topic,
                payload=payload,
                headers={},
            )
        return Envelope(
            id=new_id(),
            source=self.source,
            type=type or DEFAULT_TYPE,
            time=datetime.now(UTC),
            topic=topic,
            payload=payload,
            content_type=BYTES_CONTENT_TYPE if isinstance(payload, bytes) else JSON_CONTENT_TYPE,
            headers=dict(headers) if headers else {},
            correlation_id=correlation_id,
            reply_to=reply_to,
        )

    def local(self, env: Envelope[Any]) -> tuple[Envelope[Any], bytes | None, bool]:
        """The in-process form of an envelope: it plus its payload encoded once (a copy source).

        Raises:
            EncodeError: the payload is not encodable.
        """
        payload = env.payload
        if type(payload) is bytes:
            return env, None, False  # immutable: subscribers may share it
        msgpack = self.fmt == "msgpack"
        try:
            body = (_msgpack_encoder if msgpack else _json_encoder).encode(payload)
        except (TypeError, ValueError, OverflowError) as exc:
            raise EncodeError(
                f"cannot encode payload of type {type(payload).__name__} for topic "
                f"{env.topic!r}: {exc}"
            ) from None
        check_finite(payload, body, msgpack=msgpack, topic=env.topic)
        return env, body, msgpack

    def encode_plain(self, topic: str, payload: Any) -> bytes:
        """`envelope` + `encode_envelope` in JSON for a payload that is not bytes, no metadata.

        Raises:
            EncodeError: the payload is not encodable.
        """
        try:
            body = _json_encode(
                Envelope(
                    id=_envelope.next_id(),
                    source=self.source,
                    type=DEFAULT_TYPE,
                    time=_now(),
                    topic=topic,
                    payload=payload,
                )
            )
        except (TypeError, ValueError, OverflowError) as exc:
            raise EncodeError(
                f"cannot encode payload of type {type(payload).__name__} for topic {topic!r}: {exc}"
            ) from None
        if body.partition(_NULL)[1]:  # a NaN would have become null: look closer (rarely)
            check_finite(payload, body, topic=topic)
        return body

    def encode_envelope(self, env: Envelope[Any], fmt: WireFormat | None = None) -> bytes:
        """Encode a whole envelope in ``fmt`` (default: this codec's format, raw → json).

        Raises:
            EncodeError: the payload is not encodable.
        """
        if fmt is None:
            fmt = self.fmt
        if env.retained:  # how it was received, not part of the message
            env = msgspec.structs.replace(env, retained=False)
        if fmt == "msgpack":
            try:
                body = encode_msgpack(env)
            except (TypeError, ValueError, OverflowError) as exc:
                raise _not_encodable(env, exc) from None
            check_finite(env.payload, body, msgpack=True, topic=env.topic)
            return body
        try:
            if not env.headers and type(env.payload) is not bytes:
                body = _json_encode(env)  # `encode_json`'s common case, inlined
            else:
                body = encode_json(env)
        except (TypeError, ValueError, OverflowError) as exc:
            raise _not_encodable(env, exc) from None
        if body.partition(_NULL)[1]:  # a NaN would have become null: look closer (rarely)
            check_finite(env.payload, body, topic=env.topic)
        return body

    binary_headers = staticmethod(binary_headers)


def _not_encodable(env: Envelope[Any], exc: Exception) -> EncodeError:
    """The error for an envelope msgspec could not encode."""
    return EncodeError(
        f"cannot encode payload of type {type(env.payload).__name__} for topic {env.topic!r}: {exc}"
    )


class EnvelopeDecoder:
    """Decodes received bodies into envelopes whose payload has one type (Any by default).

    Instances are cached per type (see `decoder_for`); msgspec decoders are reused.
    """

    __slots__ = (
        "_json",
        "_json_payload",
        "_msgpack",
        "_msgpack_payload",
        "_type",
        "_untyped",
        "untyped_json",
    )

    def __init__(self, tp: Any = Any) -> None:
        self._type = tp
        self._untyped = tp is Any
        self._json = msgspec.json.Decoder(Envelope[tp])
        self._msgpack = msgspec.msgpack.Decoder(Envelope[tp])
        self._json_payload = msgspec.json.Decoder(tp)
        self._msgpack_payload = msgspec.msgpack.Decoder(tp)
        # For an untyped subscription, `decode_local` of a JSON payload is just this decode
        # (plus the envelope copy): hot loops may inline it.
        self.untyped_json: Callable[[bytes], Any] | None = (
            self._json_payload.decode if self._untyped else None
        )

    def decode_local(self, local: tuple[Envelope[Any] | Stub, bytes | None, bool]) -> Envelope[Any]:
        """This subscription's own copy of an envelope published in this process.

        ``local[0]`` is the envelope, or a `Stub` (see `cascade_bus._stub`) that it is built from.

        Equal to decoding the full body, without encoding or parsing the metadata: only the
        payload is decoded (which also keeps subscribers from sharing mutable payloads).

        Raises:
            DecodeError: the payload does not fit the type.
        """
        env, body, is_msgpack = local
        stub = env if isinstance(env, tuple) else None  # a `Stub`: the envelope is built here
        topic = env[0] if isinstance(env, tuple) else env.topic
        if body is None:  # a bytes payload (never a stub's)
            assert not isinstance(env, tuple)
            if not (self._untyped or self._type is bytes):
                data = (encode_msgpack if is_msgpack else encode_json)(env)
                return self.decode(topic, data)
            payload: Any = env.payload
        else:
            try:
                payload = (self._msgpack_payload if is_msgpack else self._json_payload).decode(body)
            except (msgspec.ValidationError, msgspec.DecodeError) as exc:
                raise DecodeError(
                    f"payload on {topic!r} does not match {_type_name(self._type)}: {exc}",
                    topic=topic,
                ) from None
            if stub is not None:
                return envelope_of(stub, payload)
        assert not isinstance(env, tuple)
        headers = env.headers
        return msgspec.structs.replace(
            env, payload=payload, headers=dict(headers) if headers else {}
        )

    def decode(
        self, topic: str, data: bytes, headers: Mapping[str, str] | None = None
    ) -> Envelope[Any]:
        """Decode one body received on ``topic``.

        Raises:
            DecodeError: the body is an envelope whose payload does not fit the type, or a bare
                body that does not fit it.
        """
        if not data:
            return self._bare(topic, _EMPTY, headers, BYTES_CONTENT_TYPE)
        is_msgpack = data[0] in _MSGPACK_MAP
        if not is_msgpack and not data.startswith(_OWN_JSON):
            if b'"specversion"' not in data:
                return self._foreign(topic, data, headers)  # a CloudEvent names its version
            # Ours with extension attributes (they come first), or another producer's event.
            cut = data.find(_OWN_TAIL)
            own = own_extended(self._json.decode, topic, data, cut) if cut > 0 else None
            return own or self._slow(topic, data, headers, is_msgpack)
        try:
            env: Envelope[Any] = (self._msgpack if is_msgpack else self._json).decode(data)
        except (msgspec.ValidationError, msgspec.DecodeError):
            return self._slow(topic, data, headers, is_msgpack)
        if env.content_type == BYTES_CONTENT_TYPE and self._untyped and type(env.payload) is str:
            env = old_bytes(env)
        if not env.topic:  # a body's own subject wins (a forwarded event keeps its topic)
            env = msgspec.structs.replace(env, topic=topic)
        return env

    def _slow(
        self, topic: str, data: bytes, headers: Mapping[str, str] | None, is_msgpack: bool
    ) -> Envelope[Any]:
        """A body the fast decode refused (see `split_members`), or a foreign one."""
        try:
            members = (_members_msgpack if is_msgpack else _members_json).decode(data)
            known, ext, binary = split_members(members, is_msgpack, topic)
            shell = (_raw_envelope_msgpack if is_msgpack else _raw_envelope_json).decode(
                (_msgpack_encoder if is_msgpack else _json_encoder).encode(known)
            )
        except (msgspec.ValidationError, msgspec.DecodeError):
            return self._foreign(topic, data, headers)
        payload: Any = binary
        if binary is None and "data" in members:
            try:
                payload = (self._msgpack_payload if is_msgpack else self._json_payload).decode(
                    members["data"]
                )
            except (msgspec.ValidationError, msgspec.DecodeError) as exc:
                raise DecodeError(
                    f"payload on {topic!r} does not match {_type_name(self._type)}: {exc}",
                    topic=topic,
                ) from None
        env = msgspec.structs.replace(
            shell, payload=payload, headers=ext, topic=shell.topic or topic
        )
        if env.content_type == BYTES_CONTENT_TYPE and self._untyped and type(payload) is str:
            env = old_bytes(env)
        return env

    def _foreign(self, topic: str, data: bytes, headers: Mapping[str, str] | None) -> Envelope[Any]:
        """A body that is not an envelope: bare JSON from another client, or opaque bytes."""
        if (
            headers
            and BYTES_CONTENT_TYPE
            in (headers.get("ce-datacontenttype"), headers.get("content-type"))
            and (self._untyped or self._type is bytes)
        ):
            return self._bare(topic, data, headers, BYTES_CONTENT_TYPE)
        try:
            payload: Any = self._json_payload.decode(data)
        except msgspec.ValidationError as exc:
            raise DecodeError(
                f"payload on {topic!r} does not match {_type_name(self._type)}: {exc}", topic=topic
            ) from None
        except msgspec.DecodeError:
            if self._untyped or self._type is bytes:
                return self._bare(topic, data, headers, BYTES_CONTENT_TYPE)
            raise DecodeError(
                f"body on {topic!r} is not JSON and cannot become {_type_name(self._type)}",
                topic=topic,
            ) from None
        return self._bare(topic, payload, headers, JSON_CONTENT_TYPE)

    _bare = staticmethod(bare_envelope)


_members_json = msgspec.json.Decoder(dict[str, msgspec.Raw])
_members_msgpack = msgspec.msgpack.Decoder(dict[str, msgspec.Raw])
_raw_envelope_json = msgspec.json.Decoder(Envelope[msgspec.Raw])
_raw_envelope_msgpack = msgspec.msgpack.Decoder(Envelope[msgspec.Raw])


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or repr(tp)


@lru_cache(maxsize=256)
def decoder_for(tp: Any = Any) -> EnvelopeDecoder:
    """Return the shared decoder for payload type ``tp`` (built once per type)."""
    return EnvelopeDecoder(tp)
