"""The nats-py connection: opening it, its callbacks, and the work after a reconnect.

nats-py reconnects by itself (and replays core SUBs); its callbacks feed the backoff, the
connection state, and one task, ``cascade_bus.nats.reconnected``, that resends the offline
buffer, repairs JetStream and resyncs the retained state.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import nats.errors as nats_errors
from nats.aio.client import Client as NatsClient

from cascade_bus import ConnectError, ConnectionLost
from cascade_bus.spi import DropReason, backoff_delays

from ._errors import describe
from ._options import NatsOptions
from ._writer import Writer

if TYPE_CHECKING:
    from ._transport import NatsTransport

__all__ = ["Connection", "close_quietly", "open_client", "round_trip"]

log = logging.getLogger("cascade_bus.nats")


async def close_quietly(nc: NatsClient, timeout: float = 2.0) -> None:
    """Close a nats-py client, bounded; failures are only logged (debug)."""
    try:
        async with asyncio.timeout(timeout):
            await nc.close()
    except Exception as exc:
        log.debug("closing a NATS client: %r", exc)


async def open_client(opts: NatsOptions, endpoint: str, conn: Connection) -> NatsClient:
    """Connect, trying each server in turn (each twice); reconnect stays off until it worked.

    Raises:
        ConnectError: no server reachable or the credentials refused (names every failure).
    """
    servers = list(opts.servers)
    failures: list[str] = []
    for attempt in range(len(servers)):
        nc = NatsClient()
        try:
            await nc.connect(
                servers=servers[attempt:] + servers[:attempt],
                name=opts.name,
                user=opts.user,
                password=opts.password,
                token=opts.token,
                tls=opts.tls,
                tls_hostname=opts.tls_hostname,
                # Fail fast on the first connection (each server tried twice) ...
                allow_reconnect=False,
                max_reconnect_attempts=1,
                dont_randomize=not opts.randomize,
                reconnect_time_wait=opts.reconnect_min,  # type: ignore[arg-type]
                connect_timeout=opts.connect_attempt_timeout,  # type: ignore[arg-type]
                ping_interval=opts.ping_interval,  # type: ignore[arg-type]
                max_outstanding_pings=opts.max_outstanding_pings,
                drain_timeout=opts.drain_timeout,  # type: ignore[arg-type]
                error_cb=conn.on_error,
                disconnected_cb=conn.on_disconnected,
                reconnected_cb=conn.on_reconnected,
                closed_cb=conn.on_closed,
            )
        except Exception as exc:
            failures.append(f"{servers[attempt]}: {describe(exc, opts.password, opts.token)}")
            # A failed TLS handshake can leave nats-py waiting on a dead socket: be brief.
            await close_quietly(nc, 0.25)
            if isinstance(exc, nats_errors.Error) and "uthoriz" in str(exc):
                break  # the credentials are the same for every server
            continue
        # ... then let nats-py reconnect, for ever.
        nc.options["allow_reconnect"] = opts.reconnect
        nc.options["max_reconnect_attempts"] = -1
        return nc
    raise ConnectError(f"could not connect to {endpoint}: {'; '.join(failures)}")


async def round_trip(nc: NatsClient, fast: bool, timeout: float) -> None:
    """Return once the server has processed everything this connection sent so far.

    nats-py's ``flush()`` writes its PING straight to the socket, ahead of commands still
    in its write buffer, so its PONG alone does not prove they arrived: write the buffer
    first (``fast``: our `Writer` is in use; else let a first PING/PONG push it out), then PING.
    """
    if fast:
        await nc._flush_pending(force_flush=True)
    else:
        await nc.flush(timeout=timeout)  # type: ignore[arg-type]
    await nc.flush(timeout=timeout)  # type: ignore[arg-type]


class Connection:
    """nats-py's callbacks for one transport, and its post-reconnect task.

    The kit's `Supervisor` does not fit: nats-py owns the reconnect loop (and replays the core
    SUBs on the new socket before any message can arrive), so this only steers its backoff and
    runs what follows a reconnect.

    Args:
        transport: The transport whose state the callbacks change.
    """

    def __init__(self, transport: NatsTransport) -> None:
        self.t = transport
        self.opts = transport._opts
        self._backoff = backoff_delays(self.opts.reconnect_min, self.opts.reconnect_max)
        self._warned_slow = False
        self._task: asyncio.Task[None] | None = None
        self._again = False
        self._resyncing = False

    def _describe(self, exc: BaseException) -> str:
        return describe(exc, self.opts.password, self.opts.token)

    def reset_backoff(self, nc: NatsClient) -> None:
        """Start the waits between reconnect attempts again at ``reconnect_min``."""
        self._backoff = backoff_delays(self.opts.reconnect_min, self.opts.reconnect_max)
        nc.options["reconnect_time_wait"] = next(self._backoff)

    async def on_error(self, exc: Exception) -> None:
        """nats-py's ``error_cb``: a failed reconnect attempt, a slow consumer, or other."""
        t = self.t
        nc = t._nc
        if (
            nc is not None
            and (nc.is_reconnecting or nc.is_connecting)
            and not (t._connected or t._closing)
        ):
            # A reconnect attempt failed: nats-py waits ``reconnect_time_wait`` before it
            # tries that server again, so the backoff grows (jittered) up to reconnect_max.
            wait = next(self._backoff)
            nc.options["reconnect_time_wait"] = wait
            log.info(
                "reconnecting to %s failed (%s); next attempt in %.2fs",
                t.url.endpoint(),
                self._describe(exc),
                wait,
            )
            return
        if isinstance(exc, nats_errors.SlowConsumerError):
            t.stats.drop(DropReason.OVERFLOW)
            if not self._warned_slow:
                self._warned_slow = True
                log.warning(
                    "a subscription on %s fell behind and nats-py dropped messages (counted "
                    "in stats().dropped['overflow'])",
                    t.url.endpoint(),
                )
            return
        log.debug("NATS %s: %s", t.url.endpoint(), self._describe(exc))

    async def on_disconnected(self) -> None:
        """nats-py's ``disconnected_cb``: requeue what waits for an ack, hold live messages."""
        t = self.t
        if t._closing:
            return
        if t._connected:
            log.warning("lost the connection to %s; reconnecting", t.url.endpoint())
        t._js_ready = False
        t._set_connected(False)
        t._inflight.requeue()
        task = self._task
        if self._resyncing and task is not None and not task.done():
            # It reads the previous connection's snapshot: the next reconnect starts over
            # (a sink never hears `resync_end` for an incomplete replay).
            task.cancel()
        t._retained.hold_live()

    async def on_reconnected(self) -> None:
        """nats-py's ``reconnected_cb``: count it and start the post-reconnect work."""
        t = self.t
        if t._closing:
            return
        t.stats.reconnects += 1
        nc = t._nc
        if nc is not None:
            self.reset_backoff(nc)
        log.warning("reconnected to %s", t.url.endpoint())
        self.start_recovery()

    async def on_closed(self) -> None:
        """nats-py's ``closed_cb``: nats-py gave up; fail everything that waits."""
        t = self.t
        if t._closing:
            return
        t._dead = True
        t._set_connected(False)
        if t._nc is not None:  # None: connect() failed, and raises ConnectError saying why
            log.error("the connection to %s is closed for good", t.url.endpoint())
        t._outbox.fail_waiting(ConnectionLost(f"lost the connection to {t.url.endpoint()}"))

    def start_recovery(self) -> None:
        """Run the post-reconnect work (again, if it is running now)."""
        task = self._task
        if task is not None and not task.done() and not task.cancelling():
            self._again = True
            return
        self._task = self.t._tasks.spawn(self._recover(), "reconnected")

    def cancel(self) -> None:
        """Stop the post-reconnect work (closing)."""
        if self._task is not None:
            self._task.cancel()

    async def _recover(self) -> None:
        """After a reconnect: resend what is held, go live, repair JetStream, resync retained."""
        t = self.t
        while True:
            self._again = False
            nc = t._nc
            if nc is None or t._closing or not nc.is_connected:
                return
            t.max_payload = nc.max_payload or t.max_payload
            if isinstance(t._writer, Writer):
                t._writer.limit = t.max_payload
            await t._outbox.resend_offline()
            if nc.is_connected and not self._again:
                t._set_connected(True)
            if self.opts.jetstream and nc.is_connected:
                if await t._js.repair():
                    t._js_ready = True
                    t._set_connected(t._connected)  # wakes wait_jetstream()
            else:
                t._js_ready = True
                t._set_connected(t._connected)
            if nc.is_connected and not self._again:
                self._resyncing = True
                try:
                    await t._retained.resync()
                finally:
                    if self._task is asyncio.current_task():
                        self._resyncing = False
            if not self._again:
                return
