"""cascade-bus-redis: the Redis transport (``redis://``, ``rediss://``) for cascade-bus."""

from ._options import RedisOptions
from ._topics import escape_glob, native_subscriptions, scan_glob
from ._transport import RedisTransport

__all__ = ["RedisOptions", "RedisTransport", "escape_glob", "native_subscriptions", "scan_glob"]
