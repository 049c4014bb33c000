"""Portable topics ⇄ NATS subjects: ``/`` ⇄ ``.``, ``+`` → ``*``, ``#`` → ``>``, with escaping.

A portable level may hold characters a NATS token cannot: ``.`` (the NATS separator), ASCII
whitespace and control characters (they end a protocol argument), ``*`` and ``>`` (wildcards).
Those, and the escape character ``%`` itself, are written as ``%XX`` (two upper-case hex digits of
the character's code), so ``a.b/x y`` becomes ``a%2Eb.x%20y``. Everything else, Unicode included,
is kept as it is: NATS subjects are UTF-8 and plain topics stay readable for plain NATS clients.

The translation is a bijection between portable topics and the subjects it produces, level by
level, so a native wildcard matches exactly the subjects whose portable topic the portable
pattern matches — with two exceptions the transport handles itself: the MQTT parent rule
(``a/#`` matches ``a``: subscribed as the two subjects ``a`` and ``a.>``) and ``$`` topics (a
leading wildcard never matches them under MQTT rules, while ``*`` and ``>`` do on NATS).
"""

from __future__ import annotations

import re
from functools import lru_cache

from cascade_bus.spi import TopicMapper

__all__ = ["ESCAPE", "NatsTopicMapper", "needs_escape", "subject_from_topic", "topic_from_subject"]

#: The escape character of a NATS token written by `NatsTopicMapper`.
ESCAPE = "%"

# What a token cannot hold: the separator, wildcards, the escape itself, ASCII space and controls.
_ESCAPED = frozenset(".*>%\x7f" + "".join(chr(c) for c in range(0x21)))
_SPECIAL = re.compile(r"[.*>%\x00-\x20\x7f]")
_ENCODED = re.compile(r"%([0-9A-F]{2})")
_DECODABLE = {f"{ord(c):02X}": c for c in _ESCAPED}


def needs_escape(char: str) -> bool:
    """Tell whether a character is written as ``%XX`` inside a NATS token."""
    return char in _ESCAPED


def _escape_level(level: str) -> str:
    return _SPECIAL.sub(lambda m: f"%{ord(m.group()):02X}", level)


def _unescape(match: re.Match[str]) -> str:
    # Only the codes we write are decoded: a foreign "%41" stays "%41".
    return _DECODABLE.get(match.group(1), match.group())


@lru_cache(maxsize=8192)
def subject_from_topic(topic: str) -> str:
    """Return the NATS subject for a concrete portable topic (cached)."""
    if _SPECIAL.search(topic) is None:
        return topic.replace("/", ".")
    return ".".join(_escape_level(level) for level in topic.split("/"))


@lru_cache(maxsize=8192)
def topic_from_subject(subject: str) -> str:
    """Return the portable topic for a NATS subject (cached)."""
    if ESCAPE not in subject:
        return subject.replace(".", "/")
    return "/".join(_ENCODED.sub(_unescape, token) for token in subject.split("."))


class NatsTopicMapper(TopicMapper):
    """Translates portable topics and patterns to NATS subjects and back (see the module doc)."""

    def to_native(self, topic: str) -> str:
        """Return the subject for a concrete portable topic: ``a/b.c`` → ``a.b%2Ec``."""
        return subject_from_topic(topic)

    def to_native_patterns(self, pattern: str) -> tuple[str, ...]:
        """Return the subjects that together cover a portable pattern.

        ``+`` becomes ``*``, a trailing ``#`` becomes ``>``; ``a/#`` needs ``a`` as well as
        ``a.>`` (MQTT's parent rule), ``#`` alone is ``>``.
        """
        levels = pattern.split("/")
        tokens = ["*" if level == "+" else _escape_level(level) for level in levels]
        if levels[-1] != "#":
            return (".".join(tokens),)
        if len(levels) == 1:
            return (">",)
        parent = ".".join(tokens[:-1])
        return (parent, parent + ".>")

    def from_native(self, native: str) -> str:
        """Return the portable topic of a received subject: ``a.b%2Ec`` → ``a/b.c``."""
        return topic_from_subject(native)
