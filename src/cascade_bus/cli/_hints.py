"""Plain-words advice for the failures people meet first: no broker, wrong host or port, TLS."""

from __future__ import annotations

import socket

from cascade_bus import BusURL

__all__ = ["BROKERS", "WELL_KNOWN_PORTS", "connect_hint"]

#: scheme -> (what runs there, how to start one locally, default port).
BROKERS: dict[str, tuple[str, str, int]] = {
    "mqtt": ("an MQTT broker", "mosquitto -p {port}", 1883),
    "mqtts": ("an MQTT broker with TLS", "mosquitto -c <config with a TLS listener>", 8883),
    "mqtt+ws": ("an MQTT broker with a WebSocket listener", "mosquitto -c <config>", 80),
    "mqtt+wss": ("an MQTT broker with a WebSocket listener", "mosquitto -c <config>", 443),
    "ws": ("an MQTT broker with a WebSocket listener", "mosquitto -c <config>", 80),
    "wss": ("an MQTT broker with a WebSocket listener", "mosquitto -c <config>", 443),
    "nats": ("a NATS server", "nats-server -js -p {port}", 4222),
    "nats+tls": ("a NATS server with TLS", "nats-server -js --tls ...", 4222),
    "tls": ("a NATS server with TLS", "nats-server -js --tls ...", 4222),
    "redis": ("a Redis server", "redis-server --port {port}", 6379),
    "rediss": ("a Redis server with TLS", "redis-server --tls-port {port} ...", 6380),
    "redis+cluster": (
        "a Redis Cluster",
        "redis-server --cluster-enabled yes --port {port} ... && redis-cli --cluster create ...",
        6379,
    ),
    "rediss+cluster": (
        "a Redis Cluster with TLS",
        "redis-server --cluster-enabled yes --tls-cluster yes ...",
        6380,
    ),
    "amqp": ("an AMQP 0-9-1 broker (RabbitMQ)", "rabbitmq-server -detached", 5672),
    "amqps": ("an AMQP broker with TLS (RabbitMQ)", "rabbitmq-server with a TLS listener", 5671),
}

_DNS = ("name or service not known", "nodename nor servname", "name resolution", "getaddrinfo")
_AUTH = ("not authori", "bad user name", "authenticat", "password", "noauth", "wrongpass")
_TLS = ("handshake", "ssl", "tls", "certificate")
_PROBE_TIMEOUT = 1.0

#: port -> (protocol family, what usually listens there): to say what a wrong port reaches.
WELL_KNOWN_PORTS: dict[int, tuple[str, str]] = {
    1883: ("mqtt", "an MQTT broker (mqtt://)"),
    8883: ("mqtt", "an MQTT broker with TLS (mqtts://)"),
    4222: ("nats", "a NATS server (nats://)"),
    6379: ("redis", "a Redis server (redis://)"),
    5672: ("amqp", "an AMQP broker such as RabbitMQ"),
    80: ("http", "a web server"),
    443: ("http", "a web server with TLS"),
}
_FAMILY = {"mqtt": "mqtt", "mqtts": "mqtt", "ws": "mqtt", "wss": "mqtt", "nats": "nats",
           "tls": "nats", "redis": "redis", "rediss": "redis", "redis+cluster": "redis",
           "rediss+cluster": "redis", "amqp": "amqp", "amqps": "amqp"}  # fmt: skip
_PLAIN = {"mqtts": "mqtt", "wss": "ws", "tls": "nats", "rediss": "redis",
          "rediss+cluster": "redis+cluster", "amqps": "amqp"}  # fmt: skip


def _resolves(host: str) -> bool:
    """True when ``host`` is an address or a name that resolves (blocking: outside the loop)."""
    try:
        socket.getaddrinfo(host, None)
    except (OSError, UnicodeError):
        return False
    return True


def _listening(host: str, port: int) -> bool:
    """True when something accepts TCP connections at ``host:port`` (a one-second probe)."""
    try:
        with socket.create_connection((host, port), timeout=_PROBE_TIMEOUT):
            return True
    except OSError:
        return False


def connect_hint(url: BusURL, message: str) -> str:
    """Say what to try when connecting to ``url`` failed with ``message``.

    It may look at the network to tell the cases apart (does the host name resolve, does
    something else listen on the port), so it blocks for up to a second or two: call it
    outside the event loop (or in a thread).

    Args:
        url: The bus URL that could not be reached.
        message: The error text (its cause decides the advice).

    Returns:
        One short sentence without the password.
    """
    low = message.lower()
    host = url.host or "127.0.0.1"
    if any(word in low for word in _DNS) or not _resolves(host):
        return f"check the host name {host!r}: it does not resolve"
    if any(word in low for word in _AUTH):
        return "check the user name and password in the URL"
    broker = BROKERS.get(url.scheme)
    if broker is None:
        return "is the broker running and reachable from here?"
    what, command, default_port = broker
    port = url.port or default_port
    where = f"{host}:{port}"
    plain = _PLAIN.get(url.scheme)
    if plain is not None and any(word in low for word in _TLS):
        return (
            f"{where} did not complete a TLS handshake: if it is a plain server, use "
            f"{plain}:// instead of {url.scheme}://"
        )
    if _listening(host, port):  # something is there: do not suggest starting a server
        family, usual = WELL_KNOWN_PORTS.get(port, ("", ""))
        if usual and family != _FAMILY.get(url.scheme):
            return (
                f"{where} is not {what}: port {port} is where {usual} usually listens; "
                "check the port and the scheme"
            )
        return (
            f"something listens at {where} but did not answer as {what}; check the port, "
            "the scheme and whether it expects TLS"
        )
    if "timed out" in low or "within" in low:
        return f"is {what} up at {where}? check the address and any firewall in between"
    return f"is {what} running at {where}? start one with `{command.format(port=port)}`"
