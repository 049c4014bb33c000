"""cascade-bus-amqp: the AMQP 0-9-1 transport for cascade-bus (RabbitMQ), ``amqp://`` and ``amqps://``."""

from __future__ import annotations

from ._options import AmqpOptions
from ._topics import AmqpTopicMapper, binding_key, routing_key, topic_from_key
from ._transport import AmqpTransport

__all__ = [
    "AmqpOptions",
    "AmqpTopicMapper",
    "AmqpTransport",
    "binding_key",
    "routing_key",
    "topic_from_key",
]
