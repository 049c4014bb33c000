"""The exception tree: one root, builtin mixins where natural, structured attributes."""

from __future__ import annotations

import pytest

import cascade_bus
from cascade_bus import (
    BusClosed,
    BusError,
    CodecError,
    ConnectError,
    ConnectionLost,
    DecodeError,
    EncodeError,
    InvalidTopic,
    InvalidURL,
    PayloadTooLarge,
    PublishError,
    RequestTimeout,
    SubscribeError,
    TransportError,
    UnknownScheme,
    UnsupportedFeature,
)

EXPORTED_EXCEPTIONS = [
    obj
    for name in cascade_bus.__all__
    if isinstance(obj := getattr(cascade_bus, name), type) and issubclass(obj, BaseException)
]


def test_there_are_exported_exceptions() -> None:
    assert len(EXPORTED_EXCEPTIONS) == 17


@pytest.mark.parametrize("cls", EXPORTED_EXCEPTIONS, ids=lambda c: c.__name__)
def test_every_exported_exception_derives_from_bus_error(cls: type[BaseException]) -> None:
    assert issubclass(cls, BusError)
    assert issubclass(cls, Exception)
    assert cls.__doc__, f"{cls.__name__} needs a docstring saying when it is raised"


@pytest.mark.parametrize(
    ("cls", "builtin"),
    [
        (InvalidURL, ValueError),
        (UnknownScheme, ValueError),
        (InvalidTopic, ValueError),
        (RequestTimeout, TimeoutError),
        (ConnectError, ConnectionError),
        (ConnectionLost, ConnectionError),
        (UnsupportedFeature, NotImplementedError),
        (EncodeError, TypeError),
        (DecodeError, ValueError),
        (PayloadTooLarge, ValueError),
    ],
)
def test_builtin_mixins(cls: type[BaseException], builtin: type[BaseException]) -> None:
    assert issubclass(cls, builtin)


@pytest.mark.parametrize(
    ("cls", "parent"),
    [
        (UnknownScheme, InvalidURL),
        (ConnectError, TransportError),
        (ConnectionLost, TransportError),
        (PublishError, TransportError),
        (SubscribeError, TransportError),
        (RequestTimeout, TransportError),
        (EncodeError, CodecError),
        (DecodeError, CodecError),
        (PayloadTooLarge, CodecError),
    ],
)
def test_tree(cls: type[BaseException], parent: type[BaseException]) -> None:
    assert issubclass(cls, parent)


def test_state_errors_are_not_transport_errors() -> None:
    # "You closed it" must be distinguishable from "it broke from outside".
    assert not issubclass(BusClosed, TransportError)
    assert not issubclass(BusClosed, ConnectionError)
    assert not issubclass(ConnectionLost, BusClosed)


def test_builtin_except_clauses_catch_bus_errors() -> None:
    with pytest.raises(TimeoutError):
        raise RequestTimeout("no reply")
    with pytest.raises(ValueError):
        raise DecodeError("bad body", topic="t")


def test_structured_attributes() -> None:
    unknown = UnknownScheme("m", scheme="mqqt", suggestion="mqtt", known=("memory",))
    assert (unknown.scheme, unknown.suggestion, unknown.known) == ("mqqt", "mqtt", ("memory",))
    assert InvalidTopic("m", topic="a//b").topic == "a//b"
    assert PublishError("m", topic="t").topic == "t"
    assert PublishError("m").topic is None
    assert SubscribeError("m", pattern="a/#").pattern == "a/#"
    assert DecodeError("m", topic="t").topic == "t"
    too_large = PayloadTooLarge("m", size=10, limit=5)
    assert (too_large.size, too_large.limit) == (10, 5)
    assert str(too_large) == "m"


def test_unsupported_feature_message() -> None:
    err = UnsupportedFeature("redis", "queue groups", "use NATS")
    assert err.transport == "redis"
    assert err.feature == "queue groups"
    assert str(err) == "the 'redis' transport does not support queue groups: use NATS"
    assert str(UnsupportedFeature("x", "retain")) == "the 'x' transport does not support retain"


def test_errors_module_draws_the_tree() -> None:
    from cascade_bus import _errors

    doc = _errors.__doc__ or ""
    for cls in EXPORTED_EXCEPTIONS:
        assert cls.__name__ in doc
