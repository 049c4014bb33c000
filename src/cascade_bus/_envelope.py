"""The `Envelope`: one message with its metadata, laid out as a CloudEvents 1.0 structured event."""

from __future__ import annotations

import base64
import binascii
import itertools
import os
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

import msgspec

from ._cloudevents import encode_json, extensions
from ._errors import DecodeError

__all__ = ["Envelope", "new_id"]

T = TypeVar("T")

JSON_CONTENT_TYPE = "application/json"
BYTES_CONTENT_TYPE = "application/octet-stream"
DEFAULT_TYPE = "cascade_bus.message"


def _id_source() -> Callable[[], str]:
    """A fresh id sequence: a random per-process prefix and a counter, joined in C.

    Much cheaper than `uuid.uuid4` on the publish path (no Python frame per id).
    """
    return map(f"{os.urandom(6).hex()}-".__add__, map(str, itertools.count(1))).__next__


next_id = _id_source()
"""Return a message id unique across processes (hot paths read it as a module attribute)."""


def _reseed_ids() -> None:
    # A forked child would otherwise repeat its parent's ids.
    global next_id
    next_id = _id_source()


os.register_at_fork(after_in_child=_reseed_ids)


def new_id() -> str:
    """Return a message id unique across processes: a random per-process prefix and a counter."""
    return next_id()


class Envelope(
    msgspec.Struct,
    Generic[T],
    frozen=True,
    kw_only=True,
    omit_defaults=True,
    tag_field="specversion",
    tag="1.0",
    # Extension attributes are not fields: a body with any goes to the codec's slow path,
    # which turns them into headers (see _cloudevents.py).
    forbid_unknown_fields=True,
):
    """A message and its metadata; encodes as a CloudEvents 1.0 structured JSON event.

    The wire names follow CloudEvents (``data``, ``datacontenttype``, ``subject`` for the
    topic, ``correlationid``, ``replyto``) so any CloudEvents or JSON tool can read the body;
    the Python names are the ones DESIGN.md promises. Headers travel as extension attributes
    (see ``docs/cloudevents.md``); encode with the bus's codec, which maps them, not msgspec alone.

    Attributes:
        id: Unique message id (CloudEvents ``id``).
        source: Who published it (CloudEvents ``source``), the bus's ``source`` option.
        type: What kind of event it is (CloudEvents ``type``).
        time: When it was published (UTC).
        topic: The concrete topic it was published to (or received on).
        payload: The message body, decoded (CloudEvents ``data``).
        content_type: Media type of the payload (CloudEvents ``datacontenttype``).
        headers: Application headers (string to string).
        correlation_id: Ties a reply to its request.
        reply_to: The topic a responder should publish its reply to.
        retained: True when this is a retained message the broker replayed (on subscribe or
            after a reconnect), False when it is live. Set on receipt from the transport's
            `Message.retained`; never sent on the wire.
    """

    id: str
    source: str
    type: str
    time: datetime = msgspec.field(default_factory=lambda: datetime.now(UTC))
    topic: str = msgspec.field(default="", name="subject")
    payload: T = msgspec.field(default=None, name="data")  # type: ignore[assignment]
    content_type: str = msgspec.field(default=JSON_CONTENT_TYPE, name="datacontenttype")
    headers: dict[str, str] = msgspec.field(default_factory=dict)
    correlation_id: str | None = msgspec.field(default=None, name="correlationid")
    reply_to: str | None = msgspec.field(default=None, name="replyto")
    retained: bool = False

    @property
    def is_clear(self) -> bool:
        """True for an empty body: on a retained topic that clears the retained message."""
        return self.payload == b""

    def to_cloudevent(self) -> dict[str, Any]:
        """Return this envelope as a CloudEvents 1.0 structured-mode JSON object (a dict).

        Headers with attribute names (lower-case letters and digits) become extension
        attributes, the others one ``cascadeheaders`` attribute (a JSON object as a string);
        bytes payloads use ``data_base64``: the same members as the JSON body.
        """
        env = msgspec.structs.replace(self, retained=False) if self.retained else self
        event: dict[str, Any] = msgspec.json.decode(encode_json(env))
        event.setdefault("datacontenttype", self.content_type)
        return event

    @classmethod
    def from_cloudevent(cls, event: dict[str, Any]) -> Envelope[Any]:
        """Build an envelope from a CloudEvents 1.0 structured-mode object (a dict).

        Extension attributes become headers (``cascadeheaders`` unpacked; other than string
        values as their canonical strings).

        Raises:
            DecodeError: a required attribute (id, source, type) is missing or the spec version
                is not 1.0.
        """
        if event.get("specversion") != "1.0":
            raise DecodeError(
                f"not a CloudEvents 1.0 event (specversion={event.get('specversion')!r})"
            )
        missing = [k for k in ("id", "source", "type") if not event.get(k)]
        if missing:
            raise DecodeError(f"CloudEvent lacks required attribute(s): {', '.join(missing)}")
        headers = extensions(event)
        time_text = event.get("time")
        try:
            when = (
                datetime.fromisoformat(time_text.replace("Z", "+00:00"))
                if isinstance(time_text, str)
                else datetime.now(UTC)
            )
        except ValueError as exc:
            raise DecodeError(f"CloudEvent time {time_text!r} is not RFC 3339") from exc
        if "data_base64" in event:
            try:
                payload: Any = base64.b64decode(event["data_base64"], validate=True)
            except (binascii.Error, TypeError, ValueError) as exc:
                raise DecodeError(f"CloudEvent data_base64 is not valid base64: {exc}") from None
            content_type = event.get("datacontenttype", BYTES_CONTENT_TYPE)
        else:
            payload = event.get("data")
            content_type = event.get("datacontenttype", JSON_CONTENT_TYPE)
        return Envelope(
            id=str(event["id"]),
            source=str(event["source"]),
            type=str(event["type"]),
            time=when,
            topic=str(event.get("subject", "")),
            payload=payload,
            content_type=content_type,
            headers=headers,
            correlation_id=event.get("correlationid"),
            reply_to=event.get("replyto"),
        )
