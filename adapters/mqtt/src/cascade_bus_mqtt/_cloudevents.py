"""CloudEvents' MQTT binding: the bus's binary-mode headers as MQTT 5 properties and back.

The bus hands every transport the NATS binding's form (``ce-<attribute>`` with percent-encoded
values, ``ce-datacontenttype``, and ``content-type`` marking a structured body). The MQTT 5
binding names each user property after the attribute itself, with its plain value, and puts
``datacontenttype`` (or, for a structured body, ``application/cloudevents+json``) in the
PUBLISH Content Type property. Receiving maps the attributes of a CloudEvent (one with a
``specversion`` user property) back to ``ce-`` headers, and Content Type to ``content-type``.
"""

from __future__ import annotations

from collections.abc import Mapping

from cascade_bus.spi import decode_header_value, encode_header_value

__all__ = ["STRUCTURED_PREFIX", "from_user_properties", "to_properties"]

#: Content Types of a structured body (which the bus recognises by the body itself).
STRUCTURED_PREFIX = "application/cloudevents"
#: The attributes an envelope reads from ``ce-`` headers (extensions arrive as plain headers).
_ATTRIBUTES = frozenset(
    {
        "specversion",
        "id",
        "source",
        "type",
        "time",
        "subject",
        "datacontenttype",
        "dataschema",
        "correlationid",
        "replyto",
        "cascadeheaders",
    }
)


def to_properties(headers: Mapping[str, str]) -> tuple[list[tuple[str, str]], str | None]:
    """The user properties and the Content Type of a PUBLISH carrying ``headers``."""
    pairs: list[tuple[str, str]] = []
    content_type: str | None = None
    for key, value in headers.items():
        if key.startswith("ce-"):
            name = key[3:]
            text = decode_header_value(value, key)  # the binding wants the plain value
            if name == "datacontenttype":
                content_type = text
            else:
                pairs.append((name, text))
        elif key == "content-type":
            content_type = value
        else:
            pairs.append((key, value))
    return pairs, content_type


def from_user_properties(headers: dict[str, str]) -> dict[str, str]:
    """A received CloudEvent's user properties as the bus's headers (``ce-`` attributes)."""
    out: dict[str, str] = {}
    for key, value in headers.items():
        if key in _ATTRIBUTES:
            out["ce-" + key] = encode_header_value(value)
        else:
            out[key] = value
    return out
