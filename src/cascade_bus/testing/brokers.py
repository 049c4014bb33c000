"""Start, find and disturb real message brokers for integration tests (standard library only).

``broker_url`` finds a running broker: the environment variable (``CASCADE_BUS_MQTT_URL``, ...)
first, then the standard port on 127.0.0.1; otherwise ``start_mosquitto``, ``start_nats`` or
``start_redis`` start a private `BrokerProcess` on a free port, which fault tests may stop and
restart on the same port. `TcpProxy` sits between a client and a broker and cuts or refuses
connections on demand. This module re-exports the parts (``_addresses``, ``_process``,
``_launchers``, ``_proxy``); import from here.
"""

from __future__ import annotations

from ._addresses import (
    ENV_VARS,
    LOCALHOST,
    SCHEMES,
    STANDARD_PORTS,
    BrokerKind,
    broker_url,
    free_port,
    host_port,
    port_open,
    wait_for_port,
)
from ._launchers import (
    BrokerNotFoundError,
    find_executable,
    install_hint,
    start_amqtt,
    start_mosquitto,
    start_nats,
    start_redis,
)
from ._process import START_TIMEOUT, STOP_TIMEOUT, BrokerProcess, CommandBuilder
from ._proxy import TcpProxy

__all__ = [
    "ENV_VARS",
    "LOCALHOST",
    "SCHEMES",
    "STANDARD_PORTS",
    "START_TIMEOUT",
    "STOP_TIMEOUT",
    "BrokerKind",
    "BrokerNotFoundError",
    "BrokerProcess",
    "CommandBuilder",
    "TcpProxy",
    "broker_url",
    "find_executable",
    "free_port",
    "host_port",
    "install_hint",
    "port_open",
    "start_amqtt",
    "start_mosquitto",
    "start_nats",
    "start_redis",
    "wait_for_port",
]
