"""cascade-bus: one small, typed asyncio message bus over MQTT, NATS, Redis and memory://."""

from ._bus import Bus, ErrorHook, connect
from ._capabilities import Capabilities
from ._connector import Connector, ConnectorSubscription
from ._envelope import Envelope
from ._errors import (
    BusClosed,
    BusError,
    CodecError,
    ConnectError,
    ConnectionLost,
    DecodeError,
    EncodeError,
    InvalidTopic,
    InvalidURL,
    NoResponders,
    PayloadTooLarge,
    PublishError,
    RequestTimeout,
    SubscribeError,
    TransportError,
    UnknownScheme,
    UnsupportedFeature,
)
from ._middleware import Middleware, Next
from ._registry import available_transports, get_transport, register_transport, unregister_transport
from ._stats import DropReason, Stats
from ._subscription import Handler, Overflow, SubscribeCall, Subscription, SubscriptionPolicy
from ._topics import topic_matches, validate_pattern, validate_topic
from ._transport import Message, MessageSink, Transport, TransportSubscription
from ._url import BusURL

__version__ = "0.1.0"

__all__ = [
    "Bus",
    "BusClosed",
    "BusError",
    "BusURL",
    "Capabilities",
    "CodecError",
    "ConnectError",
    "ConnectionLost",
    "Connector",
    "ConnectorSubscription",
    "DecodeError",
    "DropReason",
    "EncodeError",
    "Envelope",
    "ErrorHook",
    "Handler",
    "InvalidTopic",
    "InvalidURL",
    "Message",
    "MessageSink",
    "Middleware",
    "Next",
    "NoResponders",
    "Overflow",
    "PayloadTooLarge",
    "PublishError",
    "RequestTimeout",
    "Stats",
    "SubscribeCall",
    "SubscribeError",
    "Subscription",
    "SubscriptionPolicy",
    "Transport",
    "TransportError",
    "TransportSubscription",
    "UnknownScheme",
    "UnsupportedFeature",
    "__version__",
    "available_transports",
    "connect",
    "get_transport",
    "register_transport",
    "topic_matches",
    "unregister_transport",
    "validate_pattern",
    "validate_topic",
]
