"""AMQP URL options, parsed and checked once: ``amqp://user:pass@host:5672/vhost?prefetch=...``."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote

from cascade_bus import InvalidURL, UnsupportedFeature
from cascade_bus.spi import NETWORK_OPTIONS, BusURL, NetworkOptions, parse_float, parse_int

__all__ = ["DEFAULT_MAX_PAYLOAD", "AmqpOptions"]

#: RabbitMQ's default ``max_message_size`` (128 MiB since 3.8). AMQP does not announce it.
DEFAULT_MAX_PAYLOAD = 128 * 1024 * 1024

_KNOWN = NETWORK_OPTIONS | {
    "heartbeat",
    "prefetch",
    "exchange",
    "client_id",
    "connect_timeout",
    "max_payload",
    "retained_max_bytes",
}
#: Last-will options (the MQTT transport's): refused, RabbitMQ has no last will.
_WILL = ("will_topic", "will_payload", "will_qos", "will_retain", "presence_topic")
_NAME = re.compile(r"^[A-Za-z0-9_.:\-]{1,200}$")


@dataclass(frozen=True, slots=True, repr=False)
class AmqpOptions:
    """Every option the AMQP transport understands, with its default.

    Attributes:
        host: Broker host.
        port: Broker port (5672, or 5671 for amqps).
        vhost: The virtual host (the URL path, ``/`` by default).
        username: User (``guest`` when the URL names none).
        password: Password (never shown).
        heartbeat: AMQP heartbeat in seconds (0: off).
        prefetch: Unacknowledged QoS 1 messages a subscription may hold.
        exchange: The durable topic exchange every topic is routed through.
        client_id: Names durable QoS 1 queues (they then outlive the connection).
        connect_timeout: Seconds one connection attempt may take.
        max_payload: Largest body accepted (RabbitMQ's ``max_message_size``).
        retained_max_bytes: Retention of the retained-message stream (0: unbounded).
        network: The shared reconnect / offline-buffer / TLS settings.
    """

    host: str
    port: int
    vhost: str
    username: str
    password: str
    heartbeat: int
    prefetch: int
    exchange: str
    client_id: str | None
    connect_timeout: float
    max_payload: int
    retained_max_bytes: int
    network: NetworkOptions

    def __repr__(self) -> str:
        return (
            f"AmqpOptions(host={self.host!r}, port={self.port}, vhost={self.vhost!r}, "
            f"username={self.username!r}, password=[secure], exchange={self.exchange!r})"
        )

    @property
    def retained_stream(self) -> str:
        """The stream queue that holds the retained log."""
        return f"{self.exchange}.retained"

    def client_url(self) -> str:
        """The URL handed to aiormq (credentials included: never log it)."""
        user, password = quote(self.username, safe=""), quote(self.password, safe="")
        scheme = "amqps" if self.network.tls is not None else "amqp"
        return (
            f"{scheme}://{user}:{password}@{self.host}:{self.port}/"
            f"{quote(self.vhost, safe='')}?heartbeat={self.heartbeat}&name=cascade-bus"
        )

    @classmethod
    def parse(cls, url: BusURL, options: Mapping[str, Any]) -> AmqpOptions:
        """Read ``url`` and ``options`` (URL query overlaid with keyword options).

        Raises:
            InvalidURL: an unknown option or a bad value, naming it (never the password).
            UnsupportedFeature: a last-will option (not emulated).
        """
        will = [key for key in _WILL if key in options]
        if will:
            raise UnsupportedFeature(
                url.scheme,
                "last will",
                "AMQP 0-9-1 has nothing that publishes for a client that vanished, and the "
                f"adapter does not emulate a last will ({', '.join(will)})",
            )
        unknown = set(options) - _KNOWN
        if unknown:
            raise InvalidURL(
                f"unknown amqp option(s): {', '.join(sorted(unknown))}; known: "
                f"{', '.join(sorted(_KNOWN))}"
            )
        tls = url.scheme == "amqps"
        exchange = str(options.get("exchange", "cascade_bus"))
        if not _NAME.match(exchange) or exchange.startswith("amq."):
            raise InvalidURL(
                f"exchange={exchange!r}: use letters, digits and '_.:-' (not 'amq.' names)"
            )
        client_id = options.get("client_id") or None
        if client_id is not None and not _NAME.match(str(client_id)):
            raise InvalidURL(f"client_id={client_id!r}: use letters, digits and '_.:-'")
        values = {
            name: parse_int(name, options.get(name, default))
            for name, default in (
                ("heartbeat", 60),
                ("prefetch", 256),
                ("max_payload", DEFAULT_MAX_PAYLOAD),
                ("retained_max_bytes", 0),
            )
        }
        for name, value in values.items():
            if value < 0 or (name in ("prefetch", "max_payload") and value == 0):
                raise InvalidURL(f"{name}={value}: out of range")
        timeout = parse_float("connect_timeout", options.get("connect_timeout", 10.0))
        if timeout <= 0:
            raise InvalidURL(f"connect_timeout={timeout}: must be > 0")
        path = url.path[1:] if url.path.startswith("/") else url.path
        return cls(
            host=url.host or "127.0.0.1",
            port=url.port or (5671 if tls else 5672),
            vhost=unquote(path) or "/",
            username=url.username or "guest",
            password=url.password if url.password is not None else "guest",
            heartbeat=values["heartbeat"],
            prefetch=values["prefetch"],
            exchange=exchange,
            client_id=str(client_id) if client_id is not None else None,
            connect_timeout=timeout,
            max_payload=values["max_payload"],
            retained_max_bytes=values["retained_max_bytes"],
            network=NetworkOptions.parse(options, scheme=url.scheme, tls=tls),
        )
