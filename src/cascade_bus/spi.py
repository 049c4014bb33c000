"""The public surface for transport authors: everything an adapter needs, in one import.

First-party adapters (MQTT, NATS, Redis) use only this module and the public package, exactly as
a third-party transport would::

    from cascade_bus.spi import Capabilities, Message, MessageSink, Transport
"""

from ._backoff import backoff_delays
from ._capabilities import Capabilities
from ._netopts import NETWORK_OPTIONS, NetworkOptions, tls_context
from ._stats import DropReason, StatsRecorder
from ._topics import IdentityMapper, TopicMapper, topic_matches
from ._transport import Message, MessageSink, NetworkTransport, Transport, TransportSubscription
from ._url import BusURL, parse_bool, parse_float, parse_int

__all__ = [
    "NETWORK_OPTIONS",
    "BusURL",
    "Capabilities",
    "DropReason",
    "IdentityMapper",
    "Message",
    "MessageSink",
    "NetworkOptions",
    "NetworkTransport",
    "StatsRecorder",
    "TopicMapper",
    "Transport",
    "TransportSubscription",
    "backoff_delays",
    "parse_bool",
    "parse_float",
    "parse_int",
    "tls_context",
    "topic_matches",
]
