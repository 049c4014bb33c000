"""Where test brokers are: ports, URLs, and the environment variables that name running ones."""

from __future__ import annotations

import os
import socket
import time
from typing import Literal
from urllib.parse import urlsplit

__all__ = [
    "ENV_VARS",
    "LOCALHOST",
    "SCHEMES",
    "STANDARD_PORTS",
    "BrokerKind",
    "broker_url",
    "free_port",
    "host_port",
    "port_open",
    "wait_for_port",
]

BrokerKind = Literal["mqtt", "nats", "redis"]
"""The broker families the test suite knows about."""

LOCALHOST = "127.0.0.1"
"""The address every private broker and proxy listens on."""

ENV_VARS: dict[BrokerKind, str] = {
    "mqtt": "CASCADE_BUS_MQTT_URL",
    "nats": "CASCADE_BUS_NATS_URL",
    "redis": "CASCADE_BUS_REDIS_URL",
}
"""Environment variable that names an existing broker, per kind."""

STANDARD_PORTS: dict[BrokerKind, int] = {"mqtt": 1883, "nats": 4222, "redis": 6379}
"""Standard loopback port probed by ``broker_url``, per kind."""

SCHEMES: dict[BrokerKind, str] = {"mqtt": "mqtt", "nats": "nats", "redis": "redis"}
"""URL scheme used for brokers of each kind."""


def free_port(host: str = LOCALHOST) -> int:
    """Return a TCP port on ``host`` that was free a moment ago.

    Args:
        host: Interface to bind for the check.

    Returns:
        The port number the kernel picked.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """Return whether a TCP connection to ``host:port`` succeeds.

    Args:
        host: Host name or address.
        port: TCP port.
        timeout: Connect timeout in seconds.

    Returns:
        True if something accepted the connection.
    """
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> None:
    """Poll until ``host:port`` accepts TCP connections (e.g. a broker's second listener).

    Raises:
        TimeoutError: nothing accepted within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while not port_open(host, port):
        if time.monotonic() >= deadline:
            raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s")
        time.sleep(0.02)


def host_port(url: str, default_port: int | None = None) -> tuple[str, int]:
    """Return the host and port of a broker URL.

    Args:
        url: A URL such as ``mqtt://127.0.0.1:1883``.
        default_port: Port to use when the URL has none.

    Returns:
        The ``(host, port)`` pair.

    Raises:
        ValueError: If the URL has no host or no port and no default is given.
    """
    parts = urlsplit(url)
    port = parts.port if parts.port is not None else default_port
    if not parts.hostname or port is None:
        raise ValueError(f"cannot find host and port in URL {url!r}")
    return parts.hostname, port


def broker_url(kind: BrokerKind) -> str | None:
    """Return the URL of an already running broker of ``kind``, if any.

    The environment variable for ``kind`` wins (an empty value counts as
    unset); otherwise the standard port on 127.0.0.1 is probed.

    Args:
        kind: The broker kind.

    Returns:
        The URL, or None when the caller should start a private broker.
    """
    from_env = os.environ.get(ENV_VARS[kind], "").strip()
    if from_env:
        return from_env
    port = STANDARD_PORTS[kind]
    if port_open(LOCALHOST, port):
        return f"{SCHEMES[kind]}://{LOCALHOST}:{port}"
    return None
