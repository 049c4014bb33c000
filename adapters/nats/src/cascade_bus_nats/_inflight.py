"""JetStream publishes waiting for their ack: sent with a reply token, swept, resent, failed.

Every publish carries a ``Nats-Msg-Id``, so a resend after a lost ack is dropped by the
stream's duplicate window; ``qos1_timeout`` bounds the whole attempt.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable, Coroutine, Mapping
from typing import TYPE_CHECKING, Any

import msgspec
import nats.errors as nats_errors

from cascade_bus import PublishError

from ._errors import GONE, ack_error, send_error
from ._outgoing import Out, Outbox
from ._wire import STATUS, pub_ack

if TYPE_CHECKING:
    from ._transport import NatsTransport

__all__ = ["InFlight"]

log = logging.getLogger("cascade_bus.nats")


class InFlight:
    """The JetStream publishes sent and not yet acknowledged, by reply token.

    Args:
        transport: The transport it serves (writer, connection state, options).
    """

    outbox: Outbox  # set by the transport right after both exist

    def __init__(self, transport: NatsTransport) -> None:
        self.t = transport
        self.opts = transport._opts
        self.waiting: dict[str, Out] = {}
        self.ack_prefix = ""  # our inbox for acks + ".", set on connect
        self._tokens = itertools.count(1)
        self._sweeper: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return len(self.waiting)

    def send(self, out: Out) -> Coroutine[Any, Any, None] | None:
        """Send a JetStream publish with a fresh reply token; the sweeper watches for its ack."""
        token = f"{next(self._tokens):x}"
        out.token = token
        out.attempts += 1
        out.sent_at = now = asyncio.get_running_loop().time()
        if not out.deadline:
            out.deadline = now + self.opts.qos1_timeout
        self.waiting[token] = out
        if self._sweeper is None:
            self._arm_sweeper()
        try:
            pending = self.t._writer.publish(
                out.subject, out.data, out.headers, self.ack_prefix + token
            )
        except GONE:
            return None  # stays in flight: sent again after the reconnect
        except (nats_errors.Error, ValueError) as exc:
            self.waiting.pop(token, None)
            self.outbox.settle(out, error=send_error(exc))
            return None
        return None if pending is None else self._sent(pending, out)

    async def _sent(self, pending: Awaitable[Any], out: Out) -> None:
        try:
            await pending
        except GONE:
            pass  # stays in flight: sent again after the reconnect
        except nats_errors.Error as exc:
            self.waiting.pop(out.token, None)
            self.outbox.settle(out, error=send_error(exc))

    def forget(self, out: Out) -> None:
        """Stop watching for the ack of ``out``."""
        self.waiting.pop(out.token, None)

    def route_ack(
        self, subject: str, reply: str, data: bytes, headers: Mapping[str, str] | None
    ) -> None:
        """A JetStream publish acknowledgement (or a no-responders status) on our inbox."""
        out = self.waiting.pop(subject[len(self.ack_prefix) :], None)
        if out is None or out.settled:
            return  # an answer to an earlier attempt, or to an abandoned message
        if headers and headers.get(STATUS) == "503":
            self._retry(out, "no stream answered (JetStream unavailable or stream missing)")
            self.t._conn.start_recovery()
            return
        try:
            ack = pub_ack.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self.outbox.settle(out, error=ack_error(exc))
            return
        error = ack.error
        if error is None:
            self.outbox.settle(out, ack.seq)
        elif error.code == 503:
            self._retry(out, error.description)
        else:
            self.outbox.settle(
                out,
                error=PublishError(
                    f"{self.t.url.endpoint()} refused the message: {error.description} "
                    f"(code {error.code}/{error.err_code})"
                ),
            )

    def _arm_sweeper(self) -> None:
        opts = self.opts
        every = max(0.02, min(opts.ack_timeout, opts.qos1_timeout) / 4)
        self._sweeper = asyncio.get_running_loop().call_later(every, self._sweep)

    def _sweep(self) -> None:
        """Resend what waited ``ack_timeout`` for its ack; fail what ran out of time."""
        self._sweeper = None
        now = asyncio.get_running_loop().time()
        ack_timeout = self.opts.ack_timeout
        waiting = self.waiting
        for token, out in list(waiting.items()):
            if out.settled:
                del waiting[token]
            elif now >= out.deadline:
                del waiting[token]
                self.outbox.settle(out, error=self._expired())
            elif now - out.sent_at >= ack_timeout:
                del waiting[token]
                self._retry(out, f"no acknowledgement within {ack_timeout}s")
        if waiting:
            self._arm_sweeper()

    def _expired(self) -> PublishError:
        return PublishError(
            f"{self.t.url.endpoint()} did not acknowledge the QoS-1 message within "
            f"{self.opts.qos1_timeout}s"
        )

    def _retry(self, out: Out, why: str) -> None:
        if out.settled:
            return
        delay = min(0.02 * 2 ** min(out.attempts, 6), 1.0)
        log.debug("resending %s in %.2fs: %s", out.subject, delay, why)
        asyncio.get_running_loop().call_later(delay, self.resend, out)

    def resend(self, out: Out) -> None:
        """Send ``out`` again now (or hold it in front if disconnected)."""
        t = self.t
        if out.settled or t._closing:
            return
        if t._connected:
            pending = self.send(out)
            if pending is not None:
                t._tasks.spawn(pending, "resend")
        else:
            self.outbox.park(out)

    def resend_older(self, started: float) -> None:
        """After the JetStream repair: send again at once what was sent before ``started``."""
        waiting = self.waiting
        for out in [o for o in waiting.values() if o.sent_at < started]:
            del waiting[out.token]
            self.resend(out)

    def requeue(self) -> None:
        """The connection is gone: put what waits for an ack in front of the offline buffer.

        Held in a buffer that survives the reconnect, they count as accepted: their
        publishers stop waiting (as for a message published while disconnected).
        """
        if not self.waiting:
            return
        pending = sorted(self.waiting.values(), key=lambda o: int(o.token, 16))
        self.waiting.clear()
        outs = [out for out in pending if not out.settled]
        for out in outs:
            out.deadline = 0.0
            if out.future is not None:
                out.detached = True
        self.outbox.offline.requeue(outs)
        self.outbox.idle.clear()

    def take_all(self) -> list[Out]:
        """Stop watching every ack; return what waited (oldest first is not promised)."""
        outs = list(self.waiting.values())
        self.waiting.clear()
        return outs

    def close(self) -> None:
        """Stop the sweeper."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
