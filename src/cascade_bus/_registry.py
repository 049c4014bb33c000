"""URL scheme → transport class, found through the ``cascade_bus.transports`` entry points.

Entry points are read on the first lookup, not at import, and a transport's module is imported
only when its scheme is used. `register_transport` adds one at run time (tests, plugins).
"""

from __future__ import annotations

import difflib
import importlib
from importlib.metadata import EntryPoint, entry_points
from typing import TYPE_CHECKING

from ._errors import InvalidURL, UnknownScheme
from ._install import install_command

if TYPE_CHECKING:
    from ._transport import Transport

__all__ = [
    "ENTRY_POINT_GROUP",
    "available_transports",
    "get_transport",
    "register_transport",
    "unregister_transport",
]

ENTRY_POINT_GROUP = "cascade_bus.transports"

#: First-party schemes and the distribution that provides each (for "pip install ..." hints).
#: ``ws``, ``wss`` and ``tls`` are the older, generic names of ``mqtt+ws``, ``mqtt+wss`` and
#: ``nats+tls`` (aliases).
KNOWN_PACKAGES: dict[str, str] = {
    "memory": "cascade-bus",
    "mqtt": "cascade-bus-mqtt",
    "mqtts": "cascade-bus-mqtt",
    "mqtt+ws": "cascade-bus-mqtt",
    "mqtt+wss": "cascade-bus-mqtt",
    "ws": "cascade-bus-mqtt",
    "wss": "cascade-bus-mqtt",
    "nats": "cascade-bus-nats",
    "nats+tls": "cascade-bus-nats",
    "tls": "cascade-bus-nats",
    "amqp": "cascade-bus-amqp",
    "amqps": "cascade-bus-amqp",
    "redis": "cascade-bus-redis",
    "rediss": "cascade-bus-redis",
    "redis+cluster": "cascade-bus-redis[cluster]",
    "rediss+cluster": "cascade-bus-redis[cluster]",
}

#: Schemes of other messaging protocols that no cascade-bus adapter speaks (yet): an unknown
#: scheme among them says so instead of suggesting a near spelling (``kafka`` is not ``nats``).
OTHER_PROTOCOLS: dict[str, str] = {
    "kafka": "Apache Kafka",
    "kafka+ssl": "Apache Kafka",
    "pulsar": "Apache Pulsar",
    "pulsar+ssl": "Apache Pulsar",
    "stomp": "STOMP",
    "stomp+ssl": "STOMP",
    "zmq": "ZeroMQ",
    "zeromq": "ZeroMQ",
    "nsq": "NSQ",
    "sqs": "Amazon SQS",
    "sb": "Azure Service Bus",
    "coap": "CoAP",
    "coaps": "CoAP",
    "xmpp": "XMPP",
    "mqtt-sn": "MQTT-SN",
}

# Used only when the package metadata is missing (running from a source tree without install).
_BUILTIN = {"memory": "cascade_bus._memory:MemoryTransport"}

_registered: dict[str, type[Transport]] = {}
_entry_points: dict[str, EntryPoint] | None = None


def _discovered() -> dict[str, EntryPoint]:
    global _entry_points
    if _entry_points is None:
        found: dict[str, EntryPoint] = {}
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            found.setdefault(ep.name.lower(), ep)
        _entry_points = found
    return _entry_points


def refresh() -> None:
    """Forget the cached entry points so the next lookup reads the installed metadata again."""
    global _entry_points
    _entry_points = None


def register_transport(scheme: str, cls: type[Transport], *, replace: bool = False) -> None:
    """Make ``scheme://`` URLs use ``cls``.

    Args:
        scheme: The URL scheme, e.g. ``"kafka"``.
        cls: A `Transport` subclass.
        replace: Allow replacing a scheme that is already registered or installed.

    Raises:
        ValueError: the scheme is taken and ``replace`` is false, or ``cls`` is not a
            `Transport` subclass.
    """
    from ._transport import Transport

    key = scheme.lower()
    if not (isinstance(cls, type) and issubclass(cls, Transport)):
        raise InvalidURL(
            f"register_transport({scheme!r}, ...) needs a Transport subclass, got {cls!r}"
        )
    if not replace and (key in _registered or key in _discovered()):
        raise InvalidURL(f"scheme {scheme!r} is already registered; pass replace=True to override")
    _registered[key] = cls


def unregister_transport(scheme: str) -> None:
    """Remove a transport added with `register_transport` (installed ones stay)."""
    _registered.pop(scheme.lower(), None)


def available_transports() -> dict[str, str]:
    """Map every usable scheme to where its transport comes from (``module:Class``)."""
    out = {name: ep.value for name, ep in _discovered().items()}
    for name, value in _BUILTIN.items():
        out.setdefault(name, value)
    for name, cls in _registered.items():
        out[name] = f"{cls.__module__}:{cls.__qualname__}"
    return dict(sorted(out.items()))


def get_transport(scheme: str) -> type[Transport]:
    """Return the transport class for a scheme, importing it on first use.

    Raises:
        UnknownScheme: nothing provides the scheme; the message suggests the closest known
            scheme and the package to install.
    """
    key = scheme.lower()
    cls = _registered.get(key)
    if cls is not None:
        return cls
    ep = _discovered().get(key)
    target = ep.value if ep is not None else _BUILTIN.get(key)
    if target is None:
        raise _unknown(key)
    try:
        module_name, _, attr = target.partition(":")
        loaded = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        package = KNOWN_PACKAGES.get(key)
        again = (
            install_command(package).replace(" install ", " install --force-reinstall ", 1)
            if package
            else "reinstall the package that provides it"
        )
        raise UnknownScheme(
            f"the transport for {key}:// ({target}) is installed but cannot be imported: {exc}; "
            f"reinstall it ({again})",
            scheme=key,
            suggestion=None,
            known=tuple(available_transports()),
        ) from exc
    _registered[key] = loaded
    return loaded  # type: ignore[no-any-return]


def _unknown(scheme: str) -> UnknownScheme:
    usable = tuple(available_transports())
    installed = f" (installed: {', '.join(usable) or 'none'})"
    package = KNOWN_PACKAGES.get(scheme)
    if package is not None:  # a first-party adapter that is not installed
        text = (
            f"no transport for scheme {scheme!r}; install the adapter: {install_command(package)}"
        )
        return UnknownScheme(text + installed, scheme=scheme, suggestion=None, known=usable)
    protocol = OTHER_PROTOCOLS.get(scheme)
    if protocol is not None:
        text = (
            f"no transport for scheme {scheme!r}: {protocol} is not supported yet (no "
            f"cascade-bus adapter; a third-party one would provide {scheme}:// through the "
            f"{ENTRY_POINT_GROUP!r} entry points)"
        )
        return UnknownScheme(text + installed, scheme=scheme, suggestion=None, known=usable)
    candidates = sorted(set(usable) | set(KNOWN_PACKAGES))
    close = difflib.get_close_matches(scheme, candidates, n=1, cutoff=0.5)
    suggestion = close[0] if close else None
    text = f"no transport for scheme {scheme!r}"
    if suggestion is not None:
        text += f"; did you mean {suggestion}?"
        if suggestion not in usable:
            text += f" {install_command(KNOWN_PACKAGES[suggestion])}"
    return UnknownScheme(text + installed, scheme=scheme, suggestion=suggestion, known=usable)
