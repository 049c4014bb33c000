"""One connection at a time: open it (client, wire, barrier, presence), watch it, drop it.

`Connection` is also the transport's `Reconnectable`: the steps the kit's `Supervisor` runs
after a loss (requeue what was never acknowledged, reopen and resync, resend what was held).
Every wait on the broker races the connection's loss (`until_lost`), so a broker that goes
away mid-handshake costs one failed attempt, not aiomqtt's 10 s timeout.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TYPE_CHECKING, TypeVar, cast

from cascade_bus import ConnectionLost

from ._client import close_client, install, new_client
from ._errors import client_errors, publish_unacknowledged
from ._inflight import MqttOutgoing
from ._packets import _publish_packet
from ._wire import _Wire

if TYPE_CHECKING:
    from ._transport import MqttTransport

__all__ = ["Connection"]

_T = TypeVar("_T")


class Connection:
    """Opens and drops the transport's connection (``_client``, ``_paho``, ``_wire``)."""

    __slots__ = ("transport",)

    def __init__(self, transport: MqttTransport) -> None:
        self.transport = transport

    async def open(self) -> None:
        """Connect a fresh client, subscribe the barrier topic, publish the presence.

        Raises:
            ConnectError: the broker is unreachable or refused the connection.
            ConnectionLost, SubscribeError, PublishError: it failed right after CONNACK.
        """
        t = self.transport
        t._router.reset()  # a new socket starts reading
        client = new_client(t._opts, t.presence_payload(False))
        wire = _Wire(t._router, t._inflight, client, t._v5, t._opts.tcp_quickack)
        install(client, wire, t._router.on_message, t._written)
        with client_errors(t.url.endpoint()):
            await client.__aenter__()
        t._client, t._paho, t._wire = client, client._client, wire
        try:
            await t._subs.subscribe_barrier()
            if t._opts.presence_topic:
                await self.publish_control(
                    t._opts.presence_topic, t.presence_payload(True), retain=True
                )
        except BaseException:
            await self.drop()
            raise

    async def drop(self) -> None:
        """Forget the current connection (its control publishes too) and close its client."""
        t = self.transport
        client, t._client, t._paho, t._wire = t._client, None, None, None
        t._inflight.drop_control()
        if client is not None:
            await close_client(client)

    async def until_lost(self, waitable: Awaitable[_T], what: str) -> _T:
        """Await ``waitable`` unless the current connection drops first (then ConnectionLost)."""
        t = self.transport
        client = t._client
        task = asyncio.ensure_future(waitable)
        if client is None:
            task.cancel()
            raise ConnectionLost(f"not connected to {t.url.endpoint()}")
        lost = client._disconnected
        try:
            await asyncio.wait((task, lost), return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if task.cancelled():
            cause = lost.exception() if lost.done() and not lost.cancelled() else None
            raise ConnectionLost(
                f"lost the connection to {t.url.endpoint()} while {what}"
            ) from cause
        return task.result()

    async def publish_control(self, topic: str, data: bytes, *, retain: bool) -> None:
        """Publish the adapter's own QoS 1 message and wait (bounded) for its PUBACK."""
        t = self.transport
        wire = t._wire
        if wire is None or not wire.alive:
            raise ConnectionLost(f"lost {t.url.endpoint()} while publishing to {topic!r}")
        t._heads.head(topic)  # validated before it can wait for the window
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        props = t._props(None, retain)
        t._inflight.send(wire, MqttOutgoing(topic, data, 1, retain, props, fut, True), True)
        try:
            async with asyncio.timeout(10.0):
                await self.until_lost(fut, f"publishing to {topic!r}")
        except TimeoutError as exc:
            raise publish_unacknowledged(t.url.endpoint(), topic) from exc

    def fail_waiting(self, error: BaseException) -> None:
        """Settle every unacknowledged and every held publish with ``error``."""
        t = self.transport
        for out in t._inflight.take():
            out.settle(error)
        t._offline.fail_all(error)

    # -- the supervisor's steps (`Reconnectable`) ----------------------------------------------

    async def wait_lost(self) -> BaseException | None:
        """Return once aiomqtt says the connection is gone, with its cause."""
        client = self.transport._client
        assert client is not None
        lost = client._disconnected
        # asyncio.wait, not ``await lost``: cancelling the supervisor (aclose) must not cancel
        # aiomqtt's future, or its __aexit__ thinks it is disconnected already and never
        # sends DISCONNECT (the broker would then publish the will).
        await asyncio.wait((lost,))
        return None if lost.cancelled() else lost.exception()

    async def on_lost(self, cause: BaseException | None) -> None:
        """Drop the client; what the broker never acknowledged goes in front of the buffer.

        In sending order: the unacknowledged ones, then those that waited for the window.
        """
        await self.drop()
        t = self.transport
        t._offline.requeue(t._inflight.take())

    async def reopen(self) -> None:
        """Connect, resubscribe every filter and resync (see `Subscriptions.resubscribe_all`)."""
        t = self.transport
        with client_errors(t.url.endpoint()):
            await self.open()
            await t._subs.resubscribe_all()

    async def abandon(self) -> None:
        """Drop the connection a failed `reopen` left."""
        await self.drop()

    async def restore(self) -> None:
        """Send what was held while down, in order (unacknowledged ones first)."""
        t = self.transport
        t._connected = True
        wire = t._wire
        assert wire is not None
        offline, heads = t._offline, t._heads
        while offline:
            if not wire.alive:
                return  # lost again: the rest waits for the next connection
            out = cast(MqttOutgoing, offline.popleft())
            if out.qos:
                t._inflight.send(wire, out, False)
            else:
                head = heads.head(out.topic)
                wire.write(_publish_packet(head, out.data, 0, out.retain, out.props, 0), False)

    async def give_up(self, cause: BaseException | None) -> None:
        """Reconnect is off: everything that waits fails."""
        self.fail_waiting(ConnectionLost(f"lost the connection to {self.transport.url.endpoint()}"))
