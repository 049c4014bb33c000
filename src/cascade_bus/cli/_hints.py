"""Plain-words advice for the failures people meet first: no broker, wrong host, bad password."""

from __future__ import annotations

from cascade_bus import BusURL

__all__ = ["BROKERS", "connect_hint"]

#: scheme -> (what runs there, how to start one locally, default port).
BROKERS: dict[str, tuple[str, str, int]] = {
    "mqtt": ("an MQTT broker", "mosquitto -p {port}", 1883),
    "mqtts": ("an MQTT broker with TLS", "mosquitto -c <config with a TLS listener>", 8883),
    "ws": ("an MQTT broker with a WebSocket listener", "mosquitto -c <config>", 80),
    "wss": ("an MQTT broker with a WebSocket listener", "mosquitto -c <config>", 443),
    "nats": ("a NATS server", "nats-server -js -p {port}", 4222),
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
}

_DNS = ("name or service not known", "nodename nor servname", "name resolution", "getaddrinfo")
_AUTH = ("not authori", "bad user name", "authenticat", "password", "noauth", "wrongpass")


def connect_hint(url: BusURL, message: str) -> str:
    """Say what to try when connecting to ``url`` failed with ``message``.

    Args:
        url: The bus URL that could not be reached.
        message: The error text (its cause decides the advice).

    Returns:
        One short sentence without the password.
    """
    low = message.lower()
    if any(word in low for word in _DNS):
        return f"check the host name {url.host!r}"
    if any(word in low for word in _AUTH):
        return "check the user name and password in the URL"
    broker = BROKERS.get(url.scheme)
    if broker is None:
        return "is the broker running and reachable from here?"
    what, command, default_port = broker
    port = url.port or default_port
    where = f"{url.host or '127.0.0.1'}:{port}"
    if "timed out" in low or "within" in low:
        return f"is {what} up at {where}? check the address and any firewall in between"
    return f"is {what} running at {where}? start one with `{command.format(port=port)}`"
