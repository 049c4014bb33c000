"""Presence: a retained "online" status on a topic while a bus is up, "offline" once it is gone.

One contract on every transport that declares ``Capabilities.presence``: the topic holds the
online body (retained) while the bus is open, the offline body after a clean close, and the
offline body within a bounded time after a crash. How the crash is noticed is the transport's:
a native last will (`NativePresence`, MQTT), leases swept by surviving buses (`LeasedPresence`,
NATS and Redis: the shared logic is `Presence` here, the store is the adapter's), or nothing
but the process itself (in-process transports: at close and at interpreter exit).
"""

from __future__ import annotations

import asyncio
import atexit
import itertools
import logging
import os
import socket
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import msgspec

from ._errors import BusError, InvalidTopic, InvalidURL, UnsupportedFeature
from ._tasks import TaskSet
from ._topics import validate_topic
from ._transport import NetworkTransport
from ._url import parse_bool, parse_float

if TYPE_CHECKING:
    from ._transport import Transport

__all__ = [
    "DEFAULT_INTERVAL",
    "LEASE_FACTOR",
    "PRESENCE_OPTIONS",
    "LeasedPresence",
    "NativePresence",
    "Presence",
    "PresenceLeases",
    "PresenceOptions",
    "connector_presence_topic",
    "default_presence_topic",
]

log = logging.getLogger("cascade_bus.presence")

PRESENCE_OPTIONS = frozenset(
    {"presence", "presence_online", "presence_offline", "presence_interval", "presence_sweep"}
)
"""The bus options of this feature (see `Bus`)."""
DEFAULT_ONLINE = b'{"status":"online"}'
DEFAULT_OFFLINE = b'{"status":"offline"}'
#: Seconds between lease renewals and sweeps (emulated presence).
DEFAULT_INTERVAL = 5.0
#: A lease lives this many intervals: two renewals may be missed before a bus counts as gone.
LEASE_FACTOR = 3.0
#: Worst case from a crash to the offline body, in intervals, with a sweeping bus running: the
#: lease's life, plus up to one interval before a sweeper saw the last renewal, plus one before
#: its next sweep.
CRASH_BOUND_INTERVALS = LEASE_FACTOR + 2.0


def default_presence_topic() -> str:
    """Upstream Cascade's presence topic for this process: ``cascade/status/<host>-<pid>``."""
    host = socket.gethostname().replace("+", "_").replace("#", "_").replace("/", "_") or "host"
    return f"cascade/status/{host}-{os.getpid()}"


_connectors = itertools.count(1)


def connector_presence_topic() -> str:
    """Presence topic for the next `Connector` of this process: upstream's for the first one.

    Upstream Cascade has one connector per process; a second one here gets ``-2`` (and so on)
    appended, so that no two buses ever share a presence topic.
    """
    n = next(_connectors)
    topic = default_presence_topic()
    return topic if n == 1 else f"{topic}-{n}"


def _body(name: str, value: Any, default: bytes) -> bytes:
    """A presence body from an option: bytes as they are, str encoded, anything else as JSON."""
    if value is None:
        return default
    if isinstance(value, bytes | bytearray | memoryview):
        body = bytes(value)
    elif isinstance(value, str):
        body = value.encode()
    else:
        try:
            body = msgspec.json.encode(value)
        except (TypeError, msgspec.EncodeError) as exc:
            raise InvalidURL(f"option {name}: cannot encode it as JSON: {exc}") from None
    if not body:
        raise InvalidURL(f"option {name} is empty: an empty retained body clears the topic")
    return body


class PresenceOptions:
    """The presence options, parsed and checked.

    Raises:
        InvalidURL: a bad topic, an empty body, or an interval that is not positive.
    """

    __slots__ = ("interval", "offline", "online", "sweep", "topic")

    def __init__(self, options: Mapping[str, Any]) -> None:
        topic = options.get("presence")
        if topic is True or topic == "true":  # ?presence=true in a URL query too
            topic = default_presence_topic()
        elif topic is False or topic in ("", "false"):
            topic = None
        if topic is not None:
            topic = str(topic)
            try:
                validate_topic(topic)
            except InvalidTopic as exc:
                raise InvalidURL(f"option presence={topic!r}: {exc}") from None
        self.topic: str | None = topic
        self.online = _body("presence_online", options.get("presence_online"), DEFAULT_ONLINE)
        self.offline = _body("presence_offline", options.get("presence_offline"), DEFAULT_OFFLINE)
        self.interval = parse_float(
            "presence_interval", options.get("presence_interval", DEFAULT_INTERVAL)
        )
        if not self.interval > 0:
            raise InvalidURL(f"option presence_interval={self.interval}: must be above 0 s")
        self.sweep = parse_bool("presence_sweep", options.get("presence_sweep", False))


@runtime_checkable
class NativePresence(Protocol):
    """A transport whose broker reports a crash itself (MQTT's last will); checked once.

    The bus calls `set_presence` before ``connect``; from then on the transport publishes
    ``online`` (retained, acknowledged) at every connect and reconnect, ``offline`` (retained)
    in ``aclose`` before its clean disconnect, and arranges for the broker to publish
    ``offline`` (retained) when the connection dies without one.
    """

    def set_presence(self, topic: str, online: bytes, offline: bytes) -> None:
        """Keep presence on ``topic`` (a portable topic, validated by the bus).

        Raises:
            InvalidURL: presence cannot be combined with an option already given.
        """


class PresenceLeases(Protocol):
    """A shared lease table on the broker: one record per presence topic, with a revision.

    Revisions are unique per record version (never reused for a topic) so that a sweeper can
    tell "not renewed since I looked" from "renewed". Every method may raise the transport's
    `BusError`s (`ConnectionLost` while reconnecting); the caller retries on its next round.
    """

    async def put(self, topic: str, record: bytes) -> int:
        """Create or overwrite the lease of ``topic``; return its new revision."""

    async def refresh(self, topic: str, record: bytes, revision: int) -> int | None:
        """Renew the lease if it is still at ``revision``; None when it was claimed or replaced."""

    async def remove(self, topic: str) -> None:
        """Delete the lease of ``topic`` (a clean close). No error when there is none."""

    async def scan(self) -> list[tuple[str, int, bytes]]:
        """Every lease now: ``(topic, revision, record)``."""

    async def claim(self, topic: str, revision: int) -> bool:
        """Delete the lease only if it is still at ``revision``; True for the one winner."""


@runtime_checkable
class LeasedPresence(Protocol):
    """A transport that emulates presence with leases swept by surviving buses; checked once."""

    def presence_leases(self) -> PresenceLeases:
        """The lease table on this transport's broker (usable while connected)."""


class Lease(msgspec.Struct, array_like=True, frozen=True):
    """What a lease record holds: the body a sweeper publishes, and how long the lease lives."""

    offline: bytes
    ttl: float


_encode_lease = msgspec.msgpack.Encoder().encode
_decode_lease = msgspec.msgpack.Decoder(Lease).decode


class Presence:
    """One bus's presence: announce, renew, sweep the leases of crashed buses, say goodbye.

    Args:
        transport: The bus's transport (checked for the mechanisms it declares, once).
        opts: The parsed presence options.

    Raises:
        UnsupportedFeature: presence asked of a transport that does not declare it.
        InvalidURL: the transport refuses presence with its other options.
    """

    def __init__(self, transport: Transport, opts: PresenceOptions) -> None:
        self.transport = transport
        self.opts = opts
        self.topic = opts.topic
        scheme = transport.url.scheme
        if self.topic is not None and not transport.capabilities.presence:
            raise UnsupportedFeature(
                scheme, "presence", "it has no last will and does not emulate presence"
            )
        self.native = isinstance(transport, NativePresence)
        self.leased = isinstance(transport, LeasedPresence) and transport.capabilities.presence
        mechanism = self.native or self.leased
        if self.topic is not None and not mechanism and isinstance(transport, NetworkTransport):
            # Only an in-process transport may go without: nothing would report a crash.
            raise UnsupportedFeature(
                scheme, "presence", "declared, but without NativePresence or LeasedPresence"
            )
        self._tasks = TaskSet("presence")
        self._record = _encode_lease(Lease(opts.offline, opts.interval * LEASE_FACTOR))
        self._revision: int | None = None
        self._seen: dict[str, tuple[int, float]] = {}
        self._at_exit = False
        self.claimed = 0
        """Lapsed leases of other buses this bus won (and published the offline body of)."""
        if self.topic is not None and self.native:
            assert isinstance(transport, NativePresence)
            transport.set_presence(self.topic, opts.online, opts.offline)

    @property
    def crash_bound(self) -> float | None:
        """Seconds from a crash to the offline status with leases (None: the broker's own)."""
        return self.opts.interval * CRASH_BOUND_INTERVALS if self.leased else None

    async def _send(self, body: bytes) -> None:
        assert self.topic is not None
        pending = self.transport.send(self.topic, body, 1, True, None)
        if pending is not None:
            await pending

    async def start(self) -> None:
        """The transport just connected: lease, announce online, start renewing and sweeping."""
        topic = self.topic
        if topic is not None and not self.native:
            if self.leased:
                try:
                    self._revision = await self._leases().put(topic, self._record)
                except BusError as exc:  # the next round puts it (no crash detection till then)
                    log.warning("presence lease of %r not written yet: %s", topic, exc)
            await self._send(self.opts.online)
            if not self.leased:  # in-process: the process ending is the only crash there is
                atexit.register(self._exit)
                self._at_exit = True
        if self.leased and (topic is not None or self.opts.sweep):
            self._tasks.spawn(self._run(), "leases")

    def _leases(self) -> PresenceLeases:
        assert isinstance(self.transport, LeasedPresence)
        return self.transport.presence_leases()

    async def _run(self) -> None:
        """Renew our lease and sweep the lapsed ones, every interval, until stopped."""
        while True:
            await asyncio.sleep(self.opts.interval)  # a period, not a synchronisation
            try:
                # Bounded: a broker call that never answers (a KV key listing can hang) must
                # not stop renewing and sweeping for good; the next round tries again.
                async with asyncio.timeout(max(2 * self.opts.interval, 1.0)):
                    await self._renew()
                    await self._sweep()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # down or reconnecting: the next round tries again
                log.debug("presence round on %s failed: %r", self.transport.url.redacted(), exc)

    async def _renew(self) -> None:
        topic, revision = self.topic, self._revision
        if topic is None:
            return
        leases = self._leases()
        if revision is None:  # the first put failed
            self._revision = await leases.put(topic, self._record)
            return
        renewed = await leases.refresh(topic, self._record, revision)
        if renewed is None:  # swept while we were cut off (or replaced): say online again
            log.info("presence lease of %r had lapsed; announcing online again", topic)
            self._revision = await leases.put(topic, self._record)
            await self._send(self.opts.online)
        else:
            self._revision = renewed

    async def _sweep(self) -> None:
        """Publish the offline body of every lease not renewed for its whole life."""
        leases = self._leases()
        now = time.monotonic()
        current = await leases.scan()
        seen: dict[str, tuple[int, float]] = {}
        for topic, revision, record in current:
            if topic == self.topic:
                continue
            before = self._seen.get(topic)
            since = before[1] if before is not None and before[0] == revision else now
            seen[topic] = (revision, since)
            try:
                lease = _decode_lease(record)
            except msgspec.DecodeError:
                log.warning("presence lease of %r is unreadable; removing it", topic)
                await leases.claim(topic, revision)
                continue
            if now - since > lease.ttl and await leases.claim(topic, revision):
                del seen[topic]
                self.claimed += 1
                await self._mark_offline(leases, topic, lease)
        self._seen = seen

    async def _mark_offline(self, leases: PresenceLeases, topic: str, lease: Lease) -> None:
        try:
            pending = self.transport.send(topic, lease.offline, 1, True, None)
            if pending is not None:
                await pending
        except Exception:
            # Put the lease back so that a later sweep (ours or another bus's) tries again.
            await leases.put(topic, _encode_lease(lease))
            raise
        log.info("presence: %r lapsed; marked offline", topic)

    async def cancel(self) -> None:
        """Stop renewing and sweeping, say nothing (an open that failed)."""
        await self._tasks.aclose()
        if self._at_exit:
            atexit.unregister(self._exit)
            self._at_exit = False

    async def stop(self, timeout: float) -> None:
        """A clean close: stop the rounds, publish the offline body, drop the lease."""
        await self.cancel()
        topic = self.topic
        if topic is None or self.native:
            return
        try:
            async with asyncio.timeout(timeout):
                await self._send(self.opts.offline)
                if self.leased and self._revision is not None:
                    await self._leases().remove(topic)
        except Exception as exc:
            log.warning("close(): could not publish the offline presence to %r: %r", topic, exc)

    def _exit(self) -> None:
        """Interpreter exit with the bus still open (in-process transports): say offline."""
        try:
            pending = self.transport.send(self.topic or "", self.opts.offline, 0, True, None)
            if asyncio.iscoroutine(pending):  # a full subscriber: the body is stored anyway
                pending.close()
        except Exception as exc:
            log.debug("offline presence at exit failed: %r", exc)
