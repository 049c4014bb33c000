"""The one place where aiomqtt, paho and socket errors (and refusals) become `BusError` s.

Every error is chained (``from exc``) to the client's exception it translates, so the cause
stays in the traceback; none of the messages carries a password (endpoints come masked).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import aiomqtt
from paho.mqtt.reasoncodes import ReasonCode

from cascade_bus import BusError, ConnectError, PublishError, SubscribeError

__all__ = ["client_errors", "publish_refused", "publish_unacknowledged", "subscribe_refused"]


@contextmanager
def client_errors(endpoint: str, *, pattern: str | None = None) -> Iterator[None]:
    """Turn the client's errors raised inside into `BusError` s (bus errors pass unchanged).

    Connecting (no ``pattern``): `ConnectError`; subscribing to ``pattern``:
    `SubscribeError`.
    """
    try:
        yield
    except BusError:
        raise  # ConnectionLost is an OSError too: already translated
    except aiomqtt.MqttCodeError as exc:
        if pattern is not None:
            raise SubscribeError(
                f"subscribe to {pattern!r} failed: {exc}", pattern=pattern
            ) from exc
        raise ConnectError(f"{endpoint} refused the connection: {exc.rc}") from exc
    except (aiomqtt.MqttError, OSError) as exc:
        if pattern is not None:
            raise SubscribeError(
                f"subscribe to {pattern!r} failed: {exc}", pattern=pattern
            ) from exc
        raise ConnectError(f"could not connect to {endpoint}: {exc}") from exc


def subscribe_refused(endpoint: str, native: str, granted: list[Any]) -> SubscribeError | None:
    """The error for a SUBACK that refused ``native`` (None: every code granted it)."""
    for code in granted:
        failed = code.is_failure if isinstance(code, ReasonCode) else code == 0x80
        if failed:
            return SubscribeError(
                f"{endpoint} refused the subscription to {native!r}: {code}", pattern=native
            )
    return None


def publish_refused(topic: str, kind: int, reason: int) -> PublishError:
    """The error for a PUBACK/PUBREC/PUBCOMP (``kind``, high nibble) with a failure ``reason``."""
    try:
        code = str(ReasonCode(kind >> 4, identifier=reason))  # PUBACK 4, PUBREC 5, ...
    except KeyError:  # not a code MQTT defines for this packet
        code = f"reason code 0x{reason:02x}"
    return PublishError(f"broker refused the message for {topic!r}: {code}", topic=topic)


def publish_unacknowledged(endpoint: str, topic: str) -> PublishError:
    """The error for the adapter's own publish the broker did not acknowledge in time."""
    return PublishError(f"{endpoint} did not acknowledge the message for {topic!r}", topic=topic)
