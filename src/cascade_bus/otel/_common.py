"""What the OpenTelemetry modules share: scope and attribute names, and a bus's attributes.

Semantic-convention names are spelled out so that only ``opentelemetry-api`` is needed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from .._bus import Bus

__all__ = [
    "CLIENT_ID",
    "CONVERSATION_ID",
    "DEFAULT_SYSTEM",
    "DESTINATION",
    "DROP_REASON",
    "ERROR_TYPE",
    "INSTRUMENTATION_NAME",
    "MESSAGE_ID",
    "OPERATION_NAME",
    "OPERATION_TYPE",
    "SYSTEM",
    "bus_attributes",
]

INSTRUMENTATION_NAME: Final = "cascade_bus"
"""The instrumentation scope name of every tracer and meter this package creates."""

DROP_REASON: Final = "cascade_bus.drop.reason"
"""Attribute naming the `DropReason` on the ``cascade_bus.dropped`` counter."""

DEFAULT_SYSTEM: Final = "cascade_bus"
"""``messaging.system`` of a middleware that is neither bound to a bus nor told its system."""

# Semantic-convention attribute names (messaging, error, server).
SYSTEM = "messaging.system"
DESTINATION = "messaging.destination.name"
MESSAGE_ID = "messaging.message.id"
CONVERSATION_ID = "messaging.message.conversation_id"
OPERATION_TYPE = "messaging.operation.type"
OPERATION_NAME = "messaging.operation.name"
CLIENT_ID = "messaging.client.id"
ERROR_TYPE = "error.type"
_SERVER_ADDRESS = "server.address"
_SERVER_PORT = "server.port"

# TLS and websocket variants of a scheme report the system itself (``tls://`` and ``ws://``,
# ``wss://`` are the older names of ``nats+tls://``, ``mqtt+ws://`` and ``mqtt+wss://``).
_SYSTEM_OF_SCHEME = {
    "mqtts": "mqtt",
    "mqtt+ws": "mqtt",
    "mqtt+wss": "mqtt",
    "ws": "mqtt",
    "wss": "mqtt",
    "nats+tls": "nats",
    "rediss": "redis",
    "redis+cluster": "redis",
    "rediss+cluster": "redis",
    "tls": "nats",
}


def bus_attributes(bus: Bus) -> dict[str, str | int]:
    """Attributes that identify a bus: its system (URL scheme), client id and server."""
    url = bus.url
    system = _SYSTEM_OF_SCHEME.get(url.scheme, url.scheme)
    attributes: dict[str, str | int] = {SYSTEM: system, CLIENT_ID: bus.id}
    if url.port is not None and url.host:
        attributes[_SERVER_ADDRESS] = url.host
        attributes[_SERVER_PORT] = url.port
    return attributes
