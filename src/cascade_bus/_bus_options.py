"""The bus's own options (format, timeouts, buffer, dedupe...), split from the transport's.

One place parses and checks them, from the URL query or keywords, so `Bus` only reads values.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from typing import Any

from ._codec import WireFormat, check_format
from ._errors import InvalidTopic, InvalidURL
from ._presence import PRESENCE_OPTIONS, PresenceOptions
from ._topics import validate_topic
from ._url import parse_float, parse_int

__all__ = ["BUS_OPTIONS", "BusOptions"]

BUS_OPTIONS = frozenset(
    {
        "format",
        "source",
        "buffer_size",
        "connect_timeout",
        "publish_timeout",
        "subscribe_timeout",
        "close_timeout",
        "flow_timeout",
        "retained_timeout",
        "inbox_prefix",
        "dedupe",
    }
    | PRESENCE_OPTIONS
)
"""The option names the bus takes; every other option belongs to the transport."""


def _default_source() -> str:
    return f"cascade-bus://{socket.gethostname()}/{os.getpid()}"


class BusOptions:
    """The bus options, parsed and checked (see `Bus` for what each one means).

    Raises:
        InvalidURL: an option has a bad value.
    """

    __slots__ = (
        "buffer_size",
        "close_timeout",
        "connect_timeout",
        "dedupe",
        "flow_timeout",
        "format",
        "inbox_prefix",
        "presence",
        "publish_timeout",
        "retained_timeout",
        "source",
        "subscribe_timeout",
    )

    def __init__(self, options: Mapping[str, Any]) -> None:
        self.format: WireFormat = check_format(options.get("format", "json"))
        self.source = str(options.get("source") or _default_source())
        self.buffer_size = parse_int("buffer_size", options.get("buffer_size", 10_000))
        if self.buffer_size < 1:
            raise InvalidURL("buffer_size must be at least 1")
        self.dedupe = parse_int("dedupe", options.get("dedupe", 0))
        if self.dedupe < 0:
            raise InvalidURL("dedupe must be 0 (off) or a window size >= 1")
        self.connect_timeout = parse_float("connect_timeout", options.get("connect_timeout", 10.0))
        self.publish_timeout = parse_float("publish_timeout", options.get("publish_timeout", 30.0))
        self.subscribe_timeout = parse_float(
            "subscribe_timeout", options.get("subscribe_timeout", 10.0)
        )
        self.close_timeout = parse_float("close_timeout", options.get("close_timeout", 10.0))
        self.flow_timeout = parse_float("flow_timeout", options.get("flow_timeout", 10.0))
        self.retained_timeout = parse_float(
            "retained_timeout", options.get("retained_timeout", 5.0)
        )
        self.presence = PresenceOptions(options)
        self.inbox_prefix = str(options.get("inbox_prefix", "_inbox")).strip("/")
        try:
            validate_topic(self.inbox_prefix)
        except InvalidTopic as exc:
            raise InvalidURL(f"option inbox_prefix={self.inbox_prefix!r}: {exc}") from None
