"""The MQTT transport: aiomqtt for the connection, its paho client on the hot path.

aiomqtt integrates paho with asyncio (socket readers/writers, keepalive) and we use it for that.
Its per-message path (an asyncio.Queue, a task and ``wait_for`` per message) is what limits it,
so publishes go straight to the paho client with one future per QoS>=1 message, and received
messages go straight from paho's ``on_message`` into the bus's subscription queues.

Reliability, which aiomqtt 2.x leaves to the user:

- A supervisor task notices a lost connection, reconnects with jittered exponential backoff
  (a fresh client each time), resubscribes every filter (retained messages replay) and then
  resends what the broker never acknowledged plus everything published while down.
- While down, publishes go to a bounded offline buffer. QoS>=1 publishes that do not fit raise
  `PublishError`; QoS 0 ones that do not fit are dropped and counted (``offline_overflow``).
- ``subscribe`` returns only after SUBACK *and* a loopback barrier message published after it
  came back on the same connection, so every retained message the broker sent for the new
  filter has been delivered first (no sleeps). With MQTT 5 each filter carries a subscription
  identifier, so a message reaches exactly the subscriptions the broker matched, and a retained
  replay caused by one subscribe reaches only that subscription.
- Every wait on the broker during (re)connect and subscribe races the connection's loss, so a
  broker that goes away mid-handshake costs one failed attempt, not aiomqtt's 10 s timeout.
- Persistent sessions (``clean_start=false``): a restarted process receives its session's
  backlog right after CONNACK, before ``subscribe()`` could run. Such messages (no local
  route) wait in a bounded *unclaimed* buffer; ``subscribe()`` claims the ones its filter
  matches, in arrival order, before its barrier returns (see `MqttTransport._claim`).
- Presence (``presence_topic``): on every (re)connect a retained ``{"online": true, ...}`` is
  published (QoS 1, acknowledged before ``connect`` returns); the will, set to the retained
  ``{"online": false, ...}``, marks a crash; a clean ``aclose`` publishes it itself first.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import threading
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, ClassVar, TypeVar

import aiomqtt
import msgspec
import paho.mqtt.client as paho_mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from cascade_bus import (
    BusClosed,
    ConnectError,
    ConnectionLost,
    PayloadTooLarge,
    PublishError,
    SubscribeError,
)
from cascade_bus.spi import (
    BusURL,
    Capabilities,
    DropReason,
    Message,
    MessageSink,
    NetworkTransport,
    TransportSubscription,
    backoff_delays,
    topic_matches,
)

from ._options import MqttOptions

__all__ = ["MqttTransport"]

log = logging.getLogger("cascade_bus.mqtt")

_T = TypeVar("_T")

#: Topics under this prefix are the adapter's own (subscribe barriers); never delivered.
RESERVED_PREFIX = "_cascade_bus/"
_MAX_PAYLOAD = 268_435_455  # MQTT's largest remaining length
_OUT_HIGH = 2048  # paho packets waiting for the socket before a QoS 0 publisher yields
_BARRIER_ID = 1
_COALESCE_BYTES = 64 * 1024  # at most this much of paho's queue goes into one send
_NO_MATCHING_SUBSCRIBERS = 0x10  # MQTT 5 PUBACK/PUBREC reason code (a success code)
# Persistent sessions start their subscription identifiers at a random point below this
# (MQTT allows up to 268,435,455), so a restarted process does not reuse its predecessor's.
_ID_SPREAD = 1 << 27

_V5_CAPS = Capabilities(
    max_qos=2,
    retain=True,
    wildcards=True,
    headers=True,
    queue_groups=True,
    request_reply=True,
    will=True,
    persistence=False,
    ordering=True,
    max_payload=_MAX_PAYLOAD,
)
_V311_CAPS = msgspec.structs.replace(_V5_CAPS, headers=False, queue_groups=False)


class _Outgoing:
    """A publish the broker has not acknowledged yet (or that waits for a connection)."""

    __slots__ = ("data", "future", "props", "qos", "retain", "topic")

    def __init__(
        self,
        topic: str,
        data: bytes,
        qos: int,
        retain: bool,
        props: Properties | None,
        future: asyncio.Future[None] | None,
    ) -> None:
        self.topic = topic
        self.data = data
        self.qos = qos
        self.retain = retain
        self.props = props
        self.future = future

    def settle(self, error: BaseException | None = None) -> None:
        fut = self.future
        if fut is not None and not fut.done():
            if error is None:
                fut.set_result(None)
            else:
                fut.set_exception(error)


class _PublishedInfos:
    """Completes the QoS 0 publishes merged into one write (see `_coalesce`)."""

    __slots__ = ("infos",)

    def __init__(self, infos: list[paho_mqtt.MQTTMessageInfo]) -> None:
        self.infos = infos

    def _set_as_published(self) -> None:
        for info in self.infos:
            info._set_as_published()


def _coalesce(out: deque[Any]) -> None:
    """Merge the packets paho queued into one buffer, so that a burst costs one ``send``.

    paho writes each packet with its own ``send`` call (with TCP_NODELAY, its own TCP
    segment too), and on loopback that system call is the largest single cost of a publish.
    After a packet is fully written paho does something for two kinds only: a QoS 0 PUBLISH
    (``on_publish`` and its ``MQTTMessageInfo`` marked published) and DISCONNECT. So packets up
    to the first DISCONNECT become one QoS 0 PUBLISH entry with mid 0 (never a real one: paho
    numbers from 1), whose completion marks every merged QoS 0 publish published; our
    ``_on_publish`` ignores mid 0. A packet already partly written keeps its position; a
    burst stops at ``_COALESCE_BYTES`` so a retry after a short write copies little.
    """
    parts: list[bytes | bytearray | memoryview] = []
    infos: list[paho_mqtt.MQTTMessageInfo] = []
    size = 0
    taken = 0
    for packet in out:
        if packet["command"] & 0xF0 == paho_mqtt.DISCONNECT:
            break
        data = packet["packet"]
        pos = packet["pos"]
        chunk = memoryview(data)[pos:] if pos else data
        if taken and size + len(chunk) > _COALESCE_BYTES:
            break
        parts.append(chunk)
        size += len(chunk)
        taken += 1
        if packet["command"] & 0xF0 == paho_mqtt.PUBLISH and packet["qos"] == 0:
            info = packet["info"]
            if info is not None:
                infos.append(info)
    if taken < 2:
        return
    for _ in range(taken):
        out.popleft()
    merged = b"".join(parts)
    out.appendleft(
        {
            # Completed as a QoS 0 PUBLISH only when it carries some (on_publish, mid 0).
            "command": paho_mqtt.PUBLISH if infos else 0,
            "mid": 0,
            "qos": 0,
            "pos": 0,
            "to_process": len(merged),
            "packet": merged,
            "info": _PublishedInfos(infos),
        }
    )


class _Ack:
    """Acknowledges one received QoS>=1 message once every local subscription handled it.

    With paho's manual acks the PUBACK (PUBCOMP for QoS 2) leaves only after the handlers ran,
    so a crash before that makes the broker send the message again (at least once, end to end),
    and unacknowledged messages count against the broker's in-flight window (flow control).
    """

    __slots__ = ("mid", "paho", "pending", "qos", "transport")

    def __init__(
        self, transport: MqttTransport, paho: paho_mqtt.Client, mid: int, qos: int
    ) -> None:
        self.transport = transport
        self.paho = paho
        self.mid = mid
        self.qos = qos
        self.pending = 0

    def expect(self, count: int) -> None:
        """Set how many subscriptions will ack; with none, acknowledge right away."""
        self.pending += count
        if self.pending <= 0:
            self._send()

    async def __call__(self) -> None:
        self.pending -= 1
        if self.pending == 0:
            self._send()

    def _send(self) -> None:
        # A message from an older connection cannot be acknowledged on the new one: the
        # broker resends it (a counted duplicate) instead.
        if self.transport._paho is self.paho:
            self.paho.ack(self.mid, self.qos)


class _Entry:
    """One subscription at the broker (a filter, or ``$share/<queue>/<filter>``) and its sinks."""

    __slots__ = ("fresh", "native", "pattern", "qos", "queue", "sinks", "sub_id")

    def __init__(self, native: str, pattern: str, queue: str | None, qos: int) -> None:
        self.native = native
        self.pattern = pattern
        self.queue = queue
        self.qos = qos
        self.sinks: list[MessageSink] = []
        self.sub_id = 0
        # The sink being subscribed right now: retained replays go to it alone.
        self.fresh: MessageSink | None = None


def _abandon_connect(client: aiomqtt.Client) -> None:
    """Fail a connect attempt still waiting for CONNACK: its connection is gone."""
    pending = client._connected
    if not pending.done():
        pending.set_exception(aiomqtt.MqttError("the connection closed before CONNACK"))
        pending.exception()  # whoever awaits it still gets it; no "never retrieved" noise


class _Handle(TransportSubscription):
    __slots__ = ("entry", "sink", "transport")

    def __init__(self, transport: MqttTransport, entry: _Entry, sink: MessageSink) -> None:
        self.transport = transport
        self.entry = entry
        self.sink = sink

    async def unsubscribe(self) -> None:
        await self.transport._remove(self.entry, self.sink)


class MqttTransport(NetworkTransport):
    """``mqtt://[user:pass@]host[:1883]`` and ``mqtts://`` (TLS) through aiomqtt.

    Options (URL query or keyword): ``client_id``, ``version`` (``5`` default, or ``3.1.1``),
    ``keepalive`` (60 s), ``clean_start`` (true), ``ca_file``/``certfile``/``keyfile``/
    ``tls_verify`` (mqtts), ``will_topic``/``will_payload``/``will_qos``/``will_retain``,
    ``reconnect`` (true), ``reconnect_min``/``reconnect_max`` (backoff bounds, s),
    ``offline_buffer`` (10,000 messages), ``max_inflight`` (20), ``tcp_nodelay`` (true),
    ``presence_topic`` (none), ``unclaimed_buffer`` (1,024 messages; persistent sessions),
    ``receive_maximum`` (MQTT 5; 0 = not sent, the default for clean sessions; persistent
    sessions send ``unclaimed_buffer``).

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
    process resuming the session gets the backlog before it subscribes: see `_claim`.
    """

    capabilities: Capabilities = _V5_CAPS
    package: ClassVar[str] = "cascade-bus-mqtt"

    def __init__(self, url: BusURL, options: Mapping[str, Any]) -> None:
        super().__init__(url, options)
        self._opts = MqttOptions.parse(url, self.options)
        self._v5 = self._opts.version == 5
        if not self._v5:
            self.capabilities = _V311_CAPS
        self._client: aiomqtt.Client | None = None
        self._paho: paho_mqtt.Client | None = None
        self._closing = False
        self._supervisor: asyncio.Task[None] | None = None
        self._entries: dict[str, _Entry] = {}
        self._by_id: dict[int, _Entry] = {}
        self._persistent = not self._opts.clean_start
        # Subscription identifiers of a previous process on this session stay on the messages
        # the broker queued for it; a random start keeps ours from colliding with them.
        self._id_base = _BARRIER_ID + 1
        if self._persistent:
            self._id_base += int.from_bytes(os.urandom(4), "big") % _ID_SPREAD
        self._ids = itertools.count(self._id_base)
        self._id_last = _BARRIER_ID
        self._sub_lock = asyncio.Lock()
        self._window: _Entry | None = None
        self._barrier_topic = f"{RESERVED_PREFIX}barrier/{os.urandom(8).hex()}"
        self._barriers: dict[bytes, asyncio.Future[None]] = {}
        self._barrier_ids = itertools.count(1)
        self._inflight: dict[int, _Outgoing] = {}
        self._offline: deque[_Outgoing] = deque()
        self._idle = asyncio.Event()
        self._idle.set()
        self._written = asyncio.Event()
        # Subscriptions that reported "full" while reading: reading pauses until they have room.
        self._full: list[MessageSink] = []
        self._paused = False
        self._resume_task: asyncio.Task[None] | None = None
        self._readable: Callable[[], None] | None = None
        self._lost_cause: BaseException | None = None
        # PUBACKs awaited by the adapter itself (presence), by mid of the current client.
        self._control: dict[int, asyncio.Future[None]] = {}
        # Persistent sessions only: received messages no local subscription wanted yet, with
        # their ack while still unacknowledged (see _take and _claim); None: dropped as before.
        self._unclaimed: deque[tuple[Message, _Ack | None]] | None = None
        if self._persistent and self._opts.unclaimed_buffer > 0:
            self._unclaimed = deque()
        # True until the first subscribe() or flush(): held messages stay unacknowledged.
        self._hold_unacked = True
        # The subscription whose barrier is pending: it takes the backlog that matches it.
        self._claimer: tuple[str, MessageSink] | None = None
        self._warned_unclaimed = False
        self._held_more = asyncio.Event()

    def __repr__(self) -> str:
        state = "connected" if self._connected else "disconnected"
        return f"<MqttTransport {self.url.redacted()} {state}>"

    def presence_payload(self, online: bool) -> bytes:
        """The retained body on ``presence_topic``: ``{"online": <bool>, "client_id": <id>}``."""
        return msgspec.json.encode({"online": online, "client_id": self._opts.client_id})

    @property
    def buffered(self) -> int:
        """Messages in the offline buffer, plus received ones waiting to be claimed."""
        held = self._unclaimed
        return len(self._offline) + (len(held) if held else 0)

    @property
    def unclaimed(self) -> int:
        """Received messages held for a ``subscribe()`` that has not claimed them yet."""
        held = self._unclaimed
        return len(held) if held else 0

    async def wait_unclaimed(self, count: int) -> None:
        """Wait until at least ``count`` messages are held unclaimed (tests, health checks).

        Unbounded: wrap it in ``asyncio.timeout``.
        """
        while self.unclaimed < count:
            self._held_more.clear()
            await self._held_more.wait()

    @property
    def max_payload(self) -> int | None:
        """MQTT's own limit (the broker may be configured lower; it then refuses)."""
        return _MAX_PAYLOAD

    # -- connection ----------------------------------------------------------------------------

    def _new_client(self) -> aiomqtt.Client:
        o = self._opts
        will = (
            aiomqtt.Will(o.will_topic, o.will_payload, o.will_qos, o.will_retain)
            if o.will_topic
            else None
        )
        if o.presence_topic:
            will = aiomqtt.Will(o.presence_topic, self.presence_payload(False), 1, True)
        properties = None
        if self._v5 and (not o.clean_start or o.receive_maximum):
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            if not o.clean_start:
                properties.SessionExpiryInterval = 0xFFFFFFFF
            if o.receive_maximum:
                properties.ReceiveMaximum = o.receive_maximum
        return aiomqtt.Client(
            o.host,
            o.port,
            username=o.username,
            password=o.password,
            identifier=o.client_id,
            protocol=aiomqtt.ProtocolVersion.V5 if self._v5 else aiomqtt.ProtocolVersion.V311,
            keepalive=o.keepalive,
            clean_session=None if self._v5 else o.clean_start,
            # paho refuses any other clean_start with 3.1.1 (clean_session says it there).
            clean_start=(
                paho_mqtt.MQTT_CLEAN_START_FIRST_ONLY if o.clean_start or not self._v5 else False
            ),
            properties=properties,
            tls_context=o.tls,
            transport=o.transport,
            websocket_path=o.ws_path if o.transport == "websockets" else None,
            # paho checks the host name itself unless told not to, even with tls_verify=false
            # (where there is no certificate to check: every connect would fail).
            tls_insecure=True if o.tls is not None and not o.tls.check_hostname else None,
            will=will,
            max_inflight_messages=o.max_inflight,
            socket_options=(
                ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),) if o.tcp_nodelay else ()
            ),
            timeout=10.0,
        )

    async def _open_client(self) -> None:
        self._full.clear()
        self._paused = False  # a new socket starts reading
        client = self._new_client()
        paho = client._client
        paho.on_message = self._on_message
        paho.on_publish = self._on_publish
        paho.manual_ack_set(True)  # PUBACK after the handlers ran (see _Ack)
        loop = asyncio.get_running_loop()

        # aiomqtt registers the socket for writing through call_soon_threadsafe; when the
        # connection dies before that callback runs (a broker going down with data queued), it
        # registers a closed file descriptor (an asyncio error with a traceback), or one already
        # reused by the next connection. Register only while the socket is still paho's.
        def writable() -> None:
            try:
                if len(paho._out_packet) > 1:
                    _coalesce(paho._out_packet)
                paho.loop_write()
            except Exception as exc:  # a broken pipe: the connection is gone
                if not client._disconnected.done():
                    client._disconnected.set_exception(exc)

        # paho asks for this once per burst (until it has written everything it queued). From
        # our own thread (every publish, PUBACKs while reading) the packets are written at the
        # next turn of the loop, which also gathers a burst of publishes into one pass; only if
        # the socket cannot take them all does the loop watch it for writing. No
        # call_soon_threadsafe (a self-pipe write and wakeup) and no add/remove_writer
        # (two epoll_ctl) per publish, as aiomqtt does.
        loop_thread = threading.get_ident()

        def add(sock: Any) -> None:
            current = paho.socket()
            if current is not None and current is sock:
                loop.add_writer(current.fileno(), writable)

        def write_soon(sock: Any) -> None:
            current = paho.socket()
            if current is None or current is not sock:
                return
            writable()
            if paho.want_write():  # the socket is full: wait until it drains
                loop.add_writer(current.fileno(), writable)

        def register_write(_client: paho_mqtt.Client, userdata: Any, sock: Any) -> None:
            if threading.get_ident() == loop_thread:
                loop.call_soon(write_soon, sock)
            else:  # the CONNECT packet, queued by aiomqtt's connect in an executor thread
                loop.call_soon_threadsafe(add, sock)

        paho.on_socket_register_write = register_write

        # Own the socket reader too (aiomqtt's is replaced right after it registers it), so a
        # full subscription can pause reading: TCP then holds the broker back (flow control).
        def readable() -> None:
            try:
                while True:
                    paho.loop_read()
                    if self._full:
                        self._pause_reading(paho)
                        break
                    # SSL sockets may hold decoded bytes that select() cannot see.
                    sock = paho._sock
                    if sock is None or not (hasattr(sock, "pending") and sock.pending() > 0):
                        break
            except Exception as exc:  # the connection broke while reading
                if not client._disconnected.done():
                    client._disconnected.set_exception(exc)

        on_socket_open = paho.on_socket_open

        def socket_open(_client: paho_mqtt.Client, userdata: Any, sock: Any) -> None:
            if on_socket_open is not None:
                on_socket_open(_client, userdata, sock)

            def own() -> None:
                current = paho.socket()
                if current is not None and current is sock:
                    loop.remove_reader(current.fileno())
                    loop.add_reader(current.fileno(), readable)

            loop.call_soon_threadsafe(own)

        paho.on_socket_open = socket_open
        self._readable = readable
        # Learn when paho has written everything it queued (flush, QoS 0 flow control).
        unregister = paho.on_socket_unregister_write

        def written(client: paho_mqtt.Client, userdata: Any, sock: Any) -> None:
            if unregister is not None:
                unregister(client, userdata, sock)
            self._written.set()

        paho.on_socket_unregister_write = written
        # aiomqtt ignores a connection that closes before CONNACK (a broker shutting down, a
        # proxy refusing) and waits out its whole timeout; fail the attempt at once instead.
        on_disconnect = paho.on_disconnect

        def disconnected(*args: Any) -> None:
            if on_disconnect is not None:
                on_disconnect(*args)
            loop.call_soon_threadsafe(_abandon_connect, client)

        paho.on_disconnect = disconnected
        try:
            await client.__aenter__()
        except aiomqtt.MqttCodeError as exc:
            raise ConnectError(f"{self.url.endpoint()} refused the connection: {exc.rc}") from exc
        except aiomqtt.MqttError as exc:
            raise ConnectError(f"could not connect to {self.url.endpoint()}: {exc}") from exc
        except OSError as exc:
            raise ConnectError(f"could not connect to {self.url.endpoint()}: {exc}") from exc
        self._client = client
        self._paho = paho
        try:
            await self._subscribe_native(self._barrier_topic, 1, _BARRIER_ID)
            if self._opts.presence_topic:
                await self._publish_control(
                    self._opts.presence_topic, self.presence_payload(True), retain=True
                )
        except BaseException:
            await self._drop_client()
            raise

    async def _until_lost(self, waitable: Awaitable[_T], what: str) -> _T:
        """Await ``waitable`` unless the current connection drops first (then ConnectionLost)."""
        client = self._client
        task = asyncio.ensure_future(waitable)
        if client is None:
            task.cancel()
            raise ConnectionLost(f"not connected to {self.url.endpoint()}")
        lost = client._disconnected
        try:
            await asyncio.wait((task, lost), return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if task.cancelled():
            raise ConnectionLost(f"lost the connection to {self.url.endpoint()} while {what}")
        return task.result()

    async def _publish_control(self, topic: str, data: bytes, *, retain: bool) -> None:
        """Publish the adapter's own QoS 1 message and wait (bounded) for its PUBACK."""
        paho = self._paho
        if paho is None:
            raise ConnectionLost(f"not connected to {self.url.endpoint()}")
        info = paho.publish(topic, data, 1, retain)
        if info.rc != paho_mqtt.MQTT_ERR_SUCCESS:
            raise ConnectionLost(f"lost {self.url.endpoint()} while publishing to {topic!r}")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._control[info.mid] = fut
        try:
            async with asyncio.timeout(10.0):
                await self._until_lost(fut, f"publishing to {topic!r}")
        except TimeoutError:
            raise PublishError(
                f"{self.url.endpoint()} did not acknowledge the message for {topic!r}", topic=topic
            ) from None
        finally:
            self._control.pop(info.mid, None)

    async def connect(self) -> None:
        """Connect, subscribe the barrier topic and start the reconnect supervisor.

        Raises:
            ConnectError: unreachable broker or refused credentials (no password shown), or
                the connection failed right after CONNACK (barrier subscribe, presence).
        """
        try:
            await self._open_client()
        except (ConnectionLost, SubscribeError, PublishError) as exc:
            raise ConnectError(
                f"could not set up the connection to {self.url.endpoint()}: {exc}"
            ) from exc
        self._set_connected(True)
        self._supervisor = asyncio.get_running_loop().create_task(
            self._supervise(), name=f"cascade_bus.mqtt[{self._opts.client_id}].supervisor"
        )

    async def _drop_client(self) -> None:
        client, self._client, self._paho = self._client, None, None
        for fut in self._control.values():
            fut.cancel()
        self._control.clear()
        if client is None:
            return
        lost = client._disconnected
        if lost.done() and not lost.cancelled():
            lost.exception()  # retrieved: no "exception was never retrieved" noise
        try:
            async with asyncio.timeout(2.0):
                await client.__aexit__(None, None, None)
        except Exception as exc:  # it is gone either way
            log.debug("closing the MQTT client: %r", exc)

    async def _supervise(self) -> None:
        """Wait for the connection to drop, then reconnect, resubscribe and resend."""
        while not self._closing:
            client = self._client
            assert client is not None
            lost = client._disconnected
            # asyncio.wait, not ``await lost``: cancelling this task (aclose) must not cancel
            # aiomqtt's future, or its __aexit__ thinks it is disconnected already and never
            # sends DISCONNECT (the broker would then publish the will).
            await asyncio.wait((lost,))
            cause = None if lost.cancelled() else lost.exception()
            if self._closing:
                return
            self._set_connected(False)
            self._lost_cause = cause
            await self._drop_client()
            self._requeue_inflight()
            if not self._opts.reconnect:
                log.error("lost the connection to %s: %s", self.url.endpoint(), cause)
                self._fail_waiting(ConnectionLost(f"lost the connection to {self.url.endpoint()}"))
                return
            log.warning("lost the connection to %s (%s); reconnecting", self.url.endpoint(), cause)
            await self._reconnect()

    async def _reconnect(self) -> None:
        attempt = 0
        for delay in backoff_delays(self._opts.reconnect_min, self._opts.reconnect_max):
            if self._closing:
                return
            attempt += 1
            await asyncio.sleep(delay)
            try:
                await self._open_client()
                await self._resubscribe_all()
            except (
                ConnectError,
                ConnectionLost,
                SubscribeError,
                PublishError,
                OSError,
                aiomqtt.MqttError,
            ) as exc:
                log.info("reconnect attempt %d to %s failed: %s", attempt, self.url.endpoint(), exc)
                await self._drop_client()
                continue
            break
        self.stats.reconnects += 1
        self._connected = True
        self._resend_offline()
        self._set_connected(True)
        log.warning("reconnected to %s after %d attempt(s)", self.url.endpoint(), attempt)

    def _requeue_inflight(self) -> None:
        """Put what the broker never acknowledged back in front of the offline buffer."""
        if self._inflight:
            pending = [self._inflight[mid] for mid in sorted(self._inflight)]
            self._inflight.clear()
            self._offline.extendleft(reversed(pending))
            for out in pending:  # held in a buffer that survives the reconnect
                out.settle()
        self._idle.clear() if self._offline else self._idle.set()

    def _resend_offline(self) -> None:
        paho = self._paho
        assert paho is not None
        while self._offline:
            out = self._offline.popleft()
            info = paho.publish(out.topic, out.data, out.qos, out.retain, out.props)
            if info.rc != paho_mqtt.MQTT_ERR_SUCCESS:
                self._offline.appendleft(out)
                return
            if out.qos:
                self._inflight[info.mid] = out
        self._check_idle()

    def _fail_waiting(self, error: BaseException) -> None:
        for out in list(self._inflight.values()) + list(self._offline):
            out.settle(error)
        dropped = len(self._offline)
        if dropped:
            self.stats.drop(DropReason.DISCONNECTED, dropped)
        self._inflight.clear()
        self._offline.clear()
        self._idle.set()

    async def aclose(self) -> None:
        """Disconnect cleanly (DISCONNECT packet); the will is not published. Idempotent."""
        if self._closed:
            return
        self._closing = True
        self._closed = True
        supervisor = self._supervisor
        if supervisor is not None and not supervisor.done():
            supervisor.cancel()
            await asyncio.gather(supervisor, return_exceptions=True)
        resume = self._resume_task
        if resume is not None and not resume.done():  # read again: acks must come in
            resume.cancel()
            await asyncio.gather(resume, return_exceptions=True)
        presence = self._opts.presence_topic
        if presence and self._connected and self._paho is not None:
            # A clean DISCONNECT suppresses the will, so say "offline" ourselves first.
            try:
                await self._publish_control(presence, self.presence_payload(False), retain=True)
            except (ConnectionLost, PublishError) as exc:
                log.warning("could not publish the offline presence to %r: %s", presence, exc)
        if self._unclaimed is not None:
            self._release_held()  # acknowledged before the DISCONNECT: the broker forgets them
        await self._drop_client()
        self._set_connected(False)
        held = self._unclaimed
        if held:  # never claimed: counted once, here (arrivals during the close included)
            self.stats.drop(DropReason.NO_SUBSCRIBER, len(held))
            held.clear()
        if self._offline or self._inflight:
            self._fail_waiting(BusClosed("the MQTT transport was closed"))
        for fut in self._barriers.values():
            if not fut.done():
                fut.set_exception(BusClosed("the MQTT transport was closed"))

    # -- publishing ----------------------------------------------------------------------------

    def _props(self, headers: Mapping[str, str] | None) -> Properties | None:
        if not headers or not self._v5:
            return None
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.UserProperty = list(headers.items())
        return props

    async def publish(
        self,
        topic: str,
        data: bytes,
        *,
        qos: int = 0,
        retain: bool = False,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Publish; QoS>=1 returns once PUBACK/PUBCOMP arrived or the message is buffered.

        Raises:
            PublishError: the broker refused it, or the offline buffer is full.
            PayloadTooLarge: larger than MQTT allows.
        """
        if self._closed:
            raise BusClosed("the MQTT transport is closed")
        props = self._props(headers) if headers else None
        paho = self._paho
        if self._connected and paho is not None:
            info = paho.publish(topic, data, qos, retain, props)
            rc = info.rc
            if rc == paho_mqtt.MQTT_ERR_SUCCESS:
                if qos:
                    fut = asyncio.get_running_loop().create_future()
                    self._inflight[info.mid] = _Outgoing(topic, data, qos, retain, props, fut)
                    self._idle.clear()
                    if self._paused:  # its PUBACK must be read (a handler may be waiting)
                        self._resume_now()
                    await fut
                elif len(paho._out_packet) > _OUT_HIGH:
                    await self._drain_socket(paho)
                return
            if rc == paho_mqtt.MQTT_ERR_PAYLOAD_SIZE:
                raise PayloadTooLarge(
                    f"message for {topic!r} is {len(data)} bytes; MQTT refuses it",
                    size=len(data),
                    limit=_MAX_PAYLOAD,
                )
            if rc not in (paho_mqtt.MQTT_ERR_NO_CONN, paho_mqtt.MQTT_ERR_CONN_LOST):
                raise PublishError(
                    f"publish to {topic!r} failed: {paho_mqtt.error_string(rc)}", topic=topic
                )
        self._buffer(topic, data, qos, retain, props)

    def _buffer(
        self, topic: str, data: bytes, qos: int, retain: bool, props: Properties | None
    ) -> None:
        if not self._opts.reconnect:  # the bus counts it as 'disconnected'
            raise ConnectionLost(
                f"not connected to {self.url.endpoint()} and reconnect is off",
            )
        if len(self._offline) >= self._opts.offline_buffer:
            if qos == 0:
                self.stats.drop(DropReason.OFFLINE_OVERFLOW)
                return
            raise PublishError(
                f"offline buffer full ({self._opts.offline_buffer} messages) while "
                f"disconnected from {self.url.endpoint()}; QoS {qos} message for {topic!r} "
                "not accepted",
                topic=topic,
                reason=DropReason.OFFLINE_OVERFLOW,
            )
        self._offline.append(_Outgoing(topic, data, qos, retain, props, None))
        self._idle.clear()

    async def _drain_socket(self, paho: paho_mqtt.Client) -> None:
        """Let the event loop write paho's queued packets before queueing more (QoS 0)."""
        await self._wait_written(paho, 5.0)

    async def _wait_written(self, paho: paho_mqtt.Client, timeout: float) -> None:
        self._written.clear()
        if not paho.want_write() or not self._connected:
            return
        try:
            async with asyncio.timeout(timeout):
                await self._written.wait()
        except TimeoutError:
            log.warning("%s did not accept our data for %.1fs", self.url.endpoint(), timeout)

    def _on_publish(
        self,
        client: paho_mqtt.Client,
        userdata: Any,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties,
    ) -> None:
        control = self._control.get(mid)
        if control is not None:
            if not control.done():
                control.set_result(None)
            return
        out = self._inflight.pop(mid, None)
        if out is not None:
            if reason_code.is_failure:
                out.settle(
                    PublishError(
                        f"broker refused the message for {out.topic!r}: {reason_code}",
                        topic=out.topic,
                    )
                )
            else:
                if reason_code.value == _NO_MATCHING_SUBSCRIBERS and not out.retain:
                    # Accepted, but the broker says nobody subscribes: count it (QoS >= 1).
                    self.stats.drop(DropReason.NO_SUBSCRIBER)
                out.settle()
            if not self._inflight:
                self._check_idle()

    def _check_idle(self) -> None:
        if not self._inflight and not self._offline:
            self._idle.set()

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
            self._release_held()  # held messages must not hold the window the barrier needs
        async with asyncio.timeout(timeout):
            while True:
                await self._idle.wait()
                if self._paho is None or not self._connected:
                    return  # nothing waits for a connection (idle): nothing left to confirm
                try:
                    await self._barrier(0)
                except ConnectionLost:
                    # Unacknowledged QoS>=1 messages go back to the offline buffer: wait for
                    # the supervisor to notice, then for them to be resent and acknowledged.
                    await self.wait_disconnected()
                    continue
                return

    # -- receiving -----------------------------------------------------------------------------

    def _on_message(
        self, client: paho_mqtt.Client, userdata: Any, msg: paho_mqtt.MQTTMessage
    ) -> None:
        topic = msg.topic
        if topic.startswith(RESERVED_PREFIX):
            if msg.qos:
                client.ack(msg.mid, msg.qos)
            if topic == self._barrier_topic:
                fut = self._barriers.pop(bytes(msg.payload), None)
                if fut is not None and not fut.done():
                    fut.set_result(None)
            return
        headers: dict[str, str] | None = None
        ids: list[int] | None = None
        if self._v5:
            props = msg.properties
            if props is not None:
                user = getattr(props, "UserProperty", None)
                if user:
                    headers = dict(user)
                ids = getattr(props, "SubscriptionIdentifier", None)
        if msg.dup:
            self.stats.duplicates += 1  # a redelivery: the broker never saw our PUBACK
        retained = bool(msg.retain)
        ack = _Ack(self, client, msg.mid, msg.qos) if msg.qos else None
        message = Message(
            topic, bytes(msg.payload), headers, retained=retained, qos=msg.qos, ack=ack
        )
        delivered = 0
        if ids:
            for sub_id in ids:
                entry = self._by_id.get(sub_id)
                if entry is not None:
                    delivered += self._deliver(entry, message, retained)
        elif retained and self._window is not None:
            fresh = self._window.fresh
            if fresh is not None and topic_matches(self._window.pattern, topic):
                delivered = 1
                if not fresh.deliver(message):
                    self._full.append(fresh)
        else:
            for entry in self._entries.values():
                if topic_matches(entry.pattern, topic):
                    delivered += self._deliver(entry, message, retained)
        if not delivered:
            if self._unclaimed is not None and not retained and self._foreign(ids):
                # A persistent session's backlog, routed by a previous process's
                # subscriptions: held for the subscribe() that will want it.
                self._take(message, ack)
                return
            # Nothing here subscribes to it (a subscription just removed, a retained replay
            # for a queue subscription, a clean session's stray message): counted, and
            # acknowledged so it is not resent.
            self.stats.drop(DropReason.NO_SUBSCRIBER)
        if ack is not None:
            ack.expect(delivered)

    # -- persistent sessions: the backlog that arrives before subscribe() ---------------------

    def _foreign(self, ids: list[int] | None) -> bool:
        """True unless one of the message's subscription identifiers is one we issued.

        A message still tagged with one of our own identifiers (a subscription just removed)
        is a plain stray; anything else (a previous process's identifiers, or none: MQTT
        3.1.1) may be a resumed session's backlog.
        """
        if not ids:
            return True
        low, high = self._id_base, self._id_last
        return all(not low <= sub_id <= high for sub_id in ids)

    def _take(self, message: Message, ack: _Ack | None) -> None:
        """Hand an unrouted message to the subscription being made, or hold it (bounded).

        Held messages stay unacknowledged until the first ``subscribe()`` or ``flush()``, so a
        crash before that loses nothing (the broker resends them); with MQTT 5 the Receive
        Maximum we announce bounds how many the broker sends that way. From then on they are
        acknowledged on arrival: an unacknowledged one holds a slot of the broker's in-flight
        window, and a full window would keep the QoS 1 barrier of ``subscribe()`` out for ever.
        """
        claimer = self._claimer
        if claimer is not None and topic_matches(claimer[0], message.topic):
            # Its barrier is pending: everything the broker queued before the SUBSCRIBE
            # arrives before the barrier, so this is the tail of that subscription's backlog.
            if ack is not None:
                ack.expect(1)
            if not claimer[1].deliver(message):
                self._full.append(claimer[1])
            return
        held = self._unclaimed
        assert held is not None
        if len(held) >= self._opts.unclaimed_buffer:
            self.stats.drop(DropReason.OVERFLOW)
            if not self._warned_unclaimed:
                self._warned_unclaimed = True
                log.warning(
                    "%d messages of the resumed session wait for a subscribe() that wants "
                    "them (unclaimed_buffer); further ones are counted in "
                    "stats().dropped['overflow']",
                    len(held),
                )
            if ack is not None:
                ack.expect(0)
            return
        if ack is not None and not self._hold_unacked:
            ack.expect(0)
            message.ack = None
            ack = None
        held.append((message, ack))
        self._held_more.set()

    def _release_held(self) -> None:
        """Acknowledge every held message now (they stay held) and hold new ones acknowledged."""
        self._hold_unacked = False
        held = self._unclaimed
        if not held:
            return
        released: list[tuple[Message, _Ack | None]] = []
        for message, ack in held:
            if ack is not None:
                ack.expect(0)
                message.ack = None
            released.append((message, None))
        held.clear()
        held.extend(released)

    def _claim(self, pattern: str, sink: MessageSink) -> None:
        """Give a new subscription the held messages its filter matches, in arrival order.

        Each goes to this subscription only, once (the broker's copy was meant for the
        previous process's subscription, which this one replaces); one still unacknowledged
        is acknowledged after its handler ran, as usual. The rest is acknowledged now (see
        `_take`) and stays held for later subscriptions; whatever is never claimed is
        counted as ``no_subscriber`` when the transport closes. Matching is by topic: a
        message is claimed by the first ``subscribe()`` whose filter matches it, whatever
        its queue group.
        """
        held = self._unclaimed
        assert held is not None
        self._hold_unacked = False
        keep: deque[tuple[Message, _Ack | None]] = deque()
        full = False
        for message, ack in held:
            if topic_matches(pattern, message.topic):
                if ack is not None:
                    ack.expect(1)
                if not sink.deliver(message):
                    full = True
            else:
                if ack is not None:
                    ack.expect(0)
                    message.ack = None
                keep.append((message, None))
        held.clear()
        held.extend(keep)
        if full:
            self._full.append(sink)  # reading pauses until the handler made room

    def _pause_reading(self, paho: paho_mqtt.Client) -> None:
        """Stop reading from the broker until every full subscription has room again.

        Not while one of our QoS>=1 publishes waits for its acknowledgement: that ack comes on
        this socket, and the publisher may be the very handler the full subscription waits on.
        """
        sock = paho.socket()
        if sock is None or self._paused or self._inflight:
            self._full.clear()
            return
        loop = asyncio.get_running_loop()
        loop.remove_reader(sock.fileno())
        self._paused = True
        full, self._full = self._full, []
        self._resume_task = loop.create_task(
            self._resume_reading(paho, sock, full), name="cascade_bus.mqtt.resume"
        )

    def _resume_now(self) -> None:
        task = self._resume_task
        if task is not None and not task.done():
            task.cancel()  # its finally re-adds the reader

    async def _resume_reading(
        self, paho: paho_mqtt.Client, sock: Any, full: list[MessageSink]
    ) -> None:
        try:
            for sink in full:
                await sink.ready()  # bounded by the bus's flow_timeout
        finally:
            self._paused = False
            current = paho.socket()
            if current is not None and current is sock and self._readable is not None:
                asyncio.get_running_loop().add_reader(sock.fileno(), self._readable)

    def _deliver(self, entry: _Entry, message: Message, retained: bool) -> int:
        """Hand a message to an entry's sinks; return how many took it (each will ack once)."""
        if retained:
            if entry.queue is not None:
                return 0  # Mosquitto replays retained to shared subscriptions; the bus does not
            fresh = entry.fresh
            if fresh is not None:
                if not fresh.deliver(message):
                    self._full.append(fresh)
                return 1
        for sink in entry.sinks:
            if not sink.deliver(message):
                self._full.append(sink)
        return len(entry.sinks)

    # -- subscribing ---------------------------------------------------------------------------

    async def _subscribe_native(self, native: str, qos: int, sub_id: int) -> None:
        client = self._client
        if client is None:
            raise ConnectionLost(f"not connected to {self.url.endpoint()}")
        properties = None
        if self._v5:
            properties = Properties(PacketTypes.SUBSCRIBE)  # type: ignore[no-untyped-call]
            properties.SubscriptionIdentifier = sub_id
            options: SubscribeOptions | None = SubscribeOptions(qos=qos)
        else:
            options = None
        try:
            if options is not None:
                call = client.subscribe(native, options=options, properties=properties)
            else:
                call = client.subscribe(native, qos)
            granted = await self._until_lost(call, f"subscribing to {native!r}")
        except aiomqtt.MqttError as exc:
            raise SubscribeError(f"subscribe to {native!r} failed: {exc}", pattern=native) from exc
        for code in granted:
            failed = code.is_failure if isinstance(code, ReasonCode) else code == 0x80
            if failed:
                raise SubscribeError(
                    f"{self.url.endpoint()} refused the subscription to {native!r}: {code}",
                    pattern=native,
                )

    async def _barrier(self, qos: int) -> None:
        """Publish a token to our own barrier topic and wait for it to come back."""
        paho = self._paho
        if paho is None:
            raise ConnectionLost(f"not connected to {self.url.endpoint()}")
        token = str(next(self._barrier_ids)).encode()
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._barriers[token] = fut
        try:
            info = paho.publish(self._barrier_topic, token, min(max(qos, 0), 1))
            if info.rc != paho_mqtt.MQTT_ERR_SUCCESS:
                raise ConnectionLost(f"lost {self.url.endpoint()} before a barrier")
            await self._until_lost(fut, "waiting for a barrier")
        finally:
            self._barriers.pop(token, None)

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
        native = f"$share/{queue}/{pattern}" if queue else pattern
        async with self._sub_lock:
            await self._up.wait()
            entry = self._entries.get(native)
            created = entry is None
            if entry is None:
                entry = _Entry(native, pattern, queue, qos)
            old_id = entry.sub_id
            entry.sub_id = self._id_last = next(self._ids)
            entry.qos = max(entry.qos, qos)
            entry.sinks.append(sink)
            entry.fresh = sink if queue is None else None
            self._entries[native] = entry
            self._by_id[entry.sub_id] = entry
            self._window = entry
            barrier_qos = entry.qos
            if self._unclaimed is not None:
                self._claim(pattern, sink)
                self._claimer = (pattern, sink)
                # QoS 1: queued behind the whole backlog, which so reaches us before it.
                barrier_qos = 1
            try:
                await self._subscribe_native(native, entry.qos, entry.sub_id)
                await self._barrier(barrier_qos)
            except BaseException:
                entry.sinks.remove(sink)
                if created:
                    self._entries.pop(native, None)
                self._by_id.pop(entry.sub_id, None)
                entry.sub_id = old_id
                raise
            finally:
                entry.fresh = None
                self._window = None
                self._claimer = None
            if old_id:
                self._by_id.pop(old_id, None)
        return _Handle(self, entry, sink)

    async def _remove(self, entry: _Entry, sink: MessageSink) -> None:
        async with self._sub_lock:
            if sink in entry.sinks:
                entry.sinks.remove(sink)
            if entry.sinks or self._entries.get(entry.native) is not entry:
                return
            del self._entries[entry.native]
            self._by_id.pop(entry.sub_id, None)
            client = self._client
            if client is not None and self._connected:
                try:
                    async with asyncio.timeout(5.0):
                        await client.unsubscribe(entry.native)
                except (aiomqtt.MqttError, TimeoutError) as exc:
                    log.debug("unsubscribe %r: %r", entry.native, exc)

    async def _resubscribe_all(self) -> None:
        for entry in list(self._entries.values()):
            await self._subscribe_native(entry.native, entry.qos, entry.sub_id)
