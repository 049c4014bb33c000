"""The one place nats-py exceptions become `BusError`s, always chained (``raise ... from exc``).

Also tells which nats-py errors mean "the connection is gone for now" (`GONE`) and which
JetStream failures are worth retrying (`transient`).
"""

from __future__ import annotations

import asyncio

import nats.errors as nats_errors
import nats.js.errors as js_errors

from cascade_bus import BusError, ConnectError, PayloadTooLarge, PublishError, SubscribeError

from ._writer import TooLarge

__all__ = [
    "GONE",
    "ack_error",
    "describe",
    "jetstream_error",
    "placement_error",
    "publish_error",
    "send_error",
    "subscribe_error",
    "too_large",
    "transient",
]

# Errors nats-py raises when a connection is gone or going (the operation may succeed later).
GONE = (
    nats_errors.ConnectionClosedError,
    nats_errors.OutboundBufferLimitError,
    nats_errors.ConnectionReconnectingError,
    nats_errors.ConnectionDrainingError,
    nats_errors.StaleConnectionError,
)


def transient(exc: Exception) -> bool:
    """Tell whether a JetStream call failed for a moment (no leader yet, a reconnect)."""
    if isinstance(exc, js_errors.APIError):
        return exc.code == 503
    return isinstance(
        exc,
        TimeoutError
        | nats_errors.NoRespondersError
        | nats_errors.ConnectionReconnectingError
        | nats_errors.StaleConnectionError,
    )


def describe(exc: BaseException, *secrets: str | None) -> str:
    """Say what went wrong in words, with every secret masked."""
    text = str(exc) or type(exc).__name__
    if isinstance(exc, nats_errors.Error) and "uthoriz" in text:
        return "the server refused the credentials (authorization violation)"
    if isinstance(exc, asyncio.TimeoutError | TimeoutError):
        return "timed out"
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[secure]")
    return text


def too_large(topic: str, size: int, limit: int) -> PayloadTooLarge:
    """The error for a message over the server's max_payload."""
    return PayloadTooLarge(
        f"message for {topic!r} is {size} bytes with its headers; the NATS server accepts "
        f"at most {limit}",
        size=size,
        limit=limit,
    )


def publish_error(exc: Exception, topic: str, size: int, limit: int) -> BusError:
    """The `BusError` for a message nats-py (or our `Writer`) refused to write."""
    if isinstance(exc, TooLarge):
        return too_large(topic, exc.size, limit)
    if isinstance(exc, nats_errors.MaxPayloadError):
        return too_large(topic, size, limit)
    if isinstance(exc, nats_errors.BadHeaderError):
        return PublishError(
            f"publish to {topic!r}: a header name NATS cannot carry: {exc}", topic=topic
        )
    if isinstance(exc, ValueError):  # our Writer's check of a header name
        return PublishError(f"publish to {topic!r}: {exc}", topic=topic)
    return PublishError(f"publish to {topic!r} failed: {exc}", topic=topic)


def send_error(exc: Exception, what: str = "publish") -> PublishError:
    """The error (chained) of a write that failed, for a publisher's future, not raised here."""
    error = PublishError(f"{what} failed: {exc}")
    error.__cause__ = exc
    return error


def ack_error(exc: Exception) -> PublishError:
    """The error (chained) of a JetStream acknowledgement we cannot read."""
    error = PublishError(f"unreadable acknowledgement: {exc}")
    error.__cause__ = exc
    return error


def placement_error(exc: js_errors.APIError, endpoint: str, what: str, replicas: int) -> BusError:
    """The `ConnectError` for an explicit ``replicas`` count JetStream cannot place."""
    return ConnectError(
        f"JetStream on {endpoint} cannot create {what} with replicas={replicas}: {exc.description}"
    )


def jetstream_error(exc: Exception, endpoint: str) -> BusError:
    """The `ConnectError` for a stream or bucket JetStream could not give us."""
    if isinstance(exc, js_errors.ServiceUnavailableError | nats_errors.NoRespondersError):
        return ConnectError(
            f"JetStream is not enabled on {endpoint} (needed for QoS 1 and retained "
            "messages); start nats-server with -js, or use ?jetstream=false for core NATS only"
        )
    return ConnectError(f"JetStream on {endpoint} refused: {exc}")


def subscribe_error(exc: Exception, pattern: str, endpoint: str, *secrets: str | None) -> BusError:
    """The `SubscribeError` for a subscription the server (or JetStream) refused."""
    return SubscribeError(
        f"subscription to {pattern!r} on {endpoint} failed: {describe(exc, *secrets)}",
        pattern=pattern,
    )
