"""The one place where RESP, redis-py and socket failures become `BusError`s, chained.

Every function returns the `BusError` to raise (``raise connect_failed(where, exc) from exc``),
so the call site keeps the traceback and the translation stays here. Messages name the server
(``host:port``, never a password) and what was refused.
"""

from __future__ import annotations

from cascade_bus import ConnectError, ConnectionLost, PublishError, SubscribeError

from ._resp import ReplyError

__all__ = [
    "AUTH_CODES",
    "AUTH_WORDS",
    "cluster_connect_failed",
    "connect_failed",
    "is_auth_failure",
    "lost",
    "not_connected",
    "publish_refused",
    "script_refused",
    "subscribe_refused",
]

#: Reply codes by which Redis refuses credentials or permissions.
AUTH_CODES = frozenset({"WRONGPASS", "NOAUTH", "NOPERM"})
#: Words by which redis-py (Redis Cluster) reports a refused AUTH inside another error
#: ("Redis Cluster cannot be connected: ...").
AUTH_WORDS = ("username-password", "authentication", "noauth", "wrongpass", "noperm")


def is_auth_failure(error: BaseException) -> bool:
    """True when ``error`` says the server refused the credentials or the user's rights."""
    if isinstance(error, ReplyError) and error.code in AUTH_CODES:
        return True
    text = str(error)
    return any(code in text for code in AUTH_CODES) or "password" in text.lower()


def connect_failed(where: str, error: BaseException) -> ConnectError:
    """Opening a connection to ``where`` failed: refused (credentials, database) or unreachable."""
    if isinstance(error, ReplyError):
        if is_auth_failure(error):
            return ConnectError(f"{where} refused the credentials: {error}")
        return ConnectError(f"{where} refused the connection: {error}")
    return ConnectError(f"could not connect to {where}: {error}")


def cluster_connect_failed(where: str, error: BaseException) -> ConnectError:
    """redis-py could not discover the cluster or load the script: refused or unreachable.

    Imports redis-py lazily: only ``redis+cluster://`` (the ``cluster`` extra) gets here.
    """
    from redis.exceptions import AuthenticationError, AuthorizationError, ResponseError

    text = str(error)
    if isinstance(error, AuthenticationError | AuthorizationError):
        return ConnectError(f"{where} refused the credentials: {error}")
    if isinstance(error, ResponseError):
        if any(code in text for code in AUTH_CODES):
            return ConnectError(f"{where} refused the credentials: {error}")
        return ConnectError(f"{where} refused the adapter: {error}")
    if any(word in text.lower() for word in AUTH_WORDS):
        return ConnectError(f"{where} refused the credentials: {error}")
    return ConnectError(f"could not connect to {where}: {error}")


def script_refused(where: str, error: BaseException) -> ConnectError:
    """``SCRIPT LOAD`` of the adapter's script was refused (ACL, ``lua-time-limit``...)."""
    return ConnectError(f"{where} refused the adapter's script: {error}")


def lost(error: BaseException) -> ConnectionLost:
    """A connection dropped under a command (`RespLost`, a socket error)."""
    return ConnectionLost(str(error) or type(error).__name__)


def not_connected(where: str) -> ConnectionLost:
    """A command was issued while there is no connection."""
    return ConnectionLost(f"not connected to {where}")


def subscribe_refused(where: str, pattern: str, error: BaseException) -> SubscribeError:
    """Redis refused a (P)SUBSCRIBE, a route registration or a snapshot read."""
    return SubscribeError(
        f"{where} refused the subscription to {pattern!r}: {error}", pattern=pattern
    )


def publish_refused(where: str, topic: str, text: str) -> PublishError:
    """The publish script (or a cluster master) refused the message for ``topic``."""
    return PublishError(f"{where} refused the message for {topic!r}: {text}", topic=topic)
