"""cascade-bus-nats: the NATS transport (``nats://``, ``nats+tls://``) for cascade-bus (nats-py)."""

from ._mapper import NatsTopicMapper
from ._options import NatsOptions
from ._transport import REVISION_HEADER, NatsTransport

__all__ = ["REVISION_HEADER", "NatsOptions", "NatsTopicMapper", "NatsTransport"]
