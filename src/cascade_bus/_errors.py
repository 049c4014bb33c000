"""The cascade-bus exception tree: every error the library raises derives from `BusError`.

```
BusError
├── InvalidURL (ValueError)            a URL or option that cannot be parsed
├── UnknownScheme (InvalidURL)         no transport is registered for the URL scheme
├── InvalidTopic (ValueError)          a topic or pattern the portable syntax forbids
├── UnsupportedFeature (NotImplementedError)  the transport cannot do what was asked
├── TransportError                     something on the broker side went wrong
│   ├── ConnectError (ConnectionError)     the first connection could not be made
│   ├── ConnectionLost (ConnectionError)   an established connection broke
│   ├── PublishError                       a publish was refused or could not be confirmed
│   ├── SubscribeError                     a subscription was refused
│   └── RequestTimeout (TimeoutError)      no reply arrived in time
│       └── NoResponders                   the broker says nobody listens (NATS, memory)
├── CodecError
│   ├── EncodeError (TypeError)        a payload cannot be encoded
│   ├── DecodeError (ValueError)       a message body cannot be decoded (into the requested type)
│   └── PayloadTooLarge (ValueError)   an encoded message exceeds the transport's limit
└── BusClosed                          the bus (or subscription) was closed by its owner
```

Client-library exceptions are translated once, at the adapter boundary, and chained with
``raise ... from exc`` so the original stays visible in tracebacks.
"""

from __future__ import annotations

__all__ = [
    "BusClosed",
    "BusError",
    "CodecError",
    "ConnectError",
    "ConnectionLost",
    "DecodeError",
    "EncodeError",
    "InvalidTopic",
    "InvalidURL",
    "NoResponders",
    "PayloadTooLarge",
    "PublishError",
    "RequestTimeout",
    "SubscribeError",
    "TransportError",
    "UnknownScheme",
    "UnsupportedFeature",
]


class BusError(Exception):
    """Root of every exception raised by cascade-bus."""


class InvalidURL(BusError, ValueError):
    """Raised when a bus URL or one of its options cannot be parsed."""


class UnknownScheme(InvalidURL):
    """Raised when no transport is registered for a URL scheme.

    Attributes:
        scheme: The scheme that was asked for.
        suggestion: The closest known scheme, if any looks like a typo of it.
        known: Every scheme that is registered or installable.
    """

    def __init__(
        self, message: str, *, scheme: str, suggestion: str | None, known: tuple[str, ...]
    ) -> None:
        super().__init__(message)
        self.scheme = scheme
        self.suggestion = suggestion
        self.known = known


class InvalidTopic(BusError, ValueError):
    """Raised when a topic or subscription pattern breaks the portable topic rules.

    Attributes:
        topic: The offending topic (possibly truncated).
    """

    def __init__(self, message: str, *, topic: str) -> None:
        super().__init__(message)
        self.topic = topic


class UnsupportedFeature(BusError, NotImplementedError):
    """Raised when a transport is asked for something it declares it cannot do.

    Attributes:
        transport: The transport (scheme) that lacks the feature.
        feature: The capability that is missing, e.g. ``"queue_groups"`` or ``"qos=2"``.
    """

    def __init__(self, transport: str, feature: str, detail: str = "") -> None:
        text = f"the {transport!r} transport does not support {feature}"
        super().__init__(f"{text}: {detail}" if detail else text)
        self.transport = transport
        self.feature = feature


class TransportError(BusError):
    """Base for errors that come from the broker or the connection to it."""


class ConnectError(TransportError, ConnectionError):
    """Raised when a connection to the broker cannot be established."""


class ConnectionLost(TransportError, ConnectionError):
    """Raised when an established connection breaks and the operation cannot continue."""


class PublishError(TransportError):
    """Raised when a publish is refused, times out, or cannot be buffered.

    Attributes:
        topic: The topic of the message that was not published.
        reason: The loss-ledger reason the bus counts it under (a `DropReason` name such as
            ``"offline_overflow"``); None means ``"publish_failed"``.
    """

    def __init__(
        self, message: str, *, topic: str | None = None, reason: str | None = None
    ) -> None:
        super().__init__(message)
        self.topic = topic
        self.reason = reason


class SubscribeError(TransportError):
    """Raised when the broker refuses or does not confirm a subscription.

    Attributes:
        pattern: The pattern that could not be subscribed.
    """

    def __init__(self, message: str, *, pattern: str | None = None) -> None:
        super().__init__(message)
        self.pattern = pattern


class RequestTimeout(TransportError, TimeoutError):
    """Raised when `Bus.request` gets no reply within its timeout."""


class NoResponders(RequestTimeout):
    """Raised at once by `Bus.request` when the broker reports that nobody listens on the topic.

    Only transports that declare ``Capabilities.no_responders`` (NATS, memory) can tell; elsewhere
    such a request waits out its timeout. A `RequestTimeout`, so code catching that still works.
    """


class CodecError(BusError):
    """Base for errors turning payloads into bytes and back."""


class EncodeError(CodecError, TypeError):
    """Raised when a payload cannot be encoded (unsupported type, cyclic data, ...)."""


class DecodeError(CodecError, ValueError):
    """Raised (or reported) when a message body cannot be decoded into the requested type.

    Attributes:
        topic: The topic the undecodable message arrived on, if known.
    """

    def __init__(self, message: str, *, topic: str | None = None) -> None:
        super().__init__(message)
        self.topic = topic


class PayloadTooLarge(CodecError, ValueError):
    """Raised when an encoded message is larger than the transport accepts.

    Attributes:
        size: The encoded size in bytes.
        limit: The transport's limit in bytes.
    """

    def __init__(self, message: str, *, size: int, limit: int) -> None:
        super().__init__(message)
        self.size = size
        self.limit = limit


class BusClosed(BusError):
    """Raised when using a bus or subscription after its owner closed it."""
