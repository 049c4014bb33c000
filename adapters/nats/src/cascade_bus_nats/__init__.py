"""cascade-bus-nats: the NATS transport (``nats://``, ``tls://``) for cascade-bus, on nats-py."""

from ._mapper import NatsTopicMapper
from ._options import NatsOptions
from ._transport import REVISION_HEADER, NatsTransport

__all__ = ["REVISION_HEADER", "NatsOptions", "NatsTopicMapper", "NatsTransport"]
