"""Portable topics: MQTT-style syntax (``/`` levels, ``+`` one level, ``#`` the rest), checked once.

Every transport accepts exactly these rules, so a topic valid on ``memory://`` is valid on MQTT,
NATS and Redis too; transports translate to their native syntax through a `TopicMapper`.
"""

from __future__ import annotations

from functools import lru_cache

from ._errors import InvalidTopic

__all__ = [
    "MAX_TOPIC_BYTES",
    "IdentityMapper",
    "TopicMapper",
    "has_wildcards",
    "topic_matches",
    "validate_pattern",
    "validate_topic",
]

#: Longest topic or pattern accepted, in UTF-8 bytes (MQTT's limit, the smallest of all brokers).
MAX_TOPIC_BYTES = 65535

_SHOWN = 80


def _shown(topic: str) -> str:
    return topic if len(topic) <= _SHOWN else topic[:_SHOWN] + "..."


def _check_common(topic: object, what: str) -> str:
    if not isinstance(topic, str):
        raise InvalidTopic(
            f"{what} must be a str, not {type(topic).__name__}", topic=_shown(repr(topic))
        )
    if not topic:
        raise InvalidTopic(f"{what} must not be empty", topic=topic)
    if "\x00" in topic:
        raise InvalidTopic(f"{what} {_shown(topic)!r} contains a NUL character", topic=topic)
    if len(topic) * 4 > MAX_TOPIC_BYTES and len(topic.encode()) > MAX_TOPIC_BYTES:
        raise InvalidTopic(
            f"{what} is {len(topic.encode())} bytes long; the limit is {MAX_TOPIC_BYTES}",
            topic=_shown(topic),
        )
    if topic[0] == "/" or topic[-1] == "/" or "//" in topic:
        raise InvalidTopic(
            f"{what} {_shown(topic)!r} has an empty level (leading, trailing or doubled '/'); "
            "empty levels cannot be carried by every transport",
            topic=_shown(topic),
        )
    return topic


@lru_cache(maxsize=4096)
def _validate_topic_cached(topic: str) -> str:
    _check_common(topic, "topic")
    if "+" in topic or "#" in topic:
        raise InvalidTopic(
            f"publish topic {_shown(topic)!r} contains a wildcard ('+' or '#'); "
            "wildcards are only allowed in subscription patterns",
            topic=_shown(topic),
        )
    return topic


def validate_topic(topic: str) -> str:
    """Check a concrete (publish) topic and return it unchanged.

    Raises:
        InvalidTopic: empty, an empty level, a NUL, a wildcard, not a str, or too long.
    """
    if type(topic) is not str:
        _check_common(topic, "topic")
    return _validate_topic_cached(topic)


@lru_cache(maxsize=1024)
def _validate_pattern_cached(pattern: str) -> str:
    _check_common(pattern, "pattern")
    levels = pattern.split("/")
    last = len(levels) - 1
    for i, level in enumerate(levels):
        if level == "#":
            if i != last:
                raise InvalidTopic(
                    f"pattern {_shown(pattern)!r}: '#' is only allowed as the last level",
                    topic=_shown(pattern),
                )
        elif level != "+" and ("+" in level or "#" in level):
            raise InvalidTopic(
                f"pattern {_shown(pattern)!r}: a wildcard must fill a whole level (got {level!r})",
                topic=_shown(pattern),
            )
    return pattern


def validate_pattern(pattern: str) -> str:
    """Check a subscription pattern (it may hold ``+`` and ``#``) and return it unchanged.

    Raises:
        InvalidTopic: the topic rules above, or a wildcard that does not fill a whole level,
            or ``#`` anywhere but the last level.
    """
    if type(pattern) is not str:
        _check_common(pattern, "pattern")
    return _validate_pattern_cached(pattern)


def has_wildcards(pattern: str) -> bool:
    """Tell whether a (valid) pattern contains ``+`` or ``#`` levels."""
    return "+" in pattern or "#" in pattern


@lru_cache(maxsize=4096)
def _levels(pattern: str) -> tuple[str, ...]:
    return tuple(pattern.split("/"))


def topic_matches(pattern: str, topic: str) -> bool:
    """Tell whether a concrete topic matches a pattern under the MQTT rules.

    ``+`` matches exactly one level, ``#`` matches the remaining levels including none (so
    ``a/#`` matches ``a``), and a pattern starting with a wildcard never matches a topic that
    starts with ``$``. Both arguments are assumed valid (see `validate_topic`).
    """
    if pattern == topic:
        return True
    if "+" not in pattern and "#" not in pattern:
        return False
    if topic[0] == "$" and pattern[0] in "+#":
        return False
    p = _levels(pattern)
    t = topic.split("/")
    n = len(t)
    for i, level in enumerate(p):
        if level == "#":
            return True
        if i >= n:
            return False
        if level != "+" and level != t[i]:
            return False
    return len(p) == n


class TopicMapper:
    """Translates portable topics and patterns to a transport's native syntax and back.

    Transports whose native syntax is already MQTT-style use `IdentityMapper`; NATS, for
    example, maps ``/`` to ``.``, ``+`` to ``*`` and ``#`` to ``>`` and escapes the rest.
    """

    def to_native(self, topic: str) -> str:
        """Return the native name for a concrete portable topic."""
        return topic

    def to_native_patterns(self, pattern: str) -> tuple[str, ...]:
        """Return the native subscriptions that together cover a portable pattern.

        A transport may return a broader native pattern (the bus filters exactly with
        `topic_matches`) or several (NATS needs ``a`` and ``a.>`` for ``a/#``).
        """
        return (pattern,)

    def from_native(self, native: str) -> str:
        """Return the portable topic for a native topic name received from the broker."""
        return native


class IdentityMapper(TopicMapper):
    """The mapper for transports that speak the portable MQTT-style syntax natively."""
