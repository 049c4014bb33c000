"""Shared fixtures for the AMQP adapter's tests: the broker URL, a plain aio-pika client.

The session gets an exchange of its own (``exchange=cbtest_<hex>``), so its retained log and
queues never meet another run's; both are deleted when the session ends. Every wait here is
bounded; nothing sleeps to synchronise.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from types import SimpleNamespace

import aio_pika
import pytest
from cascade_bus_amqp import AmqpTransport

from cascade_bus import Bus
from cascade_bus.testing.brokers import port_open
from cascade_bus.testing.pytest_plugin import REQUIRE_ENV, brokers_required
from cascade_bus.testing.waits import WAIT, fault_kit

ENV_VAR = "CASCADE_BUS_AMQP_URL"


def amqp(bus: Bus) -> AmqpTransport:
    """The bus's transport, as the AMQP transport."""
    transport = bus.transport
    assert isinstance(transport, AmqpTransport)
    return transport


@pytest.fixture(scope="session")
def amqp_base_url() -> str:
    """The RabbitMQ URL (``CASCADE_BUS_AMQP_URL``, else 127.0.0.1:5672 guest/guest)."""
    url = os.environ.get(ENV_VAR, "").strip()
    if url:
        return url
    if port_open("127.0.0.1", 5672):
        return "amqp://guest:guest@127.0.0.1:5672/"
    reason = (
        "no AMQP (RabbitMQ) broker available on 127.0.0.1:5672 and CASCADE_BUS_AMQP_URL unset; "
        "install Debian's rabbitmq-server and start it with `rabbitmq-server -detached`"
    )
    if brokers_required():
        pytest.fail(f"{reason} [{REQUIRE_ENV}=1]", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def amqp_exchange() -> str:
    """The exchange this session's buses use (deleted, with its retained log, at the end)."""
    return f"cbtest_{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def amqp_url(amqp_base_url: str, amqp_exchange: str) -> Iterator[str]:
    """The URL the tests connect to: the broker, on this session's exchange."""
    sep = "&" if "?" in amqp_base_url else "?"
    yield f"{amqp_base_url}{sep}exchange={amqp_exchange}"
    asyncio.run(_drop_exchange(amqp_base_url.partition("?")[0], amqp_exchange))


async def _drop_exchange(url: str, exchange: str) -> None:
    async with asyncio.timeout(WAIT):
        connection = await aio_pika.connect(url)
        async with connection:
            channel = await connection.channel()
            await channel.queue_delete(f"{exchange}.retained")
            await channel.queue_delete(f"{exchange}.retained.head")
            await channel.exchange_delete(exchange)


@pytest.fixture
async def pika(amqp_base_url: str) -> AsyncIterator[aio_pika.abc.AbstractChannel]:
    """A plain aio-pika channel on the broker (closed after the test)."""
    async with asyncio.timeout(WAIT):
        connection = await aio_pika.connect(amqp_base_url.partition("?")[0])
    try:
        yield await connection.channel()
    finally:
        async with asyncio.timeout(WAIT):
            await connection.close()


@pytest.fixture
def kit() -> SimpleNamespace:
    """This module's helpers (tests run with --import-mode=importlib and cannot import it)."""
    return fault_kit(amqp=amqp)
