"""Pytest fixtures that provide real brokers, TCP proxies and unique topics.

Registered through the ``pytest11`` entry point (or list
``cascade_bus.testing.pytest_plugin`` in a root conftest's ``pytest_plugins``).

Broker URL fixtures (session scope): ``mqtt_url``, ``nats_url``, ``redis_url``
use an environment variable, else the broker on the standard loopback port,
else a private broker started for the session. When none can be had the
test is skipped with a reason naming the broker and how to install it, or
fails instead when ``CASCADE_BUS_REQUIRE_BROKERS=1``.

Factories (function scope): ``private_mosquitto``, ``private_nats``,
``private_redis`` start fresh brokers on free ports (stopped after the
test); ``tcp_proxy`` creates ``TcpProxy`` instances (closed after the test).
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, NoReturn, ParamSpec

import pytest

from cascade_bus.testing.brokers import (
    BrokerKind,
    BrokerNotFoundError,
    BrokerProcess,
    TcpProxy,
    broker_url,
    host_port,
    install_hint,
    start_mosquitto,
    start_nats,
    start_redis,
)
from cascade_bus.testing.waits import WAIT

if TYPE_CHECKING:
    from pytest_asyncio import fixture as _async_fixture

    from cascade_bus import Bus
else:
    try:
        from pytest_asyncio import fixture as _async_fixture
    except ImportError:  # pragma: no cover - the async fixture then needs another plugin
        _async_fixture = pytest.fixture

__all__ = [
    "REQUIRE_ENV",
    "ProxyFactory",
    "broker_unavailable",
    "brokers_required",
    "buses",
    "mqtt_url",
    "nats_url",
    "private_mosquitto",
    "private_nats",
    "private_redis",
    "redis_url",
    "tcp_proxy",
    "unique_topic",
]

REQUIRE_ENV = "CASCADE_BUS_REQUIRE_BROKERS"
"""Set to 1 to turn "broker unavailable" skips into failures (CI)."""

_BROKER_NAMES: dict[BrokerKind, str] = {
    "mqtt": "MQTT (Mosquitto or amqtt)",
    "nats": "NATS (nats-server)",
    "redis": "Redis (redis-server)",
}

_STARTERS: dict[BrokerKind, Callable[[], BrokerProcess]] = {
    "mqtt": start_mosquitto,
    "nats": start_nats,
    "redis": start_redis,
}

_P = ParamSpec("_P")

ProxyFactory = Callable[..., Awaitable[TcpProxy]]
"""Type of the ``tcp_proxy`` fixture: ``await make(host, port)`` or ``await make(url)``."""


def brokers_required() -> bool:
    """Return whether missing brokers must fail tests instead of skipping them."""
    return os.environ.get(REQUIRE_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def broker_unavailable(kind: BrokerKind, detail: str) -> NoReturn:
    """Skip the current test because no broker of ``kind`` is available.

    Fails it instead when ``CASCADE_BUS_REQUIRE_BROKERS=1``.

    Args:
        kind: The missing broker kind.
        detail: What went wrong, for the reason.
    """
    reason = f"no {_BROKER_NAMES[kind]} broker available: {detail}"
    hint = install_hint(kind)
    if hint not in detail:
        reason = f"{reason}; {hint}"
    if brokers_required():
        pytest.fail(f"{reason} [{REQUIRE_ENV}=1]", pytrace=False)
    pytest.skip(reason)


def _session_broker_url(kind: BrokerKind) -> Iterator[str]:
    url = broker_url(kind)
    if url is not None:
        yield url
        return
    try:
        broker = _STARTERS[kind]()
    except BrokerNotFoundError as exc:
        broker_unavailable(kind, str(exc))
    try:
        yield broker.url
    finally:
        broker.close()


@pytest.fixture(scope="session")
def mqtt_url() -> Iterator[str]:
    """Return the URL of an MQTT broker for the whole session."""
    yield from _session_broker_url("mqtt")


@pytest.fixture(scope="session")
def nats_url() -> Iterator[str]:
    """Return the URL of a NATS server (with JetStream) for the whole session."""
    yield from _session_broker_url("nats")


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """Return the URL of a Redis server for the whole session."""
    yield from _session_broker_url("redis")


def _tracked(
    kind: BrokerKind,
    start: Callable[_P, BrokerProcess],
    started: list[BrokerProcess],
) -> Callable[_P, BrokerProcess]:
    def make(*args: _P.args, **kwargs: _P.kwargs) -> BrokerProcess:
        try:
            broker = start(*args, **kwargs)
        except BrokerNotFoundError as exc:
            broker_unavailable(kind, str(exc))
        started.append(broker)
        return broker

    return make


def _close_all(brokers: list[BrokerProcess]) -> None:
    errors: list[BaseException] = []
    for broker in reversed(brokers):
        try:
            broker.close()
        except Exception as exc:
            errors.append(exc)
    if errors:
        raise errors[0]


@pytest.fixture
def private_mosquitto() -> Iterator[Callable[..., BrokerProcess]]:
    """Return a factory that starts private Mosquitto brokers (``start_mosquitto`` args).

    Every broker started through it is stopped and removed after the test.
    """
    started: list[BrokerProcess] = []
    try:
        yield _tracked("mqtt", start_mosquitto, started)
    finally:
        _close_all(started)


@pytest.fixture
def private_nats() -> Iterator[Callable[..., BrokerProcess]]:
    """Return a factory that starts private nats-servers (``start_nats`` args).

    Every broker started through it is stopped and removed after the test.
    """
    started: list[BrokerProcess] = []
    try:
        yield _tracked("nats", start_nats, started)
    finally:
        _close_all(started)


@pytest.fixture
def private_redis() -> Iterator[Callable[..., BrokerProcess]]:
    """Return a factory that starts private redis-servers (``start_redis`` args).

    Every broker started through it is stopped and removed after the test.
    """
    started: list[BrokerProcess] = []
    try:
        yield _tracked("redis", start_redis, started)
    finally:
        _close_all(started)


@_async_fixture
async def tcp_proxy() -> AsyncIterator[ProxyFactory]:
    """Return ``async make(host, port)`` (or ``make(url)``) that starts a ``TcpProxy``.

    All proxies made through it are closed after the test.
    """
    proxies: list[TcpProxy] = []

    async def make(host_or_url: str, port: int | None = None) -> TcpProxy:
        if port is None:
            host, port = host_port(host_or_url)
        else:
            host = host_or_url
        proxy = TcpProxy(host, port)
        await proxy.start()
        proxies.append(proxy)
        return proxy

    try:
        yield make
    finally:
        for proxy in reversed(proxies):
            await proxy.aclose()


@_async_fixture
async def buses() -> AsyncIterator[list[Bus]]:
    """A list to append opened buses to; all are closed after the test (bounded, in reverse)."""
    opened: list[Bus] = []
    try:
        yield opened
    finally:
        async with asyncio.timeout(2 * WAIT):
            await asyncio.gather(*(bus.close() for bus in reversed(opened)), return_exceptions=True)


@pytest.fixture
def unique_topic() -> str:
    """Return a topic prefix unique to this test, e.g. ``t/3f2a...``.

    It uses ``/`` separators, has no wildcards and no empty levels.
    """
    return f"t/{uuid.uuid4().hex}"
