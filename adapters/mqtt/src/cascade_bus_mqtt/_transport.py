"""The MQTT transport: aiomqtt for the connection, our own packet path for the hot path.

`MqttTransport` composes the parts (`_client`, `_wire`, `_inflight`, `_routing`,
`_subscribe`, `_session`) with the adapter kit (`Supervisor`, `OfflineBuffer`, `TaskSet`) and
holds the send hot path (`send`). Reliability (reconnect, resubscribe, resync,
offline buffer, presence) is described in docs/transports/mqtt.md.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections.abc import Awaitable, Mapping
from types import MappingProxyType
from typing import Any, ClassVar

import aiomqtt
import msgspec
import paho.mqtt.client as paho_mqtt

from cascade_bus import (
    BusClosed,
    ConnectError,
    ConnectionLost,
    InvalidURL,
    PayloadTooLarge,
    PublishError,
    SubscribeError,
)
from cascade_bus.spi import (
    BusURL,
    Capabilities,
    MessageSink,
    NetworkTransport,
    OfflineBuffer,
    Supervisor,
    TaskSet,
    TransportSubscription,
)

from ._connection import Connection
from ._inflight import InflightWindow, MqttOutgoing
from ._options import MqttOptions
from ._packets import (
    _MAX_PAYLOAD,
    RESERVED_PREFIX,
    RETAIN_PROPERTY,
    TopicHeads,
    _publish_packet,
    encode_props,
)
from ._routing import Router
from ._session import Unclaimed
from ._subscribe import Subscriptions
from ._wire import _Wire

__all__ = ["RESERVED_PREFIX", "RETAIN_PROPERTY", "MqttTransport"]

log = logging.getLogger("cascade_bus.mqtt")


_OUT_HIGH = 2048  # paho packets waiting for the socket before a QoS 0 publisher yields

_V5_CAPS = Capabilities(
    max_qos=2,
    retain=True,
    wildcards=True,
    headers=True,
    queue_groups=True,
    request_reply=True,
    will=True,
    presence=True,
    persistence=False,
    ordering=True,
    max_payload=_MAX_PAYLOAD,
)
_V311_CAPS = msgspec.structs.replace(_V5_CAPS, headers=False, queue_groups=False)


class MqttTransport(NetworkTransport):
    """``mqtt://[user:pass@]host[:1883]`` and ``mqtts://`` (TLS) through aiomqtt.

    Options (URL query or keyword): ``client_id``, ``version`` (``5`` default, or ``3.1.1``),
    ``keepalive`` (60 s), ``clean_start`` (true), ``ca_file``/``certfile``/``keyfile``/
    ``tls_verify`` (mqtts), ``will_topic``/``will_payload``/``will_qos``/``will_retain``,
    ``reconnect`` (true), ``reconnect_min``/``reconnect_max`` (backoff bounds, s),
    ``offline_buffer`` (10,000 messages), ``max_inflight`` (20), ``tcp_nodelay`` (true),
    ``tcp_quickack`` (true), ``presence_topic`` (none), ``unclaimed_buffer`` (1,024 messages;
    persistent sessions), ``receive_maximum`` (MQTT 5; 0 = not sent, the default for clean
    sessions; persistent sessions send ``unclaimed_buffer``).

    Presence: with ``presence_topic="devices/pump-1/status"`` the transport keeps a retained
    JSON status on that topic, ``{"online": true, "client_id": "<client_id>"}`` after every
    connect and reconnect (QoS 1; ``connect`` returns once the broker acknowledged it). The
    last will is set to the retained ``{"online": false, ...}``, so the broker marks the client
    offline when it vanishes (crash, kill, cut connection, missed keepalives); a clean close
    publishes the offline status itself before its DISCONNECT (which suppresses the will).
    Subscribers read the current state from the retained message at subscribe time. It
    replaces ``will_topic`` (combining both is an `InvalidURL`).

    ``clean_start=false`` (with a fixed ``client_id``) resumes the broker session across
    reconnects; with MQTT 5 the adapter asks for an unlimited Session Expiry Interval. A new
    process resuming the session gets the backlog before it subscribes: see `Unclaimed.claim`.
    """

    capabilities: Capabilities = _V5_CAPS
    package: ClassVar[str] = "cascade-bus-mqtt"

    def __init__(self, url: BusURL, options: Mapping[str, Any]) -> None:
        super().__init__(url, options)
        o = self._opts = MqttOptions.parse(url, self.options)
        self._presence_bodies: tuple[bytes, bytes] | None = None  # set_presence (bus option)
        self._v5 = o.version == 5
        if not self._v5:
            self.capabilities = _V311_CAPS
        self._client: aiomqtt.Client | None = None
        self._paho: paho_mqtt.Client | None = None
        self._wire: _Wire | None = None
        self._heads = TopicHeads()
        self._no_props = b"\x00" if self._v5 else b""
        # The property block of the last constant header mapping sent (the bus's own).
        self._props_of: Mapping[str, str] | None = None
        self._last_props = b""
        self._written = asyncio.Event()
        self._tasks = TaskSet("mqtt")
        self._offline = OfflineBuffer(o.offline_buffer, self.stats, url.endpoint())
        self._inflight = InflightWindow(o.max_inflight, self._heads, self.stats)
        self._barrier_topic = f"{RESERVED_PREFIX}barrier/{os.urandom(8).hex()}"
        self._router = Router(
            self._barrier_topic, self._inflight, self.stats, self._tasks, not o.clean_start
        )
        # Persistent sessions only: received messages no local subscription wanted yet (see
        # `Unclaimed`); None: dropped as before.
        self._unclaimed: Unclaimed | None = None
        if not o.clean_start and o.unclaimed_buffer > 0:
            self._unclaimed = Unclaimed(o.unclaimed_buffer, self.stats, self._router.full)
            self._router.unclaimed = self._unclaimed
        self._subs = Subscriptions(self, self._router)
        self._conn = Connection(self)
        self._supervisor = Supervisor(self, self._conn, o.network)
        self._supervisor_task: asyncio.Task[None] | None = None

    def presence_payload(self, online: bool) -> bytes:
        """The retained body on ``presence_topic``: ``{"online": <bool>, "client_id": <id>}``.

        With the bus's ``presence`` option (`set_presence`), the bodies the bus asked for.
        """
        if self._presence_bodies is not None:
            return self._presence_bodies[0 if online else 1]
        return msgspec.json.encode({"online": online, "client_id": self._opts.client_id})

    def set_presence(self, topic: str, online: bytes, offline: bytes) -> None:
        """The bus's ``presence`` option, natively: ``presence_topic`` with the bus's bodies.

        Raises:
            InvalidURL: combined with ``will_topic`` or another ``presence_topic``.
        """
        o = self._opts
        if o.will_topic or (o.presence_topic and o.presence_topic != topic):
            raise InvalidURL(
                "presence sets the last will itself; do not combine it with "
                f"{'will_topic' if o.will_topic else 'presence_topic'}"
            )
        self._opts = dataclasses.replace(o, presence_topic=topic)
        self._presence_bodies = (online, offline)

    @property
    def buffered(self) -> int:
        """Messages in the offline buffer, plus received ones waiting to be claimed."""
        held = self._unclaimed
        return len(self._offline) + (len(held) if held is not None else 0)

    @property
    def unclaimed(self) -> int:
        """Received messages held for a ``subscribe()`` that has not claimed them yet."""
        held = self._unclaimed
        return len(held) if held is not None else 0

    async def wait_unclaimed(self, count: int) -> None:
        """Wait until at least ``count`` messages are held unclaimed (tests, health checks).

        Unbounded: wrap it in ``asyncio.timeout``.
        """
        if self._unclaimed is not None:
            await self._unclaimed.wait(count)
        elif count > 0:  # nothing is ever held without a persistent session
            await asyncio.Event().wait()

    @property
    def max_payload(self) -> int | None:
        """MQTT's own limit (the broker may be configured lower; it then refuses)."""
        return _MAX_PAYLOAD

    # -- connection ----------------------------------------------------------------------------

    async def connect(self) -> None:
        """Connect, subscribe the barrier topic and start the reconnect supervisor.

        Raises:
            ConnectError: unreachable broker or refused credentials (no password shown), or
                the connection failed right after CONNACK (barrier subscribe, presence).
        """
        try:
            await self._conn.open()
        except (ConnectionLost, SubscribeError, PublishError) as exc:
            raise ConnectError(
                f"could not set up the connection to {self.url.endpoint()}: {exc}"
            ) from exc
        self._set_connected(True)
        self._supervisor_task = self._tasks.spawn(self._supervisor.run(), "supervisor")

    async def aclose(self) -> None:
        """Disconnect cleanly (DISCONNECT packet); the will is not published. Idempotent."""
        if self._closed:
            return
        self._supervisor.closing = True
        self._closed = True
        supervisor = self._supervisor_task
        if supervisor is not None and not supervisor.done():
            supervisor.cancel()
            await asyncio.gather(supervisor, return_exceptions=True)
        resume = self._router.resume_task
        if resume is not None and not resume.done():  # read again: acks must come in
            self._router.resume_now()
            await asyncio.gather(resume, return_exceptions=True)
        presence = self._opts.presence_topic
        if presence and self._connected and self._paho is not None:
            # A clean DISCONNECT suppresses the will, so say "offline" ourselves first.
            try:
                await self._conn.publish_control(
                    presence, self.presence_payload(False), retain=True
                )
            except (ConnectionLost, PublishError) as exc:
                log.warning("could not publish the offline presence to %r: %s", presence, exc)
        if self._unclaimed is not None:
            self._unclaimed.release()  # acknowledged before the DISCONNECT: the broker forgets
        await self._conn.drop()
        self._set_connected(False)
        if self._unclaimed is not None:  # never claimed (arrivals during the close included)
            self._unclaimed.drop_all()
        self._conn.fail_waiting(BusClosed("the MQTT transport was closed"))
        self._router.fail_barriers(BusClosed("the MQTT transport was closed"))
        await self._tasks.aclose()

    # -- publishing ----------------------------------------------------------------------------

    def _props(self, headers: Mapping[str, str] | None, retain: bool) -> bytes:
        """The encoded PUBLISH property block (MQTT 5; see `encode_props`), empty with 3.1.1."""
        return encode_props(headers, retain) if self._v5 else b""

    def send(
        self,
        topic: str,
        data: bytes,
        qos: int,
        retain: bool,
        headers: Mapping[str, str] | None,
        reply_to: str | None = None,
    ) -> Awaitable[None] | None:
        """The hot path: one PUBLISH packet written, queued or buffered (``reply_to`` unused).

        Returns the future of a QoS>=1 publish (done on PUBACK/PUBCOMP, or once buffered when
        the connection drops), an awaitable while paho's queue is over its high-water mark
        (QoS 0), else None: the message is written or queued for the socket, or buffered.

        Raises:
            PublishError: the offline buffer is full.
            PayloadTooLarge: larger than MQTT allows.
        """
        if self._closed:
            raise BusClosed("the MQTT transport is closed")
        head = self._heads.get(topic)
        if head is None:
            head = self._heads.head(topic)
        if not (headers or retain):
            props = self._no_props
        elif headers is self._props_of and not retain:  # the bus's constant headers again
            props = self._last_props
        else:
            props = self._props(headers, retain)
            if type(headers) is MappingProxyType and not retain:
                self._props_of, self._last_props = headers, props
        if len(data) > _MAX_PAYLOAD - 4 - len(head) - len(props):
            raise PayloadTooLarge(
                f"message for {topic!r} is {len(data)} bytes; MQTT refuses it",
                size=len(data),
                limit=_MAX_PAYLOAD,
            )
        wire = self._wire
        if wire is not None and self._connected and wire.paho._sock is wire.sock:
            if qos:
                fut = asyncio.get_running_loop().create_future()
                self._inflight.send(wire, MqttOutgoing(topic, data, qos, retain, props, fut), True)
                if self._router.paused:  # its PUBACK must be read (a handler may be waiting)
                    self._router.resume_now()
                return fut
            wire.write(_publish_packet(head, data, 0, retain, props, 0), False)
            if len(wire.out) > _OUT_HIGH:
                return self._drain_socket(wire.paho)
            return None
        self._offline.hold(
            MqttOutgoing(topic, data, qos, retain, props, None), reconnecting=self._opts.reconnect
        )
        return None

    async def _drain_socket(self, paho: paho_mqtt.Client) -> None:
        """Let the event loop write paho's queued packets before queueing more (QoS 0)."""
        self._written.clear()
        if not paho.want_write() or not self._connected:
            return
        try:
            async with asyncio.timeout(5.0):
                await self._written.wait()
        except TimeoutError:
            log.warning("%s did not accept our data for %.1fs", self.url.endpoint(), 5.0)

    async def flush(self, timeout: float) -> None:
        """Wait until every QoS>=1 message is acknowledged and the broker processed the rest.

        Written to the socket is not enough for QoS 0: another client subscribing right after
        ``flush`` could still beat those messages to the broker (and get them live instead of
        retained). So flush ends with a barrier round trip on this connection, which the
        broker answers only after handling everything sent before it.

        Raises:
            TimeoutError: not done within ``timeout`` seconds.
        """
        if self._unclaimed is not None:
            self._unclaimed.release()  # held messages must not hold the window the barrier needs
        async with asyncio.timeout(timeout):
            while True:
                await self._offline.wait_empty()
                await self._inflight.idle.wait()
                if self._offline:
                    continue  # requeued while we waited
                if self._paho is None or not self._connected:
                    return  # nothing waits for a connection (idle): nothing left to confirm
                try:
                    await self._subs.barrier(0)
                except ConnectionLost:
                    # Unacknowledged QoS>=1 messages go back to the offline buffer: wait for
                    # the supervisor to notice, then for them to be resent and acknowledged.
                    await self.wait_disconnected()
                    continue
                return

    # -- subscribing ---------------------------------------------------------------------------

    async def subscribe(
        self,
        pattern: str,
        sink: MessageSink,
        *,
        qos: int = 0,
        queue: str | None = None,
    ) -> TransportSubscription:
        """Subscribe (sharing one broker subscription per filter) and replay retained first.

        Raises:
            SubscribeError: the broker refused the filter.
        """
        if self._closed:
            raise BusClosed("the MQTT transport is closed")
        return await self._subs.subscribe(pattern, sink, qos, queue)
