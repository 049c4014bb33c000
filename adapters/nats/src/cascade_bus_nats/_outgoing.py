"""Outgoing messages: the record (`Out`), the offline buffer and the publish confirmations.

`Outbox` holds what waits for a connection (the kit's `OfflineBuffer`: one publish-while-down
policy) and counts what waits for JetStream's ack (`flush` waits for both); `InFlight` sends
and watches the acks.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, cast

from cascade_bus.spi import DropReason, OfflineBuffer, Outgoing

from ._connection import round_trip
from ._errors import GONE

if TYPE_CHECKING:
    from ._inflight import InFlight
    from ._transport import NatsTransport

__all__ = ["Out", "Outbox"]

log = logging.getLogger("cascade_bus.nats")


class Out(Outgoing):
    """A message that must reach the server: waiting for a connection, or for its JetStream ack.

    ``confirm``: a JetStream publish (QoS 1 for the offline buffer), done once the stream
    acknowledged it; else a core (QoS 0) message held while disconnected. ``future`` is the
    publisher's; it is None once nobody waits: the publish returned when the message entered
    the offline buffer (``detached``), and a later failure is counted and logged instead.
    ``then``: for the KV write of a retained value, sends its live copy once the revision is
    known, handing ``future`` on to it.
    """

    __slots__ = (
        "attempts", "confirm", "deadline", "detached", "headers", "reply", "sent_at", "settled",
        "subject", "then", "token",
    )  # fmt: skip

    def __init__(
        self,
        topic: str,
        subject: str,
        data: bytes,
        headers: Mapping[str, str] | None,
        future: asyncio.Future[None] | None,
        *,
        confirm: bool,
        reply: str = "",
    ) -> None:
        super().__init__(topic, data, 1 if confirm else 0, False, future)
        self.subject = subject
        self.headers = headers
        self.confirm = confirm
        self.reply = reply  # a held request's NATS reply subject (QoS 0 only)
        self.token = ""
        self.attempts = 0
        self.sent_at = 0.0
        self.deadline = 0.0  # set by its next send: ``qos1_timeout`` from then on
        self.settled = not confirm
        self.detached = False
        self.then: Callable[[Out, int], None] | None = None


class Outbox:
    """What has not reached the server yet: the offline buffer and the unconfirmed count.

    Args:
        transport: The transport it serves (connection state, stats, options).
        inflight: The publishes waiting for their ack.
    """

    def __init__(self, transport: NatsTransport, inflight: InFlight) -> None:
        self.t = transport
        self.inflight = inflight
        self.offline = OfflineBuffer(
            transport._opts.offline_buffer, transport.stats, transport.url.endpoint()
        )
        self.unsettled = 0
        self.idle = asyncio.Event()
        self.idle.set()

    def _reconnecting(self) -> bool:
        t = self.t
        return not (t._dead or not t._opts.reconnect or t._closed)

    def hold(self, out: Out) -> None:
        """Keep a message until the connection is back (bounded by ``offline_buffer``).

        Raises:
            ConnectionLost: reconnect is off or gave up (the bus counts it).
            PublishError: the buffer is full and the message is QoS 1 or retained (a QoS-0
                message is dropped and counted instead).
        """
        self.offline.hold(out, reconnecting=self._reconnecting())
        self.idle.clear()
        if out.confirm:
            self._detach(out)
        self.check_idle()  # a dropped QoS-0 message is not held

    @staticmethod
    def _detach(out: Out) -> None:
        """A JetStream publish is held: confirmed after the reconnect, ``flush`` waits for it.

        Its publisher stops waiting (accepted); its ``qos1_timeout`` counts from its next send.
        """
        out.deadline = 0.0
        if out.future is not None:
            out.detached = True
            out.settle()

    def park(self, out: Out) -> None:
        """Keep an accepted message in front for the next connection (beyond the limit)."""
        if out.confirm:
            out.deadline = 0.0
            if out.future is not None:
                out.detached = True
        self.offline.requeue((out,))  # settles its future: the publisher stops waiting
        self.idle.clear()

    def submit(self, out: Out) -> Awaitable[None] | None:
        """Send a JetStream publish now, or hold it for the next connection.

        Returns what the caller must await before the write buffer takes more, if anything.

        Raises:
            ConnectionLost: see `hold`.
            PublishError: see `hold`.
        """
        self.unsettled += 1
        self.idle.clear()
        if self.t._connected:
            return self.inflight.send(out)
        try:
            self.hold(out)
        except BaseException:
            out.future = None  # nobody reads it: the caller gets the exception
            out.then = None
            self.settle(out)
            raise
        return None

    def settle(
        self, out: Out, seq: int = 0, error: BaseException | None = None, *, count: bool = True
    ) -> bool:
        """Finish a JetStream publish once: resolve its future, update the idle state.

        A retained value's KV write goes on to its live copy (``then``). Returns True for a
        failure nobody waits for (the publish returned when the message was buffered); unless
        the caller counts those itself (``count=False``), it is counted and logged here.
        """
        if out.settled:
            return False
        out.settled = True
        self.unsettled -= 1
        then, out.then = out.then, None
        if then is not None and error is None:
            try:
                then(out, seq)
            except Exception as exc:  # never let one message stop the receive path
                log.exception("the live copy of a retained message for %r failed", out.topic)
                error = exc
        lost = False
        if error is not None or then is None:
            if out.future is not None:
                out.settle(error)
            elif error is not None and out.detached:
                lost = True
                if count:
                    self.lost(out, error, DropReason.PUBLISH_FAILED)
        self.check_idle()
        return lost

    def lost(self, out: Out, error: BaseException, reason: str) -> None:
        """Count and log a message accepted while disconnected that could not be delivered."""
        self.t.stats.drop(reason)
        log.warning(
            "a message for %r accepted while disconnected from %s was not delivered: %s",
            out.topic,
            self.t.url.endpoint(),
            error,
        )

    def check_idle(self) -> None:
        """Wake `flush` when nothing waits for a connection or an ack."""
        if not self.unsettled and not self.offline:
            self.idle.set()

    def abandon(self, out: Out) -> None:
        """Its publisher was cancelled before the message was held: forget it."""
        out.then = None
        self.inflight.forget(out)
        fut = out.future
        if fut is not None and not fut.done():
            fut.cancel()
        self.settle(out)

    async def resend_offline(self) -> None:
        """Send what was held while disconnected, in order (stops if the connection goes)."""
        t = self.t
        nc = t._nc
        offline = self.offline
        while offline and nc is not None and nc.is_connected:
            out = cast(Out, offline.popleft())
            if out.confirm:
                if not out.settled:
                    pending = self.inflight.send(out)
                    if pending is not None:
                        await pending
                continue
            try:
                written = t._writer.publish(out.subject, out.data, out.headers, out.reply)
                if written is not None:
                    await written
            except GONE:
                offline.requeue((out,))
                break
        self.check_idle()

    def fail_waiting(self, error: BaseException) -> None:
        """The connection is gone for good (or closed): fail everything that waits."""
        outs = self.inflight.take_all() + cast(list[Out], self.offline.take_all())
        dropped = lost = 0
        for out in outs:
            if not out.confirm:
                dropped += 1
            else:
                out.then = None
                lost += self.settle(out, error=error, count=False)
        if dropped + lost:
            self.t.stats.drop(DropReason.DISCONNECTED, dropped + lost)
        if lost:
            log.warning(
                "%d QoS-1 or retained message(s) accepted while disconnected from %s were not "
                "delivered: %s",
                lost,
                self.t.url.endpoint(),
                error,
            )
        self.check_idle()

    async def flush(self, timeout: float) -> None:
        """Wait until every QoS-1 message is acknowledged and the server has everything else.

        While nats-py reconnects, what was written waits in its buffer for the next server:
        wait for the reconnect, then for a round trip on the new connection (a PING sent on a
        connection that breaks gets no PONG).

        Raises:
            TimeoutError: not done within ``timeout`` seconds.
        """
        t = self.t
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        async with asyncio.timeout(timeout):
            while True:
                await self.idle.wait()
                nc = t._nc
                if nc is None:
                    return
                changed = t._state_changed
                if not (nc.is_connected and t._connected):
                    if t._closed or t._dead or not t._opts.reconnect:
                        return  # nothing more will reach a server
                    await changed.wait()  # the reconnect callbacks change the state
                    continue
                trip = asyncio.ensure_future(
                    round_trip(nc, t._router is not None, max(deadline - loop.time(), 0.001))
                )
                # Read below, or by nobody when this flush times out first.
                trip.add_done_callback(_retrieve)
                while not trip.done() and t._connected:
                    lost = asyncio.ensure_future(t._state_changed.wait())
                    try:
                        await asyncio.wait((trip, lost), return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        lost.cancel()
                if not trip.done():
                    # The connection went: its PING gets no PONG. Cancelling is safe only
                    # now (the old connection's reader is gone): a cancelled PONG future
                    # still queued in nats-py would break its next PONG.
                    trip.cancel()
                    continue
                try:
                    trip.result()
                    return
                except GONE:
                    pass  # the connection went meanwhile: again once it is back


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Done callback: fetch a task's exception so that nobody reading it is no warning."""
    if not task.cancelled():
        task.exception()
