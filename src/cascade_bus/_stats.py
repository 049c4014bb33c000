"""Counters every bus keeps so that no message is ever lost without being counted."""

from __future__ import annotations

from collections import Counter

import msgspec

__all__ = ["DropReason", "Stats", "StatsRecorder"]


class DropReason:
    """Names of the reasons a message can be dropped (keys of `Stats.dropped`)."""

    HANDLER_ERROR = "handler_error"
    DECODE_ERROR = "decode_error"
    OVERFLOW = "overflow"
    OFFLINE_OVERFLOW = "offline_overflow"
    DISCONNECTED = "disconnected"
    CLOSED = "closed"
    UNSUBSCRIBED = "unsubscribed"
    PUBLISH_FAILED = "publish_failed"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    NO_SUBSCRIBER = "no_subscriber"
    DUPLICATE = "duplicate"


class Stats(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot of a bus's counters, returned by `Bus.stats`.

    Attributes:
        published: Messages handed to the transport successfully.
        delivered: Messages handed to a handler or iterator.
        dropped: Messages that did not make it, by reason (see `DropReason`).
        reconnects: Times the transport reconnected after losing the broker.
        buffered: Messages waiting in buffers right now (offline buffer + subscription queues).
        duplicates: Messages seen again (at-least-once redeliveries the transport noticed).
        dead_lettered: Messages whose handler kept failing, moved to their dead-letter topic.
    """

    published: int = 0
    delivered: int = 0
    dropped: dict[str, int] = msgspec.field(default_factory=dict)
    reconnects: int = 0
    buffered: int = 0
    duplicates: int = 0
    dead_lettered: int = 0

    @property
    def dropped_total(self) -> int:
        """All dropped messages, whatever the reason."""
        return sum(self.dropped.values())


class StatsRecorder:
    """The mutable counters behind `Stats`; shared by a bus and its transport."""

    __slots__ = ("dead_lettered", "delivered", "dropped", "duplicates", "published", "reconnects")

    def __init__(self) -> None:
        self.published = 0
        self.delivered = 0
        self.reconnects = 0
        self.duplicates = 0
        self.dead_lettered = 0
        self.dropped: Counter[str] = Counter()

    def drop(self, reason: str, count: int = 1) -> None:
        """Count ``count`` messages dropped for ``reason``."""
        self.dropped[reason] += count

    def snapshot(self, buffered: int = 0) -> Stats:
        """Freeze the current counts."""
        return Stats(
            published=self.published,
            delivered=self.delivered,
            dropped={k: v for k, v in self.dropped.items() if v},
            reconnects=self.reconnects,
            buffered=buffered,
            duplicates=self.duplicates,
            dead_lettered=self.dead_lettered,
        )
