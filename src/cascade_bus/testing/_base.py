"""The fixtures every shared suite (conformance, faults) gives its cases."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterable
from typing import Any, ClassVar

import pytest
import pytest_asyncio

from .. import Bus, Connector, ErrorHook, connect
from ._helpers import BusFactory, Collector, ConnectorFactory

__all__ = ["SuiteBase"]


class SuiteBase:
    """Fixtures and helpers of the shared suites; subclass a suite and provide the URL.

    Set the class attribute ``url`` or override the ``transport_url`` fixture. Tune
    ``wait_timeout`` (seconds any single wait may take) for slow brokers.

    Fixtures provided to the cases (and to your own tests in the subclass):
        transport_url: The URL under test.
        make_bus: ``await make_bus(url=None, *, on_error=None, **options)`` opens another bus;
            every bus it made is closed after the test.
        bus: One open bus on ``transport_url``.
        unique: A fresh hex id for the test; retained messages under ``conf/<unique>`` and
            ``cascade/constraints/conf-<unique>`` are cleared after the test.
        topic: ``conf/<unique>``, the test's private topic prefix.
        make_connector: Builds Cascade `Connector` objects, disconnected after the test
            (``presence=False`` unless given).
    """

    pytestmark: ClassVar[list[pytest.MarkDecorator]] = [pytest.mark.asyncio]

    #: The URL under test, unless the subclass overrides the ``transport_url`` fixture.
    url: ClassVar[str | None] = None
    #: The longest any single wait in a case may take, in seconds.
    wait_timeout: ClassVar[float] = 5.0
    #: Bound for closing the buses and connectors a test opened.
    close_timeout: ClassVar[float] = 30.0
    #: Largest ``max_payload`` the oversized-payload case will allocate a message for.
    max_oversized: ClassVar[int] = 32 * 1024 * 1024

    # -- fixtures --------------------------------------------------------------------------

    @pytest.fixture
    def transport_url(self) -> str:
        """The URL under test: the class attribute ``url``; override for another source."""
        if self.url is None:
            pytest.fail(
                f"{type(self).__name__} must set url = '<scheme>://...' or override the "
                "transport_url fixture"
            )
        return self.url

    @pytest_asyncio.fixture
    async def make_bus(self, transport_url: str) -> AsyncIterator[BusFactory]:
        """Open extra buses; all of them are closed after the test."""
        buses: list[Bus] = []
        timeout = self.wait_timeout

        async def factory(
            url: str | None = None, /, *, on_error: ErrorHook | None = None, **options: Any
        ) -> Bus:
            bus = connect(url or transport_url, on_error=on_error, **options)
            buses.append(bus)
            async with asyncio.timeout(timeout):
                await bus.open()
            return bus

        try:
            yield factory
        finally:
            async with asyncio.timeout(self.close_timeout):
                await asyncio.gather(*(b.close() for b in buses))

    @pytest_asyncio.fixture
    async def bus(self, make_bus: BusFactory) -> Bus:
        """An open bus on the transport URL, closed after the test."""
        return await make_bus()

    @pytest_asyncio.fixture
    async def unique(self, make_bus: BusFactory) -> AsyncIterator[str]:
        """A fresh id; retained messages under the test's prefixes are cleared afterwards."""
        hex_id = uuid.uuid4().hex
        yield hex_id
        await self._clear_retained(
            make_bus, (f"conf/{hex_id}/#", f"cascade/constraints/conf-{hex_id}/#")
        )

    @pytest.fixture
    def topic(self, unique: str) -> str:
        """The test's private topic prefix, ``conf/<hex>``."""
        return f"conf/{unique}"

    @pytest_asyncio.fixture
    async def make_connector(self, transport_url: str) -> AsyncIterator[ConnectorFactory]:
        """Build Cascade Connectors; all of them are disconnected after the test."""
        made: list[Connector] = []

        def factory(url: str | None = None, /, **options: Any) -> Connector:
            # No presence unless a case asks: it would leave a retained status per connector
            # on cascade/status/ of a shared broker (the presence cases pass their own topic).
            options.setdefault("presence", False)
            connector = Connector(url or transport_url, **options)
            made.append(connector)
            return connector

        try:
            yield factory
        finally:
            async with asyncio.timeout(self.close_timeout):
                await asyncio.gather(*(c.disconnect() for c in made))

    async def _clear_retained(self, make_bus: BusFactory, patterns: Iterable[str]) -> None:
        """Publish an empty retained body to every topic that holds one under ``patterns``."""
        bus = await make_bus()
        if not (bus.capabilities.retain and bus.capabilities.wildcards):
            return
        for pattern in patterns:
            found = Collector()
            sub = await bus.subscribe(pattern, found)
            await sub.unsubscribe()
            for name in sorted({e.topic for e in found.envelopes if not e.is_clear}):
                await bus.publish(name, b"", retain=True)

    # -- helpers for the cases ---------------------------------------------------------------

    @staticmethod
    def require(bus: Bus, *capabilities: str) -> None:
        """Skip the test unless the transport declares every named capability."""
        for capability in capabilities:
            if not bus.capabilities.supports(capability):
                pytest.skip(f"{bus.url.scheme} lacks capability: {capability}")

    @staticmethod
    def require_qos(bus: Bus, qos: int) -> None:
        """Skip the test unless the transport offers ``qos``."""
        if bus.capabilities.max_qos < qos:
            pytest.skip(f"{bus.url.scheme} lacks capability: max_qos>={qos}")

    async def assert_still_works(self, bus: Bus, topic: str) -> None:
        """Check a full round trip on ``bus`` (used after every refused call)."""
        inbox = Collector()
        async with bus.subscribe(f"{topic}/still-works", inbox):
            await bus.publish(f"{topic}/still-works", {"ok": True})
            await inbox.wait_count(1, self.wait_timeout)
        assert inbox.payloads == [{"ok": True}]

    @staticmethod
    async def subscribe_children(
        bus: Bus, prefix: str, names: Iterable[str], handler: Collector
    ) -> None:
        """Subscribe ``handler`` to ``prefix/<name>`` for each of ``names``.

        One ``+`` pattern, or one exact subscription per name where the transport has no
        wildcards.
        """
        if bus.capabilities.wildcards:
            await bus.subscribe(f"{prefix}/+", handler)
        else:
            for name in names:
                await bus.subscribe(f"{prefix}/{name}", handler)
