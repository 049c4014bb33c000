"""Presence on Redis: leases in two hashes, swept by surviving buses.

Redis has no last will, and key expiry is only observable with ``notify-keyspace-events``
(a server setting the adapter does not require), so each bus with ``presence`` keeps a lease
record per presence topic (``<prefix>{presence}:leases``) with a revision from a counter
(``{presence}:revs``, ``{presence}:seq``; one hash tag, one cluster slot), renewed every
``presence_interval``. Any bus with presence (or ``presence_sweep``) claims a lease not renewed
for its lease life and publishes its offline body, retained. Every step is one Lua script, so
renewing and claiming are compare-and-set on the revision. Timing: `cascade_bus._presence`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from cascade_bus import ConnectionLost, PublishError

from ._resp import ReplyError, RespLost

if TYPE_CHECKING:
    from cascade_bus.spi import PresenceLeases

    from ._transport import RedisTransport

__all__ = ["RedisLeases", "RedisPresence"]

_PUT = b"""
local r = redis.call('INCR', KEYS[3])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[1], r)
return r
"""
_REFRESH = b"""
if redis.call('HGET', KEYS[2], ARGV[1]) ~= ARGV[3] then return false end
local r = redis.call('INCR', KEYS[3])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[1], r)
return r
"""
_CLAIM = b"""
if redis.call('HGET', KEYS[2], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
return 1
"""
_REMOVE = b"""
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
return 1
"""
_SCAN = b"""
return {redis.call('HGETALL', KEYS[1]), redis.call('HGETALL', KEYS[2])}
"""


@contextlib.contextmanager
def _translated(where: str) -> Iterator[None]:
    """Connection and reply errors of a lease script as the bus's errors (chained)."""
    try:
        yield
    except RespLost as exc:
        raise ConnectionLost(f"presence leases on {where}: {exc}") from exc
    except ReplyError as exc:
        raise PublishError(f"presence leases on {where}: Redis refused: {exc}") from exc


def _pairs(flat: list[Any]) -> dict[bytes, bytes]:
    return {flat[i]: flat[i + 1] for i in range(0, len(flat) - 1, 2)}


class RedisLeases:
    """The lease table (`cascade_bus._presence.PresenceLeases`) in this server's hashes."""

    def __init__(self, transport: RedisTransport) -> None:
        self.t = transport
        base = transport._prefix + b"{presence}:"
        self._keys = (b"3", base + b"leases", base + b"revs", base + b"seq")

    async def _eval(self, script: bytes, *args: bytes) -> Any:
        with _translated(self.t.url.endpoint()):
            return await self.t._call(b"EVAL", script, *self._keys, *args)

    async def put(self, topic: str, record: bytes) -> int:
        """Create or overwrite the lease; the revision comes from a counter (never reused)."""
        return int(await self._eval(_PUT, topic.encode(), record))

    async def refresh(self, topic: str, record: bytes, revision: int) -> int | None:
        """Renew at ``revision`` only; None when it was claimed or replaced."""
        reply = await self._eval(_REFRESH, topic.encode(), record, str(revision).encode())
        return None if reply is None else int(reply)

    async def remove(self, topic: str) -> None:
        """Delete the lease (a clean close)."""
        await self._eval(_REMOVE, topic.encode())

    async def scan(self) -> list[tuple[str, int, bytes]]:
        """Every lease and its revision, read atomically."""
        records, revisions = await self._eval(_SCAN)
        revs = _pairs(revisions)
        found = []
        for topic, record in _pairs(records).items():
            rev = revs.get(topic)
            if rev is not None:
                found.append((topic.decode(errors="replace"), int(rev), bytes(record)))
        return found

    async def claim(self, topic: str, revision: int) -> bool:
        """Delete at ``revision`` only: True for the one bus that wins."""
        return bool(await self._eval(_CLAIM, topic.encode(), str(revision).encode()))


class RedisPresence:
    """Mixed into `RedisTransport`: declares `cascade_bus._presence.LeasedPresence`."""

    _presence_leases: RedisLeases | None = None

    def presence_leases(self) -> PresenceLeases:
        """The lease table of this transport's server."""
        if self._presence_leases is None:
            self._presence_leases = RedisLeases(self)  # type: ignore[arg-type]
        return self._presence_leases
