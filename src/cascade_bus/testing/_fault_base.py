"""The fault suite's outage machinery (a proxy that cuts and refuses), fixtures and hooks."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, ClassVar, Protocol
from urllib.parse import urlsplit

import msgspec
import pytest
import pytest_asyncio

from .. import Bus, Envelope
from .._transport import NetworkTransport
from ._base import SuiteBase
from ._helpers import (
    BusFactory,
)
from ._proxy import TcpProxy

__all__ = [
    "DEFAULT_PORTS",
    "JUNK_ENVELOPE",
    "FaultBase",
    "Outage",
    "Restartable",
    "network",
    "raw_envelope",
]

#: Ports assumed when a URL names none (the brokers' registered defaults).
DEFAULT_PORTS: dict[str, int] = {
    "mqtt": 1883,
    "mqtts": 8883,
    "mqtt+ws": 80,
    "mqtt+wss": 443,
    "ws": 80,
    "wss": 443,
    "nats": 4222,
    "nats+tls": 4222,
    "tls": 4222,
    "redis": 6379,
    "rediss": 6379,
    "amqp": 5672,
    "amqps": 5671,
}

#: A body that claims to be one of our envelopes and is cut short: must be a counted drop.
JUNK_ENVELOPE = b'{"specversion":"1.0","id":"junk","type":'


class Outage:
    """An outage between some buses and their broker, made with `TcpProxy` objects.

    Buses opened on `url` go through the proxies (one per broker node); `begin` resets their
    connections and refuses new ones until `end`. Buses on the plain transport URL are not
    affected. ``before_close`` runs after the tracked buses closed, before the proxies go.
    """

    def __init__(
        self,
        proxies: Sequence[TcpProxy],
        url: str,
        timeout: float,
        *,
        before_close: Callable[[], Awaitable[Any]] | None = None,
    ) -> None:
        self.proxies = list(proxies)
        self.url = url
        """The transport URL through the proxies."""
        self._timeout = timeout
        self._before_close = before_close
        self._closers: list[Callable[[], Awaitable[Any]]] = []

    def track(self, close: Callable[[], Awaitable[Any]]) -> None:
        """Close something behind the proxies before they go (a bus's ``close``)."""
        self._closers.append(close)

    async def aclose(self) -> None:
        """Close what was tracked (while the broker is reachable), then the proxies."""
        for proxy in self.proxies:
            proxy.resume()
        try:
            async with asyncio.timeout(self._timeout * 3):
                await asyncio.gather(*(close() for close in self._closers))
            if self._before_close is not None:
                await self._before_close()
        finally:
            for proxy in self.proxies:
                await proxy.aclose()

    async def begin(self, *buses: Bus) -> None:
        """Cut every proxied connection, refuse new ones, and wait until ``buses`` noticed."""
        for proxy in self.proxies:
            proxy.pause()
        for proxy in self.proxies:
            await proxy.cut()
        async with asyncio.timeout(self._timeout):
            for bus in buses:
                await network(bus).wait_disconnected()

    async def end(self, *buses: Bus) -> None:
        """Let connections through again and wait until ``buses`` reconnected."""
        for proxy in self.proxies:
            proxy.resume()
        async with asyncio.timeout(self._timeout):
            for bus in buses:
                await network(bus).wait_connected(reconnects=1)


def network(bus: Bus) -> NetworkTransport:
    """The bus's transport as a `NetworkTransport` (fault cases need its connection state)."""
    transport = bus.transport
    if not isinstance(transport, NetworkTransport):
        pytest.skip(f"{bus.url.scheme}:// is not a NetworkTransport: no connection state to watch")
    return transport


def raw_envelope(topic: str, payload: Any, env_id: str) -> bytes:
    """A JSON envelope body with a fixed id, as a redelivery would carry it again."""
    env = Envelope(id=env_id, source="faults", type="conformance", topic=topic, payload=payload)
    return bytes(msgspec.json.encode(env))


class Restartable(Protocol):
    """A broker process the restart case can restart (`BrokerProcess` is one)."""

    @property
    def url(self) -> str:
        """The broker's URL."""

    async def arestart(self) -> Any:
        """Stop the broker and start it again on the same port and state."""


class FaultBase(SuiteBase):
    """The fault suite's fixtures, hooks and tuning; the cases build on it.

    Class attributes to tune: ``reconnect_options`` (passed to every bus behind the proxy),
    ``wait_timeout`` (any single wait, reconnects included).
    """

    #: Options for buses behind the proxy: reconnect fast so cases take milliseconds.
    reconnect_options: ClassVar[dict[str, Any]] = {"reconnect_min": 0.02, "reconnect_max": 0.2}
    wait_timeout: ClassVar[float] = 10.0
    #: False where a subscriber cannot tell a live retained publish from a plain one (MQTT
    #: 3.1.1): values it first saw live are then not resynced.
    live_retain_known: ClassVar[bool] = True
    #: Publishers x messages each in the restart case (10 x 1,000).
    restart_load: ClassVar[tuple[int, int]] = (10, 1_000)

    # -- fixtures and hooks ------------------------------------------------------------------

    @pytest_asyncio.fixture
    async def outage(self, transport_url: str) -> AsyncIterator[Outage]:
        """A proxy in front of the broker of ``transport_url`` (skips without a TCP endpoint)."""
        parts = urlsplit(transport_url)
        port = parts.port or DEFAULT_PORTS.get(parts.scheme)
        if not parts.hostname or port is None:
            pytest.skip(f"{parts.scheme}:// has no TCP endpoint to cut (no network connection)")
        proxy = TcpProxy(parts.hostname, port)
        await proxy.start()
        outage = Outage([proxy], proxy.rewrite(transport_url), self.wait_timeout)
        try:
            yield outage
        finally:
            await outage.aclose()

    @pytest.fixture
    def restartable_broker(self) -> Restartable:
        """A private broker the suite may restart, keeping its state on disk.

        Override with one of the broker fixtures (``private_mosquitto(persistence=True)``, ...);
        the default skips the restart case.
        """
        pytest.skip(
            f"{type(self).__name__} does not override restartable_broker (the suite cannot "
            "start a private broker of this kind)"
        )

    def durable_options(self) -> dict[str, Any]:
        """Options that make a subscriber's QoS 1 subscription outlive its connection."""
        return {"client_id": f"faults-{uuid.uuid4().hex[:12]}"}

    async def behind(self, make_bus: BusFactory, outage: Outage, **options: Any) -> Bus:
        """Open a bus whose connection goes through the outage's proxy."""
        bus = await make_bus(outage.url, **{**self.reconnect_options, **options})
        outage.track(bus.close)
        return bus

    async def send_internal_junk(self, bus: Bus, transport_url: str, topic: str) -> None:
        """Publish junk, with a plain client, on every channel the transport uses internally.

        ``bus`` is the subscriber under test (for its own control topics, inboxes, ...), which
        subscribes ``topic/+`` (or its children); return once the junk reached the broker.
        Override per transport; the default skips the case.
        """
        pytest.skip(
            f"{type(self).__name__} does not override send_internal_junk (the transport's "
            "internal channels are not known to the suite)"
        )
