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
):
    """A message and its metadata; encodes as a CloudEvents 1.0 structured JSON event.

    The wire names follow CloudEvents (``data``, ``datacontenttype``, ``correlationid``,
    ``replyto``) so any CloudEvents or JSON tool can read the body; the Python names are the
    ones DESIGN.md promises. ``topic`` and ``headers`` are cascade-bus extension attributes.

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
    """

    id: str
    source: str
    type: str
    time: datetime = msgspec.field(default_factory=lambda: datetime.now(UTC))
    topic: str = ""
    payload: T = msgspec.field(default=None, name="data")  # type: ignore[assignment]
    content_type: str = msgspec.field(default=JSON_CONTENT_TYPE, name="datacontenttype")
    headers: dict[str, str] = msgspec.field(default_factory=dict)
    correlation_id: str | None = msgspec.field(default=None, name="correlationid")
    reply_to: str | None = msgspec.field(default=None, name="replyto")

    @property
    def is_clear(self) -> bool:
        """True for an empty body: on a retained topic that clears the retained message."""
        return self.payload == b""

    def to_cloudevent(self) -> dict[str, Any]:
        """Return this envelope as a CloudEvents 1.0 structured-mode JSON object (a dict).

        Headers become extension attributes when their names are valid CloudEvents attribute
        names (lower-case letters and digits); bytes payloads use ``data_base64``.
        """
        event: dict[str, Any] = {
            "specversion": "1.0",
            "id": self.id,
            "source": self.source,
            "type": self.type,
            "time": self.time.isoformat().replace("+00:00", "Z"),
            "datacontenttype": self.content_type,
        }
        if self.topic:
            event["subject"] = self.topic
        if self.correlation_id is not None:
            event["correlationid"] = self.correlation_id
        if self.reply_to is not None:
            event["replyto"] = self.reply_to
        for key, value in self.headers.items():
            if key.isalnum() and key.islower() and key.isascii() and key not in event:
                event[key] = value
        payload: Any = self.payload
        if isinstance(payload, bytes | bytearray | memoryview):
            event["data_base64"] = base64.b64encode(bytes(payload)).decode()
        else:
            event["data"] = msgspec.to_builtins(payload)
        return event

    @classmethod
    def from_cloudevent(cls, event: dict[str, Any]) -> Envelope[Any]:
        """Build an envelope from a CloudEvents 1.0 structured-mode object (a dict).

        Unknown extension attributes with string values become headers.

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
        known = {
            "specversion",
            "id",
            "source",
            "type",
            "time",
            "datacontenttype",
            "subject",
            "correlationid",
            "replyto",
            "data",
            "data_base64",
            "dataschema",
        }
        headers = {k: v for k, v in event.items() if k not in known and isinstance(v, str)}
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
