"""cascade-bus-redis: the Redis transports for cascade-bus.

``redis://`` and ``rediss://`` (`RedisTransport`, a standalone server), ``redis+cluster://`` and
``rediss+cluster://`` (`RedisClusterTransport`, Redis Cluster; needs redis-py, the ``cluster``
extra, and is imported only when used).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._options import RedisOptions
from ._topics import escape_glob, hash_tag, native_subscriptions, scan_glob, shard_key
from ._transport import RedisTransport

if TYPE_CHECKING:
    from ._cluster import RedisClusterTransport

__all__ = [
    "RedisClusterTransport",
    "RedisOptions",
    "RedisTransport",
    "escape_glob",
    "hash_tag",
    "native_subscriptions",
    "scan_glob",
    "shard_key",
]


def __getattr__(name: str) -> Any:
    if name == "RedisClusterTransport":  # imported lazily: it needs redis-py
        from ._cluster import RedisClusterTransport

        return RedisClusterTransport
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
