"""`Connector`: the Cascade engine's tiny connector protocol, as a thin facade over `Bus`.

Cascade publishes dicts and subscribes with ``async callback(topic, payload_dict)``. The facade
speaks the bare-JSON wire format (``format=raw``) of the upstream Cascade tools, maps an empty
retained payload to a clear, never raises from `publish` into the engine, and keeps its
subscriptions across `disconnect` / `connect`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from ._bus import Bus
from ._envelope import Envelope
from ._subscription import Subscription
from ._url import BusURL

__all__ = ["Connector", "ConnectorSubscription"]

log = logging.getLogger("cascade_bus.connector")

#: Cascade's callback: ``async def callback(topic: str, payload: dict) -> None``.
Callback = Callable[[str, dict[str, Any]], Awaitable[None]]


def _as_dict(env: Envelope[Any]) -> dict[str, Any]:
    payload = env.payload
    if isinstance(payload, dict):
        return payload
    if payload is None or payload == b"" or payload == "":
        return {}  # an empty (clearing) message reaches Cascade as {}
    return {"value": payload}


class ConnectorSubscription:
    """The handle `Connector.subscribe` returns; `unsubscribe` is idempotent."""

    def __init__(self, connector: Connector, topic: str, callback: Callback) -> None:
        self.topic = topic
        self.callback = callback
        self._connector = connector
        self._sub: Subscription[Any] | None = None
        self.active = True

    async def _handle(self, env: Envelope[Any]) -> None:
        await self.callback(env.topic, _as_dict(env))

    async def _attach(self, bus: Bus) -> None:
        self._sub = await bus.subscribe(self.topic, self._handle)

    async def unsubscribe(self) -> None:
        """Stop calling the callback. Calling it again does nothing."""
        if not self.active:
            return
        self.active = False
        self._connector._handles.discard(self)
        sub, self._sub = self._sub, None
        if sub is not None:
            await sub.unsubscribe()

    def __repr__(self) -> str:
        return f"<ConnectorSubscription {self.topic!r} {'active' if self.active else 'closed'}>"


class Connector:
    """Cascade's connector protocol over any cascade-bus URL.

    Args:
        url: The broker URL (default ``memory://``).
        **options: Bus and transport options; ``format`` defaults to ``raw`` so plain clients
            read exactly the dict that was published.

    Attributes:
        publish_failures: Publishes that failed (logged, never raised into the engine).
    """

    def __init__(self, url: str = "memory://", **options: Any) -> None:
        self._url = BusURL(url)
        options.setdefault("format", "raw")
        self._options = options
        self._bus: Bus | None = None
        self._handles: set[ConnectorSubscription] = set()
        self._pending: set[asyncio.Task[None]] = set()
        self._lock = asyncio.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.publish_failures = 0
        # Build a bus now so a bad URL or scheme fails here, not inside the engine later.
        Bus(self._url, **self._options)

    def __repr__(self) -> str:
        state = "connected" if self.connected else "disconnected"
        return f"<Connector {self._url.redacted()} {state}>"

    @property
    def connected(self) -> bool:
        """True while connected."""
        return self._bus is not None and self._bus.is_open

    @property
    def bus(self) -> Bus | None:
        """The underlying `Bus` while connected (for stats and advanced use)."""
        return self._bus

    async def connect(self) -> None:
        """Connect; a no-op when already connected. Restores subscriptions after a disconnect.

        Raises:
            ConnectError: the broker could not be reached.
        """
        async with self._lock:
            if self.connected:
                return
            bus = Bus(self._url, **self._options)
            await bus.open()
            self._bus = bus
            self._loop = asyncio.get_running_loop()
            for handle in list(self._handles):
                await handle._attach(bus)

    async def disconnect(self) -> None:
        """Drain scheduled publishes and disconnect; harmless when not connected."""
        async with self._lock:
            if self._pending:
                await asyncio.wait(list(self._pending), timeout=10.0)
            bus, self._bus = self._bus, None
            if bus is not None:
                await bus.close()

    async def publish(
        self,
        topic: str,
        payload: dict[str, Any] | str | bytes | None,
        qos: int = 0,
        retain: bool = False,
    ) -> None:
        """Publish a dict; never raises (failures are logged and counted).

        An empty payload (``{}``, ``""``, ``b""`` or None) published with ``retain=True`` clears
        the topic's retained message.
        """
        bus = self._bus
        if bus is None or not bus.is_open:
            self.publish_failures += 1
            log.error("publish to %r dropped: connector for %s is not connected", topic, self._url)
            return
        body: Any = payload
        if retain and (payload is None or payload == {} or payload == "" or payload == b""):
            body = b""
        try:
            await bus.publish(topic, body, qos=qos, retain=retain)
        except Exception as exc:
            self.publish_failures += 1
            log.error(
                "publish to %r on %s failed: %s: %s", topic, self._url, type(exc).__name__, exc
            )

    def publish_soon(
        self,
        topic: str,
        payload: dict[str, Any] | str | bytes | None,
        qos: int = 0,
        retain: bool = False,
    ) -> None:
        """Schedule a publish from synchronous code (any thread); returns at once.

        The publish runs on the connector's event loop; `disconnect` waits for it.
        """
        loop = self._loop
        if loop is None or loop.is_closed():
            self.publish_failures += 1
            log.error("publish to %r dropped: connector for %s is not connected", topic, self._url)
            return

        def schedule() -> None:
            task = loop.create_task(self.publish(topic, payload, qos, retain))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            schedule()
        else:  # another thread, or plain synchronous code outside the loop
            loop.call_soon_threadsafe(schedule)

    async def subscribe(self, topic: str, callback: Callback) -> ConnectorSubscription:
        """Call ``await callback(topic, payload_dict)`` for every matching message.

        Retained messages matching ``topic`` have reached the callback before this returns.

        Raises:
            InvalidTopic: the pattern is invalid.
            BusClosed: not connected.
        """
        bus = self._bus
        if bus is None:
            from ._errors import BusClosed

            raise BusClosed(f"connector for {self._url} is not connected; call connect() first")
        handle = ConnectorSubscription(self, topic, callback)
        await handle._attach(bus)
        self._handles.add(handle)
        return handle
