"""Publish subjects: a portable topic checked once as a NATS subject, and its cached frames.

The hot path finds ``b"PUB <subject> "`` (or, for the bus's constant headers, the whole
``HPUB`` head with its header block) by topic; only a topic seen for the first time is
translated and checked here.
"""

from __future__ import annotations

from collections.abc import Mapping

from cascade_bus import InvalidTopic

from ._errors import publish_error
from ._mapper import subject_from_topic
from ._wire import MAX_SUBJECT_BYTES
from ._writer import Writer

__all__ = ["Head", "Subjects"]

#: ``(headers, b"HPUB <subject> <block size> ", block, b"HPUB <subject> ")``: see
#: `Writer.constant_head`.
Head = tuple[Mapping[str, str], bytes, bytes, bytes]
_CACHED = 4096


class Subjects:
    """Topic → subject for one transport, with the per-topic frame caches of its hot path."""

    __slots__ = ("heads", "prefixes", "q1_name", "q1_prefix")

    def __init__(self, qos1_prefix: str) -> None:
        self.q1_name = qos1_prefix
        self.q1_prefix = qos1_prefix + "."
        self.prefixes: dict[str, bytes] = {}
        self.heads: dict[str, Head] = {}

    def subject(self, topic: str) -> str:
        """The NATS subject of a concrete topic.

        Raises:
            InvalidTopic: too long as a subject, or under the reserved QoS-1 prefix.
        """
        subject = subject_from_topic(topic)
        if len(subject) * 4 > MAX_SUBJECT_BYTES and len(subject.encode()) > MAX_SUBJECT_BYTES:
            raise InvalidTopic(
                f"topic is {len(subject.encode())} bytes as a NATS subject; NATS takes at most "
                f"{MAX_SUBJECT_BYTES}",
                topic=topic[:80],
            )
        if subject[0] == "$" and (subject + ".").startswith(self.q1_prefix):
            raise InvalidTopic(
                f"topic {topic!r} is under {self.q1_name!r}, reserved for QoS-1 traffic",
                topic=topic,
            )
        return subject

    def pub_prefix(self, topic: str) -> bytes:
        """``b"PUB <subject> "`` for a topic (checked once, then cached)."""
        prefix = b"PUB " + self.subject(topic).encode() + b" "
        if len(self.prefixes) >= _CACHED:
            self.prefixes.clear()
        self.prefixes[topic] = prefix
        return prefix

    def head(
        self, writer: Writer, topic: str, headers: Mapping[str, str], max_payload: int
    ) -> Head:
        """`Writer.constant_head` for a topic and the bus's constant headers, cached.

        Raises:
            InvalidTopic: the topic cannot be a subject here.
            PublishError: a header name NATS cannot carry.
        """
        subject = self.subject(topic).encode()
        try:
            head = writer.constant_head(subject, headers)
        except ValueError as exc:
            raise publish_error(exc, topic, 0, max_payload) from exc
        if len(self.heads) >= _CACHED:
            self.heads.clear()
        self.heads[topic] = head
        return head
