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
from ._presence import connector_presence_topic
from ._subscription import Subscription
from ._url import BusURL
from ._worker import PayloadHandler

__all__ = ["Connector", "ConnectorSubscription"]

log = logging.getLogger("cascade_bus.connector")

#: Cascade's callback: ``async def callback(topic: str, payload: dict) -> None``.
Callback = Callable[[str, dict[str, Any]], Awaitable[None]]


class ConnectorSubscription(PayloadHandler):
    """The handle `Connector.subscribe` returns; `unsubscribe` is idempotent.

    It is the subscription's handler too: the bus calls ``callback(topic, payload_dict)``
    straight from the subscription's queue, without an envelope (see `PayloadHandler`).
    """

    def __init__(self, connector: Connector, topic: str, callback: Callback) -> None:
        self.topic = topic
        self.callback = callback
        self._connector = connector
        self._sub: Subscription[Any] | None = None
        self.active = True

    @staticmethod
    def shape(payload: Any) -> dict[str, Any]:
        """Cascade gets dicts: an empty (clearing) message as {}, any other value wrapped."""
        if payload is None or payload == b"" or payload == "":
            return {}
        return {"value": payload}

    async def _attach(self, bus: Bus) -> None:
        self._sub = await bus.subscribe(self.topic, self)

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
            read exactly the dict that was published. ``presence`` defaults to upstream
            Cascade's ``cascade/status/<host>-<pid>`` (``{"status": "online"}`` while
            connected, ``{"status": "offline"}`` after a disconnect or a crash) on every
            transport that declares presence; ``presence=False`` turns it off.

    Attributes:
        publish_failures: Publishes that failed (logged, never raised into the engine).
        presence_topic: Where this connector announces itself (None: presence is off).
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
        probe = Bus(self._url, **self._options)
        if "presence" not in self._url.merged_options(options) and probe.capabilities.presence:
            options["presence"] = connector_presence_topic()
            probe = Bus(self._url, **self._options)
        self.presence_topic = probe.presence_topic

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
        if bus is None or not bus._live:  # `is_open`, without a property call
            self.publish_failures += 1
            log.error("publish to %r dropped: connector for %s is not connected", topic, self._url)
            return
        try:
            if retain or type(payload) is not dict:
                body: Any = payload
                if retain and (payload is None or payload == {} or payload == "" or payload == b""):
                    body = b""
                await bus.publish(topic, body, qos=qos, retain=retain)
            else:  # the engine's telemetry: no coroutine on memory:// (`Bus._publish_payload`)
                pending = bus._publish_payload(topic, payload, qos)
                if pending is not None:
                    await pending
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
