"""The public surface for transport authors: everything an adapter needs, in one import.

Besides the SPI itself (`Transport`, `Message`, `MessageSink`, ...) it holds the adapter kit:
the mechanisms every network transport composes instead of writing them again —
`NetworkOptions` / `tls_context`, `Outgoing` / `OfflineBuffer` (the publish-while-down policy),
`Supervisor` (reconnect), `TaskSet` (owned background tasks) and `RetainedLedger` (the resync
diff, used by the bus's subscriptions).

First-party adapters (MQTT, NATS, Redis) use only this module and the public package, exactly as
a third-party transport would::

    from cascade_bus.spi import Capabilities, Message, MessageSink, Transport
"""

from ._backoff import backoff_delays
from ._capabilities import Capabilities
from ._netopts import NETWORK_OPTIONS, NetworkOptions, tls_context
from ._offline import OfflineBuffer, Outgoing
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

__all__ = [
    "NETWORK_OPTIONS",
    "BusURL",
    "Capabilities",
    "DropReason",
    "IdentityMapper",
    "LocalPublisher",
    "Message",
    "MessageSink",
    "NetworkOptions",
    "NetworkTransport",
    "OfflineBuffer",
    "Outgoing",
    "Reconnectable",
    "RetainedLedger",
    "StatsRecorder",
    "Supervisor",
    "TaskSet",
    "TopicMapper",
    "Transport",
    "TransportSubscription",
    "backoff_delays",
    "describe_cause",
    "parse_bool",
    "parse_float",
    "parse_int",
    "tls_context",
    "topic_matches",
]
