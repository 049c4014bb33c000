"""The one place where aiormq and socket errors (and broker refusals) become `BusError` s.

Every error is chained (``from exc``) to the client exception it translates, so the cause stays
in the traceback; no message carries a password (endpoints come masked).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import aiormq.exceptions as amqp_errors

from cascade_bus import BusError, ConnectError, ConnectionLost, PublishError, SubscribeError

__all__ = ["GONE", "connecting", "lost", "publish_refused", "subscribing"]

#: Client errors that mean "this connection or channel is gone" (reconnect, retry).
GONE: tuple[type[BaseException], ...] = (
    amqp_errors.AMQPConnectionError,
    amqp_errors.ChannelInvalidStateError,
    ConnectionError,
    OSError,
)


@contextmanager
def connecting(endpoint: str) -> Iterator[None]:
    """Opening a connection: client errors become `ConnectError` (bus errors pass unchanged)."""
    try:
        yield
    except BusError:
        raise
    except (amqp_errors.AuthenticationError, amqp_errors.ProbableAuthenticationError) as exc:
        raise ConnectError(f"{endpoint} refused the credentials: {exc}") from exc
    except (amqp_errors.AMQPError, OSError, TimeoutError) as exc:
        raise ConnectError(f"could not connect to {endpoint}: {exc!r}") from exc


@contextmanager
def subscribing(endpoint: str, pattern: str) -> Iterator[None]:
    """Declaring, binding, consuming: a refusal is `SubscribeError`, a lost link is lost."""
    try:
        yield
    except BusError:
        raise
    except amqp_errors.AMQPChannelError as exc:
        raise SubscribeError(
            f"{endpoint} refused the subscription to {pattern!r}: {exc}", pattern=pattern
        ) from exc
    except GONE as exc:
        raise lost(endpoint, exc) from exc


def lost(endpoint: str, exc: BaseException | None) -> ConnectionLost:
    """The error for a connection that went away while something waited on it."""
    detail = f": {exc!r}" if exc is not None else ""
    return ConnectionLost(f"lost the connection to {endpoint}{detail}")


def publish_refused(topic: str, frame: object) -> PublishError:
    """The error for a publish the broker negatively acknowledged (``basic.nack``)."""
    return PublishError(f"the broker refused the message for {topic!r}: {frame!r}", topic=topic)
