"""Portable topics ⇄ AMQP routing keys: ``/`` ⇄ ``.``, ``+`` → ``*``, ``#`` → ``#``, escaped.

A portable level may hold ``.`` (the AMQP word separator) and ``*`` / ``#`` (wildcard words in a
binding key). Those and the escape character ``%`` itself are written as ``%XX`` (upper-case hex
of the character's code), so ``a.b/x*`` becomes ``a%2Eb.x%2A``; everything else is kept, so
plain topics stay readable for plain AMQP clients. The translation is a bijection, level by
level, so a binding key matches exactly the routing keys whose portable topic the portable
pattern matches; the MQTT parent rule (``a/#`` matches ``a``) holds natively, since an AMQP ``#``
matches zero or more words. One exception is left to the transport: a leading wildcard does not
match a ``$`` topic under MQTT rules, while AMQP's does.
"""

from __future__ import annotations

import re
from functools import lru_cache

from cascade_bus import InvalidTopic
from cascade_bus.spi import TopicMapper

__all__ = ["MAX_ROUTING_KEY", "AmqpTopicMapper", "binding_key", "routing_key", "topic_from_key"]

#: AMQP's limit on a routing key (a short string), in UTF-8 bytes.
MAX_ROUTING_KEY = 255

_SPECIAL = re.compile(r"[.*#%]")
_ENCODED = re.compile(r"%(2E|2A|23|25)")
_DECODE = {"2E": ".", "2A": "*", "23": "#", "25": "%"}


def _escape(level: str) -> str:
    return _SPECIAL.sub(lambda m: f"%{ord(m.group()):02X}", level)


def _check(topic: str, key: str) -> str:
    if len(key) > MAX_ROUTING_KEY // 4 and len(key.encode()) > MAX_ROUTING_KEY:
        raise InvalidTopic(
            f"topic {topic[:80]!r} is {len(key.encode())} bytes as an AMQP routing key; AMQP "
            f"allows {MAX_ROUTING_KEY}",
            topic=topic[:80],
        )
    return key


@lru_cache(maxsize=8192)
def routing_key(topic: str) -> str:
    """The routing key of a concrete portable topic.

    Raises:
        InvalidTopic: longer than AMQP's 255-byte routing key.
    """
    if _SPECIAL.search(topic) is None:
        return _check(topic, topic.replace("/", "."))
    return _check(topic, ".".join(_escape(level) for level in topic.split("/")))


@lru_cache(maxsize=1024)
def binding_key(pattern: str) -> str:
    """The binding key of a portable pattern (``+`` → ``*``, ``#`` → ``#``).

    Raises:
        InvalidTopic: longer than AMQP's 255-byte limit.
    """
    words = [level if level in ("+", "#") else _escape(level) for level in pattern.split("/")]
    return _check(pattern, ".".join("*" if w == "+" else w for w in words))


@lru_cache(maxsize=8192)
def topic_from_key(key: str) -> str:
    """The portable topic of a routing key (inverse of `routing_key`; foreign keys pass)."""
    if "%" not in key:
        return key.replace(".", "/")
    return "/".join(_ENCODED.sub(lambda m: _DECODE[m.group(1)], word) for word in key.split("."))


class AmqpTopicMapper(TopicMapper):
    """The `TopicMapper` of the AMQP transport (routing keys and binding keys)."""

    def to_native(self, topic: str) -> str:
        """A concrete topic's routing key."""
        return routing_key(topic)

    def to_native_patterns(self, pattern: str) -> tuple[str, ...]:
        """A pattern's one binding key (the parent rule holds natively)."""
        return (binding_key(pattern),)

    def from_native(self, name: str) -> str:
        """The portable topic of a routing key."""
        return topic_from_key(name)
