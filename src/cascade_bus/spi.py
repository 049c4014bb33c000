"""The public surface for transport authors: everything an adapter needs, in one import.

Besides the SPI itself (`Transport`, `Message`, `MessageSink`, ...) it holds the adapter kit:
the mechanisms every network transport composes instead of writing them again —
`NetworkOptions` / `tls_context`, `Outgoing` / `OfflineBuffer` (the publish-while-down policy),
`Supervisor` (reconnect), `TaskSet` (owned background tasks), `Waiters` (futures waiting for the
transport's own tokens: barriers, PONGs) and `RetainedLedger` (the resync diff, used by the bus's
subscriptions).

First-party adapters (MQTT, NATS, Redis) use only this module and the public package, exactly as
a third-party transport would::

    from cascade_bus.spi import Capabilities, Message, MessageSink, Transport
"""

from ._backoff import backoff_delays
from ._capabilities import Capabilities
from ._cloudevents import STRUCTURED_HEADERS
from ._cloudevents_binary import WithId, decode_header_value, encode_header_value
from ._install import install_command
from ._netopts import NETWORK_OPTIONS, NetworkOptions, tls_context
from ._offline import OfflineBuffer, Outgoing
from ._presence import LeasedPresence, NativePresence, PresenceLeases
from ._retained import RetainedLedger
from ._stats import DropReason, StatsRecorder
from ._supervisor import Reconnectable, Supervisor, describe_cause
from ._tasks import TaskSet
from ._topics import IdentityMapper, TopicMapper, topic_matches
from ._transport import (
    LocalPublisher,
    Message,
    MessageSink,
    NetworkTransport,
    Transport,
    TransportSubscription,
)
from ._url import BusURL, parse_bool, parse_float, parse_int
from ._waiters import Waiters

__all__ = [
    "NETWORK_OPTIONS",
    "STRUCTURED_HEADERS",
    "BusURL",
    "Capabilities",
    "DropReason",
    "IdentityMapper",
    "LeasedPresence",
    "LocalPublisher",
    "Message",
    "MessageSink",
    "NativePresence",
    "NetworkOptions",
    "NetworkTransport",
    "OfflineBuffer",
    "Outgoing",
    "PresenceLeases",
    "Reconnectable",
    "RetainedLedger",
    "StatsRecorder",
    "Supervisor",
    "TaskSet",
    "TopicMapper",
    "Transport",
    "TransportSubscription",
    "Waiters",
    "WithId",
    "backoff_delays",
    "decode_header_value",
    "describe_cause",
    "encode_header_value",
    "install_command",
    "parse_bool",
    "parse_float",
    "parse_int",
    "tls_context",
    "topic_matches",
]
