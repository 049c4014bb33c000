"""Checks on what arrives from Redis on the adapter's own channels, streams and keys.

Any client of the server can write there (``PUBLISH cascade_bus:ctl junk``, an ``XADD`` to a
subscription's stream, an ``HSET`` into the retained hash). The parsers here tell the adapter's
own data from junk without raising, and `Junk` counts each junk item once as a
``decode_error`` drop: junk never costs a connection, nor the message behind it.
"""

from __future__ import annotations

import logging

from cascade_bus.spi import DropReason, StatsRecorder, topic_matches

__all__ = ["Junk", "Tokens", "decode_topic", "parse_entry", "parse_seq"]

log = logging.getLogger("cascade_bus.redis")

#: Longest decimal a sequence number or token can have (an unsigned 64-bit value).
_MAX_DIGITS = 20


class Junk:
    """Counts junk from other clients as ``decode_error`` drops; logs the first one."""

    __slots__ = ("_endpoint", "_reported", "_stats")

    def __init__(self, stats: StatsRecorder, endpoint: str) -> None:
        self._stats = stats
        self._endpoint = endpoint
        self._reported = False

    def __call__(self, where: str, detail: object = None) -> None:
        """Count one junk item found in ``where`` (a channel, stream or key)."""
        self._stats.drop(DropReason.DECODE_ERROR)
        if not self._reported:
            self._reported = True
            log.warning(
                "%s: ignored data the adapter did not write in %s%s (counted in "
                "stats().dropped['decode_error']; further ones are not logged)",
                self._endpoint,
                where,
                f": {detail!r}" if detail is not None else "",
            )
        else:
            log.debug("%s: ignored junk in %s: %r", self._endpoint, where, detail)


class Tokens:
    """Numbers for PING and barrier tokens; tells the adapter's own (late) ones from forged."""

    __slots__ = ("last",)

    def __init__(self) -> None:
        self.last = 0

    def __iter__(self) -> Tokens:
        return self

    def __next__(self) -> int:
        self.last += 1
        return self.last

    def issued(self, token: bytes) -> bool:
        """True for a token this object handed out (one whose waiter may be gone already)."""
        return parse_seq(token) is not None and 0 < int(token) <= self.last


def parse_seq(value: bytes) -> int | None:
    """A sequence number as the script writes it (decimal digits), or None."""
    if 0 < len(value) <= _MAX_DIGITS and value.isdigit():
        return int(value)
    return None


def decode_topic(name: bytes) -> str | None:
    """A topic from a channel name, stream field or hash field; None if not a valid one."""
    try:
        topic = name.decode()
    except UnicodeDecodeError:
        return None
    return topic or None


def parse_entry(
    fields: list[bytes], pattern: str, topics: dict[bytes, str]
) -> tuple[str, bytes, int | None] | None:
    """``(topic, body, seq)`` of a stream entry the publish script wrote, or None for junk.

    The script writes ``t <topic> d <body>`` and, for a retained publish, ``s <seq>``; the
    topic must match the stream's ``pattern``. ``topics`` caches checked topics (bounded by the
    caller).
    """
    n = len(fields)
    if n in (4, 6) and fields[0] == b"t" and fields[2] == b"d" and (n == 4 or fields[4] == b"s"):
        topic_b, data = fields[1], fields[3]
        seq_b = fields[5] if n == 6 else None
    else:
        values = dict(zip(fields[::2], fields[1::2], strict=False))
        if b"t" not in values or b"d" not in values:
            return None
        topic_b, data, seq_b = values[b"t"], values[b"d"], values.get(b"s")
    seq = None
    if seq_b is not None:
        seq = parse_seq(seq_b)
        if seq is None:
            return None
    topic = topics.get(topic_b)
    if topic is None:
        topic = decode_topic(topic_b)
        if topic is None or not topic_matches(pattern, topic):
            return None
        topics[topic_b] = topic
    return topic, data, seq
