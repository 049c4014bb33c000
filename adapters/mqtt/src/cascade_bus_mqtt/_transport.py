"""The MQTT transport: aiomqtt for the connection, its paho client on the hot path.

aiomqtt integrates paho with asyncio (socket readers/writers, keepalive) and we use it for that.
Its per-message path (an asyncio.Queue, a task and ``wait_for`` per message) is what limits it,
so publishes bypass it with one future per QoS>=1 message, and received messages go straight
from paho's ``on_message`` into the bus's subscription queues. The packets of the hot path
(PUBLISH out, PUBACK/PUBREC/PUBCOMP in, PUBACK out) are encoded and parsed here (`_Wire`);
paho keeps the rest of the protocol (CONNECT, SUBSCRIBE, incoming PUBLISH, keepalive).

Reliability, which aiomqtt 2.x leaves to the user:

- A supervisor task notices a lost connection, reconnects with jittered exponential backoff
  (a fresh client each time), resubscribes every filter and then resends what the broker never
  acknowledged plus everything published while down. The retained replay of the resubscribe
  is a resync (`MqttTransport._resubscribe_all`): each subscription gets what changed or
  appeared while it was away once, a clear for what was cleared, and nothing it already had.
  With MQTT 5 retained publishes carry a marker (`RETAIN_PROPERTY`), so values a subscription
  first heard live count too; MQTT 3.1.1 resyncs only what arrived as a retained replay.
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
import time
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
#: MQTT 5 user property (value ``"1"``) on every retained publish of a cascade-bus bus, clears
#: and the retained will included. The broker sends a subscriber that is already subscribed the
#: live copy with the RETAIN flag off (no Retain As Published), so without it a receiver could
#: not tell a retained value set while it listened from a plain message; with it the message
#: arrives as ``Message(retain=True)`` and its subscription tracks the topic for a resync. The
#: property is removed on receipt (never in an envelope's headers) and dropped from the headers
#: of a publish that is not retained. MQTT 3.1.1 has no user properties: there it is not sent.
RETAIN_PROPERTY = "cb-retain"
_MAX_PAYLOAD = 268_435_455  # MQTT's largest remaining length
_OUT_HIGH = 2048  # paho packets waiting for the socket before a QoS 0 publisher yields
_BARRIER_ID = 1
# Bound on the barrier that ends a reconnect's retained replay (see _resubscribe_all).
_RESYNC_TIMEOUT = 10.0
_COALESCE_BYTES = 64 * 1024  # at most this much of paho's queue goes into one send
_NO_MATCHING_SUBSCRIBERS = 0x10  # MQTT 5 PUBACK/PUBREC reason code (a success code)
_PUBLISH, _PUBACK, _PUBREC, _PUBREL, _PUBCOMP = 0x30, 0x40, 0x50, 0x60, 0x70
_READ_SIZE = 64 * 1024  # bytes asked of the socket per read (below malloc's mmap threshold)
_TOPIC_CACHE = 4096  # encoded topics kept (cleared when full)
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


def _marker_props(kind: int) -> Properties:
    """Properties (of packet type ``kind``) carrying just the `RETAIN_PROPERTY` marker."""
    props = Properties(kind)  # type: ignore[no-untyped-call]
    props.UserProperty = [(RETAIN_PROPERTY, "1")]
    return props


# The PUBLISH property block of a retained publish without headers (MQTT 5).
_RETAIN_PROPS: bytes = _marker_props(PacketTypes.PUBLISH).pack()  # type: ignore[no-untyped-call]


class _Outgoing:
    """A publish the broker has not acknowledged yet (or that waits for a connection).

    ``props`` is the encoded MQTT 5 property block (a single zero byte for none; empty with
    3.1.1). ``control``: the adapter's own (barrier, presence), tied to one connection: never
    buffered or resent, its future cancelled when that connection goes.
    """

    __slots__ = ("control", "data", "future", "props", "qos", "retain", "topic")

    def __init__(
        self,
        topic: str,
        data: bytes,
        qos: int,
        retain: bool,
        props: bytes,
        future: asyncio.Future[None] | None,
        control: bool = False,
    ) -> None:
        self.topic = topic
        self.data = data
        self.qos = qos
        self.retain = retain
        self.props = props
        self.future = future
        self.control = control

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


def _remaining(size: int) -> bytes:
    """MQTT's variable-length encoding of a packet's remaining length."""
    out = bytearray()
    while True:
        byte, size = size & 0x7F, size >> 7
        if size:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _publish_packet(
    head: bytes, data: bytes, qos: int, retain: bool, props: bytes, mid: int
) -> bytes:
    """A whole PUBLISH packet; ``head`` is the length-prefixed topic (see `_topic_head`)."""
    size = len(head) + len(props) + len(data)
    first = _PUBLISH | qos << 1 | retain
    if qos:
        size += 2
        fixed = bytes((first, size)) if size < 128 else bytes((first,)) + _remaining(size)
        return b"".join((fixed, head, mid.to_bytes(2, "big"), props, data))
    fixed = bytes((first, size)) if size < 128 else bytes((first,)) + _remaining(size)
    return b"".join((fixed, head, props, data))


def _opaque(packet: bytes | memoryview, pos: int = 0) -> dict[str, Any]:
    """An entry for paho's write queue that paho writes and otherwise ignores (command 0).

    paho acts after writing two kinds of packet only (a QoS 0 PUBLISH: its ``on_publish``; a
    DISCONNECT); ours must be neither.
    """
    return {
        "command": 0,
        "mid": 0,
        "qos": 0,
        "pos": pos,
        "to_process": len(packet) - pos,
        "packet": packet,
        "info": None,
    }


class _Malformed(Exception):
    """The broker sent bytes that are not an MQTT packet."""


def _remaining_length(data: bytes | bytearray, at: int, end: int) -> tuple[int, int]:
    """Decode a remaining length at ``at``: (length, where the packet body starts).

    The start is -1 when the length is not all there yet.
    """
    length = 0
    shift = 0
    for index in range(at, min(at + 4, end)):
        byte = data[index]
        length |= (byte & 0x7F) << shift
        if byte < 0x80:
            return length, index + 1
        shift += 7
    if end - at >= 4:
        raise _Malformed("remaining length longer than 4 bytes")
    return 0, -1


_Received = tuple[str, bytes, int, int, bool, bool, "dict[str, str] | None", "list[int] | None"]


def _parse_publish(
    command: int, data: bytes | bytearray, start: int, stop: int, v5: bool
) -> _Received | None:
    """Decode a QoS 0 or 1 PUBLISH: topic, payload, qos, mid, dup, retain, headers, ids.

    None for anything unusual (a malformed or non-UTF-8 topic, an MQTT 5 property we do not
    read): paho then decodes it as before. Of the properties, the user properties (headers)
    and subscription identifiers are read; the ones we ignore are skipped.
    """
    qos = (command >> 1) & 3
    at = start + 2
    if at > stop:
        return None
    end = at + (data[start] << 8 | data[start + 1])
    if end > stop or end == at:
        return None
    try:
        topic = data[at:end].decode()
    except UnicodeDecodeError:
        return None
    mid = 0
    if qos:
        if end + 2 > stop:
            return None
        mid = data[end] << 8 | data[end + 1]
        end += 2
    headers: dict[str, str] | None = None
    ids: list[int] | None = None
    if v5:
        try:
            size, at = _remaining_length(data, end, stop)
        except _Malformed:
            return None
        end = at + size
        if at < 0 or end > stop:
            return None
        while at < end:
            ident = data[at]
            at += 1
            if ident == 0x0B:  # subscription identifier
                try:
                    value, at = _remaining_length(data, at, end)
                except _Malformed:
                    return None
                if at < 0:
                    return None
                if ids is None:
                    ids = [value]
                else:
                    ids.append(value)
            elif ident == 0x26:  # user property: two UTF-8 strings
                if at + 2 > end:
                    return None
                key_end = at + 2 + (data[at] << 8 | data[at + 1])
                if key_end + 2 > end:
                    return None
                value_end = key_end + 2 + (data[key_end] << 8 | data[key_end + 1])
                if value_end > end:
                    return None
                try:
                    key = data[at + 2 : key_end].decode()
                    value_text = data[key_end + 2 : value_end].decode()
                except UnicodeDecodeError:
                    return None
                if headers is None:
                    headers = {}
                headers[key] = value_text
                at = value_end
            elif ident == 0x01:  # payload format indicator
                at += 1
            elif ident == 0x02:  # message expiry interval
                at += 4
            elif ident in (0x03, 0x08, 0x09):  # content type, response topic, correlation
                if at + 2 > end:
                    return None
                at += 2 + (data[at] << 8 | data[at + 1])
            else:  # a topic alias, or anything else: paho's
                return None
        if at != end:
            return None
    return (
        topic,
        bytes(data[end:stop]),
        qos,
        mid,
        bool(command & 0x08),
        bool(command & 0x01),
        headers,
        ids,
    )


class _Wire:
    """One connection's packet path beside paho: PUBLISH out, its acknowledgements in.

    paho's generic path was most of a QoS 1 round trip: per publish a message object with a
    condition variable, locks and log calls, its bytes written only at the next turn of the
    loop; per packet read three ``recv`` calls, and a reason code and a property object per
    PUBACK. Here a PUBLISH is one ``join`` and, when nothing is queued before it, written at
    once; the socket is read in large chunks; acknowledgements of our publishes settle their
    futures directly, and every other packet goes to paho whole, as if paho had read it
    (``_in_packet``), so paho keeps CONNACK, SUBACK, incoming PUBLISH, PINGRESP, DISCONNECT and
    keepalive. Whatever we write goes through paho's queue when that holds anything, so bytes
    leave in the order of the calls.
    """

    __slots__ = (
        "armed",
        "buf",
        "client",
        "out",
        "paho",
        "pending",
        "raw",
        "recv",
        "sock",
        "stamp",
        "transport",
        "v5",
        "watching",
    )

    def __init__(self, transport: MqttTransport, client: aiomqtt.Client) -> None:
        self.transport = transport
        self.v5 = transport._v5
        self.client = client
        self.paho: paho_mqtt.Client = client._client
        self.out: deque[Any] = self.paho._out_packet
        self.sock: Any = None
        self.raw: socket.socket | None = None  # plain TCP: written at once when it can be
        self.recv: Callable[[int], bytes] = self.paho._sock_recv
        self.pending: Callable[[], int] | None = None
        # True until a packet was written at once; set again by each read or queued write, so
        # a burst of publishes in one turn of the loop costs one direct write and one more.
        self.armed = True
        self.buf: bytes | bytearray = b""  # the start of a packet not all read yet
        self.watching = False  # the event loop watches the socket for writing
        # When paho last read something, for its keepalive (paho 2.1 calls it _last_msg_in).
        paho = self.paho
        self.stamp = (
            "_last_bytes_received" if hasattr(paho, "_last_bytes_received") else "_last_msg_in"
        )

    def attach(self, sock: Any) -> None:
        """Read and write ``sock``, paho's socket just opened."""
        self.sock = sock
        if type(sock) is socket.socket:
            self.raw = sock
            self.recv = sock.recv
        else:  # TLS or paho's websocket wrapper: paho maps their errors (want-read, ...)
            self.pending = sock.pending

    @property
    def alive(self) -> bool:
        """The connection is still open (paho closes its socket when it ends)."""
        return self.sock is not None and self.paho._sock is self.sock

    def broken(self, exc: BaseException) -> None:
        """The socket failed: tell the supervisor (via aiomqtt's disconnected future)."""
        lost = self.client._disconnected
        if not lost.done():
            lost.set_exception(exc)

    def write(self, packet: bytes, now: bool) -> None:
        """Send ``packet`` after whatever is queued; ``now``: at once, if nothing is."""
        out = self.out
        raw = self.raw
        if now and self.armed and raw is not None and not out:
            self.armed = False
            try:
                sent = raw.send(packet)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self.broken(exc)
                return
            if sent == len(packet):
                return
            out.append(_opaque(packet, sent))
        else:
            out.append(_opaque(packet))
        self.paho._call_socket_register_write()

    def ack(self, mid: int, qos: int) -> None:
        """Queue the PUBACK (QoS 1) or PUBCOMP (QoS 2) of a received message.

        Only on the connection it came on: a message from an older connection cannot be
        acknowledged on a new one; the broker resends it (a counted duplicate) instead.
        """
        if self.alive:
            kind = _PUBACK if qos == 1 else _PUBCOMP
            self.out.append(_opaque(bytes((kind, 2, mid >> 8, mid & 0xFF))))
            self.paho._call_socket_register_write()

    def readable(self) -> None:
        """The event loop's reader: read what arrived and handle every whole packet."""
        paho = self.paho
        try:
            while True:
                try:
                    data = self.recv(_READ_SIZE)
                except BlockingIOError:
                    return
                except OSError:
                    paho._loop_rc_handle(paho_mqtt.MQTT_ERR_CONN_LOST)
                    return
                if not data:
                    paho._loop_rc_handle(paho_mqtt.MQTT_ERR_CONN_LOST)
                    return
                self.armed = True
                buf = self.buf
                if buf:
                    buf += data  # a bytearray: a large packet grows in place
                else:
                    self.buf = data
                if not self._drain():
                    return
                # SSL sockets may hold decoded bytes that select() cannot see.
                pending = self.pending
                if pending is None or not pending():
                    return
        except Exception as exc:  # the connection broke while reading
            self.broken(exc)

    def resume(self) -> None:
        """Handle the packets read before reading paused (flow control), then read on."""
        if not self.alive or self.transport._paused:
            return
        try:
            self._drain()
        except Exception as exc:
            self.broken(exc)

    def _drain(self) -> bool:
        """Handle each whole packet in the buffer; False when reading must stop here."""
        data = self.buf
        end = len(data)
        pos = 0
        transport = self.transport
        inflight = transport._inflight
        paho = self.paho
        paused = False
        while end - pos >= 2:
            length = data[pos + 1]
            start = pos + 2
            if length > 127:
                try:
                    length, start = _remaining_length(data, pos + 1, end)
                except _Malformed:
                    paho._loop_rc_handle(paho_mqtt.MQTT_ERR_PROTOCOL)
                    return False
                if start < 0:  # the rest of the header is still on its way
                    break
            stop = start + length
            if stop > end:
                break
            command = data[pos]
            kind = command & 0xF0
            pos = stop
            if kind in (_PUBACK, _PUBCOMP, _PUBREC) and length >= 2:
                mid = data[start] << 8 | data[start + 1]
                sent = inflight.get(mid)
                if sent is not None and transport._acked(
                    self, mid, sent, kind, data[start + 2] if length > 2 else 0
                ):
                    continue
            elif kind == _PUBLISH and not command & 0x04:  # QoS 0 or 1 (paho keeps QoS 2)
                parsed = _parse_publish(command, data, start, stop, self.v5)
                if parsed is not None:
                    transport._received(self, *parsed)
                    if transport._full and self._paused_now():
                        paused = True
                        break
                    continue
            elif not kind:
                paho._loop_rc_handle(paho_mqtt.MQTT_ERR_PROTOCOL)  # packet type 0 is reserved
                return False
            # Anything else is paho's: its state after reading a whole packet, so that its
            # _packet_read only handles it and resets.
            paho._in_packet = {
                "command": command,
                "have_remaining": 1,
                "remaining_count": [],
                "remaining_mult": 1,
                "remaining_length": length,
                "packet": bytearray(data[start:stop]),
                "to_process": 0,
                "pos": 0,
            }
            rc = paho._packet_read()
            if rc:
                paho._loop_rc_handle(rc)
                return False
            if paho._sock is not self.sock:  # it handled a DISCONNECT
                return False
            if transport._full and self._paused_now():
                paused = True
                break
        if pos >= end:
            self.buf = b""
        elif isinstance(data, bytearray):
            del data[:pos]
        else:
            self.buf = bytearray(memoryview(data)[pos:])
        setattr(paho, self.stamp, time.monotonic())  # for paho's keepalive
        return not paused

    def _paused_now(self) -> bool:
        """A subscription is full: pause reading if allowed; True when it paused."""
        transport = self.transport
        transport._pause_reading(self)
        return transport._paused


class _Ack:
    """Acknowledges one received QoS>=1 message once every local subscription handled it.

    With manual acks the PUBACK (PUBCOMP for QoS 2) leaves only after the handlers ran, so a
    crash before that makes the broker send the message again (at least once, end to end),
    and unacknowledged messages count against the broker's in-flight window (flow control).
    """

    __slots__ = ("mid", "pending", "qos", "wire")

    def __init__(self, wire: _Wire, mid: int, qos: int) -> None:
        self.wire = wire
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
        self.wire.ack(self.mid, self.qos)


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
        # Sent QoS>=1 publishes by packet identifier (in sending order), and those waiting for
        # room in the in-flight window (max_inflight), of the current connection.
        self._inflight: dict[int, _Outgoing] = {}
        self._waiting: deque[_Outgoing] = deque()
        self._offline: deque[_Outgoing] = deque()
        self._wire: _Wire | None = None
        self._heads: dict[str, bytes] = {}
        self._no_props = b"\x00" if self._v5 else b""
        self._idle = asyncio.Event()
        self._idle.set()
        self._written = asyncio.Event()
        # Subscriptions that reported "full" while reading: reading pauses until they have room.
        self._full: list[MessageSink] = []
        self._paused = False
        self._paused_wire: _Wire | None = None  # the connection whose reading is paused
        self._resume_task: asyncio.Task[None] | None = None
        self._lost_cause: BaseException | None = None
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
        # A retained will is marked like any retained publish (see RETAIN_PROPERTY).
        marker = _marker_props(PacketTypes.WILLMESSAGE) if self._v5 else None
        will = (
            aiomqtt.Will(
                o.will_topic,
                o.will_payload,
                o.will_qos,
                o.will_retain,
                marker if o.will_retain else None,
            )
            if o.will_topic
            else None
        )
        if o.presence_topic:
            will = aiomqtt.Will(o.presence_topic, self.presence_payload(False), 1, True, marker)
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
        self._paused_wire = None
        client = self._new_client()
        paho = client._client
        wire = _Wire(self, client)
        paho.user_data_set(wire)  # so on_message knows the connection (aiomqtt ignores it)
        paho.on_message = self._on_message
        paho.manual_ack_set(True)  # PUBACK after the handlers ran (see _Ack)
        loop = asyncio.get_running_loop()

        # aiomqtt registers the socket for writing through call_soon_threadsafe; when the
        # connection dies before that callback runs (a broker going down with data queued), it
        # registers a closed file descriptor (an asyncio error with a traceback), or one already
        # reused by the next connection. Register only while the socket is still paho's.
        def writable() -> None:
            wire.armed = True
            try:
                if len(paho._out_packet) > 1:
                    _coalesce(paho._out_packet)
                paho.loop_write()
            except Exception as exc:  # a broken pipe: the connection is gone
                wire.broken(exc)

        # paho asks for this once per burst (until it has written everything it queued). From
        # our own thread (publishes queued behind others, PUBACKs of received messages) the
        # packets are written at the next turn of the loop, which also gathers a burst into one
        # send; only if the socket cannot take them all does the loop watch it for writing. No
        # call_soon_threadsafe (a self-pipe write and wakeup) and no add/remove_writer
        # (two epoll_ctl) per publish, as aiomqtt does.
        loop_thread = threading.get_ident()

        def watch(sock: Any) -> None:
            wire.watching = True
            loop.add_writer(sock.fileno(), writable)

        def add(sock: Any) -> None:
            current = paho.socket()
            if current is not None and current is sock:
                watch(current)

        def write_soon(sock: Any) -> None:
            current = paho.socket()
            if current is None or current is not sock:
                return
            writable()
            if paho.want_write():  # the socket is full: wait until it drains
                watch(current)

        def register_write(_client: paho_mqtt.Client, userdata: Any, sock: Any) -> None:
            if threading.get_ident() == loop_thread:
                loop.call_soon(write_soon, sock)
            else:  # the CONNECT packet, queued by aiomqtt's connect in an executor thread
                loop.call_soon_threadsafe(add, sock)

        paho.on_socket_register_write = register_write

        # Own the socket reader too (aiomqtt's is replaced right after it registers it): the
        # wire reads (see _Wire), and a full subscription can pause reading: TCP then holds the
        # broker back (flow control). paho opens the socket before it queues CONNECT, so `own`
        # runs before CONNECT is written: the wire reads the connection from its first byte.
        on_socket_open = paho.on_socket_open

        def socket_open(_client: paho_mqtt.Client, userdata: Any, sock: Any) -> None:
            if on_socket_open is not None:
                on_socket_open(_client, userdata, sock)

            def own() -> None:
                current = paho.socket()
                if current is not None and current is sock:
                    loop.remove_reader(current.fileno())
                    wire.attach(current)
                    loop.add_reader(current.fileno(), wire.readable)

            loop.call_soon_threadsafe(own)

        paho.on_socket_open = socket_open
        # Learn when paho has written everything it queued (flush, QoS 0 flow control).
        unregister = paho.on_socket_unregister_write

        def written(client: paho_mqtt.Client, userdata: Any, sock: Any) -> None:
            if wire.watching and unregister is not None:  # aiomqtt's: remove the writer
                wire.watching = False
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
        self._wire = wire
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
        wire = self._wire
        if wire is None or not wire.alive:
            raise ConnectionLost(f"lost {self.url.endpoint()} while publishing to {topic!r}")
        self._topic_head(topic)  # validated before it can wait for the window
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        props = self._props(None, retain)
        self._send_qos(wire, _Outgoing(topic, data, 1, retain, props, fut, True), True)
        try:
            async with asyncio.timeout(10.0):
                await self._until_lost(fut, f"publishing to {topic!r}")
        except TimeoutError:
            raise PublishError(
                f"{self.url.endpoint()} did not acknowledge the message for {topic!r}", topic=topic
            ) from None

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
        client, self._client, self._paho, self._wire = self._client, None, None, None
        self._drop_control()
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

    def _drop_control(self) -> None:
        """Forget the adapter's own publishes of the connection that ends (see `_Outgoing`)."""
        for mid, out in list(self._inflight.items()):
            if out.control:
                del self._inflight[mid]
                if out.future is not None:
                    out.future.cancel()
        if any(out.control for out in self._waiting):
            for out in self._waiting:
                if out.control and out.future is not None:
                    out.future.cancel()
            self._waiting = deque(out for out in self._waiting if not out.control)

    def _requeue_inflight(self) -> None:
        """Put what the broker never acknowledged back in front of the offline buffer.

        In sending order: the unacknowledged ones, then those that waited for the window.
        """
        self._drop_control()
        if self._inflight or self._waiting:
            pending = [*self._inflight.values(), *self._waiting]
            self._inflight.clear()
            self._waiting.clear()
            self._offline.extendleft(reversed(pending))
            for out in pending:  # held in a buffer that survives the reconnect
                out.settle()
        self._idle.clear() if self._offline else self._idle.set()

    def _resend_offline(self) -> None:
        wire = self._wire
        assert wire is not None
        while self._offline:
            if not wire.alive:
                return  # lost again: the rest waits for the next connection
            out = self._offline.popleft()
            if out.qos:
                self._send_qos(wire, out, False)
            else:
                head = self._topic_head(out.topic)
                wire.write(_publish_packet(head, out.data, 0, out.retain, out.props, 0), False)
        self._check_idle()

    def _fail_waiting(self, error: BaseException) -> None:
        self._drop_control()
        for out in [*self._inflight.values(), *self._waiting, *self._offline]:
            out.settle(error)
        dropped = len(self._offline)
        if dropped:
            self.stats.drop(DropReason.DISCONNECTED, dropped)
        self._inflight.clear()
        self._waiting.clear()
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
            self._resume_now()
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
        if self._offline or self._inflight or self._waiting:
            self._fail_waiting(BusClosed("the MQTT transport was closed"))
        for fut in self._barriers.values():
            if not fut.done():
                fut.set_exception(BusClosed("the MQTT transport was closed"))

    # -- publishing ----------------------------------------------------------------------------

    def _props(self, headers: Mapping[str, str] | None, retain: bool) -> bytes:
        """The encoded PUBLISH property block: ``headers`` as MQTT 5 user properties.

        A retained publish (a clear too) also carries the `RETAIN_PROPERTY` marker; a marker
        among ``headers`` is never sent as given (only ``retain`` decides it).
        """
        if not self._v5:
            return b""
        if not headers:
            return _RETAIN_PROPS if retain else self._no_props
        pairs = [item for item in headers.items() if item[0] != RETAIN_PROPERTY]
        if retain:
            pairs.append((RETAIN_PROPERTY, "1"))
        if not pairs:
            return self._no_props
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.UserProperty = pairs
        packed: bytes = props.pack()  # type: ignore[no-untyped-call]
        return packed

    def _topic_head(self, topic: str) -> bytes:
        """``topic`` as a PUBLISH carries it (length-prefixed UTF-8), checked once and cached.

        Raises:
            ValueError: empty, a wildcard, or longer than MQTT allows.
        """
        head = self._heads.get(topic)
        if head is not None:
            return head
        raw = topic.encode()
        if not raw:
            raise ValueError("Invalid topic.")
        if b"+" in raw or b"#" in raw:
            raise ValueError("Publish topic cannot contain wildcards.")
        if len(raw) > 0xFFFF:
            raise ValueError("Publish topic is too long.")
        if len(self._heads) >= _TOPIC_CACHE:
            self._heads.clear()
        head = self._heads[topic] = len(raw).to_bytes(2, "big") + raw
        return head

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
        pending = self.publish_nowait(topic, data, qos, retain, headers)
        if pending is not None:
            await pending

    def publish_nowait(
        self,
        topic: str,
        data: bytes,
        qos: int,
        retain: bool,
        headers: Mapping[str, str] | None,
    ) -> Awaitable[None] | None:
        """`publish` without a coroutine (the bus's fast path).

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
            head = self._topic_head(topic)
        props = self._props(headers, retain) if headers or retain else self._no_props
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
                self._idle.clear()
                self._send_qos(wire, _Outgoing(topic, data, qos, retain, props, fut), True)
                if self._paused:  # its PUBACK must be read (a handler may be waiting)
                    self._resume_now()
                return fut
            wire.write(_publish_packet(head, data, 0, retain, props, 0), False)
            if len(wire.out) > _OUT_HIGH:
                return self._drain_socket(wire.paho)
            return None
        self._buffer(topic, data, qos, retain, props)
        return None

    def _send_qos(self, wire: _Wire, out: _Outgoing, now: bool) -> None:
        """Give a QoS>=1 publish a packet identifier and send it, or queue it for the window.

        ``now``: write it at once when nothing is queued before it (see `_Wire.write`).
        """
        inflight = self._inflight
        limit = self._opts.max_inflight
        if self._waiting or (limit > 0 and len(inflight) >= limit):
            self._waiting.append(out)
            return
        paho = wire.paho
        mid = paho._mid_generate()
        while mid in inflight:  # only after 65,535 publishes with one still unacknowledged
            mid = paho._mid_generate()
        inflight[mid] = out
        head = self._heads.get(out.topic) or self._topic_head(out.topic)
        wire.write(_publish_packet(head, out.data, out.qos, out.retain, out.props, mid), now)

    def _acked(self, wire: _Wire, mid: int, out: _Outgoing, kind: int, reason: int) -> bool:
        """Handle the PUBACK, PUBREC or PUBCOMP of our publish ``mid``; False: not for it."""
        if kind == _PUBACK:
            if out.qos != 1:
                return False
        elif out.qos != 2:
            return False
        elif kind == _PUBREC and reason < 0x80:
            wire.write(bytes((_PUBREL | 2, 2, mid >> 8, mid & 0xFF)), False)
            return True  # done at PUBCOMP
        inflight = self._inflight
        del inflight[mid]
        if out.control:
            fut = out.future
            if fut is not None and not fut.done():
                fut.set_result(None)
        elif reason >= 0x80:
            try:
                code = str(ReasonCode(kind >> 4, identifier=reason))  # PUBACK 4, PUBREC 5, ...
            except KeyError:  # not a code MQTT defines for this packet
                code = f"reason code 0x{reason:02x}"
            out.settle(
                PublishError(
                    f"broker refused the message for {out.topic!r}: {code}", topic=out.topic
                )
            )
        else:
            if reason == _NO_MATCHING_SUBSCRIBERS and not out.retain:
                # Accepted, but the broker says nobody subscribes: count it (QoS >= 1).
                self.stats.drop(DropReason.NO_SUBSCRIBER)
            out.settle()
        if self._waiting:
            self._release(wire)
        elif not inflight:
            self._check_idle()
        return True

    def _release(self, wire: _Wire) -> None:
        """Send what waited for room in the in-flight window, in order, as far as it fits."""
        waiting = self._waiting
        inflight = self._inflight
        limit = self._opts.max_inflight
        paho = wire.paho
        while waiting and (limit <= 0 or len(inflight) < limit):
            out = waiting.popleft()
            mid = paho._mid_generate()
            while mid in inflight:
                mid = paho._mid_generate()
            inflight[mid] = out
            head = self._heads.get(out.topic) or self._topic_head(out.topic)
            wire.write(_publish_packet(head, out.data, out.qos, out.retain, out.props, mid), False)

    def _buffer(self, topic: str, data: bytes, qos: int, retain: bool, props: bytes) -> None:
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

    def _check_idle(self) -> None:
        if not self._inflight and not self._waiting and not self._offline:
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
        self, client: paho_mqtt.Client, wire: _Wire, msg: paho_mqtt.MQTTMessage
    ) -> None:
        """A PUBLISH paho decoded (QoS 2, or one `_parse_publish` leaves to paho)."""
        headers: dict[str, str] | None = None
        ids: list[int] | None = None
        if self._v5:
            props = msg.properties
            if props is not None:
                user = getattr(props, "UserProperty", None)
                if user:
                    headers = dict(user)
                ids = getattr(props, "SubscriptionIdentifier", None)
        self._received(
            wire,
            msg.topic,
            bytes(msg.payload),
            msg.qos,
            msg.mid,
            bool(msg.dup),
            bool(msg.retain),
            headers,
            ids,
        )

    def _received(
        self,
        wire: _Wire,
        topic: str,
        payload: bytes,
        qos: int,
        mid: int,
        dup: bool,
        retained: bool,
        headers: dict[str, str] | None,
        ids: list[int] | None,
    ) -> None:
        """Route one received message to the subscriptions it is for (acked after them)."""
        if topic.startswith(RESERVED_PREFIX):
            if qos:
                wire.ack(mid, qos)
            if topic == self._barrier_topic:
                fut = self._barriers.pop(payload, None)
                if fut is not None and not fut.done():
                    fut.set_result(None)
            return
        if dup:
            self.stats.duplicates += 1  # a redelivery: the broker never saw our PUBACK
        ack = _Ack(wire, mid, qos) if qos else None
        retain = False
        if headers is not None and RETAIN_PROPERTY in headers:
            # A cascade-bus publisher's retained publish (MQTT 5): a live copy of it (RETAIN
            # flag off) is Message.retain; a replay is retained anyway. Never a header.
            del headers[RETAIN_PROPERTY]
            retain = not retained
            if not headers:
                headers = None
        message = Message(
            topic, payload, headers, retained=retained, retain=retain, qos=qos, ack=ack
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

    def _pause_reading(self, wire: _Wire) -> None:
        """Stop reading from the broker until every full subscription has room again.

        Not while one of our QoS>=1 publishes waits for its acknowledgement: that ack comes on
        this socket, and the publisher may be the very handler the full subscription waits on.
        A QoS 1 barrier does not count: no handler waits on its acknowledgement, and one in
        flight while a resync's QoS 0 replay arrives would otherwise turn flow control off for
        the whole replay (overflow instead of waiting for the handler). The presence publish
        does (its wait for the PUBACK is bounded: a paused socket must not fail a connect).
        """
        inflight = self._inflight
        barrier = self._barrier_topic
        if (
            not wire.alive
            or self._paused
            or (inflight and any(out.topic != barrier for out in inflight.values()))
        ):
            self._full.clear()
            return
        loop = asyncio.get_running_loop()
        loop.remove_reader(wire.sock.fileno())
        self._paused = True
        self._paused_wire = wire
        full, self._full = self._full, []
        self._resume_task = loop.create_task(
            self._resume_reading(wire, full), name="cascade_bus.mqtt.resume"
        )

    def _resume_now(self) -> None:
        """Read again at once (one of our publishes waits for its acknowledgement)."""
        task = self._resume_task
        if task is not None and not task.done():
            task.cancel()  # one that has not started yet never runs its finally
        if self._paused_wire is not None:
            self._unpause(self._paused_wire)

    async def _resume_reading(self, wire: _Wire, full: list[MessageSink]) -> None:
        try:
            for sink in full:
                await sink.ready()  # bounded by the bus's flow_timeout
        finally:
            self._unpause(wire)

    def _unpause(self, wire: _Wire) -> None:
        """Read ``wire`` again, unless reading is not paused on it (a newer connection's)."""
        if not self._paused or wire is not self._paused_wire:
            return
        self._paused = False
        self._paused_wire = None
        if wire.alive:
            loop = asyncio.get_running_loop()
            loop.add_reader(wire.sock.fileno(), wire.readable)
            if wire.buf:  # packets read before the pause come first
                loop.call_soon(wire.resume)

    def _deliver(self, entry: _Entry, message: Message, retained: bool) -> int:
        """Hand a message to an entry's sinks; return how many took it (each will ack once).

        A retained replay goes to the sink being subscribed (``entry.fresh``) alone, or, in a
        reconnect's resync (no ``fresh`` then), to every sink of the entry.
        """
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
        wire = self._wire
        if wire is None or not wire.alive:
            raise ConnectionLost(f"lost {self.url.endpoint()} before a barrier")
        token = str(next(self._barrier_ids)).encode()
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._barriers[token] = fut
        try:
            topic = self._barrier_topic
            if qos:  # its PUBACK counts in the in-flight window like any other
                out = _Outgoing(topic, token, 1, False, self._no_props, None, True)
                self._send_qos(wire, out, True)
            else:
                head = self._topic_head(topic)
                wire.write(_publish_packet(head, token, 0, False, self._no_props, 0), False)
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
        """Resubscribe every filter after a reconnect and resync the retained state.

        Every sink of a non-queue entry hears `resync_begin` before the first SUBSCRIBE (with
        MQTT 3.1.1 a replay reaches every entry whose filter matches, so all of them must be
        resyncing by then), receives the broker's retained replay as usual (``entry.fresh`` is
        None: every sink of the entry gets it, see `_deliver`), and hears `resync_end` once a
        QoS 1 barrier published after the last SUBACK came back. The SUBACK alone is not
        enough (Mosquitto 2.0 writes it *before* the replay), but the broker queues the replay
        when it handles the SUBSCRIBE, so the barrier is queued behind all of it (QoS 1: also
        behind QoS 1 messages waiting for the in-flight window, as a resumed session's
        backlog). The sinks drop replays of values they already have and report the topics
        cleared meanwhile.

        Lost again before the barrier returned: this raises, the next attempt begins again,
        and `resync_end` is never called for an incomplete replay. A barrier that does not
        come back within ``_RESYNC_TIMEOUT`` (handlers holding the broker's in-flight window
        with unacknowledged messages, a huge backlog) holds the reconnect up no longer: the
        replay goes on, deduplicated (the sinks stay in their resync until the next one), but
        no clears are reported for this outage.
        """
        entries = list(self._entries.values())
        resync = [(entry, list(entry.sinks)) for entry in entries if entry.queue is None]
        for _entry, sinks in resync:
            for sink in sinks:
                sink.resync_begin()
        for entry in entries:
            await self._subscribe_native(entry.native, entry.qos, entry.sub_id)
        if not any(sinks for _entry, sinks in resync):
            return
        try:
            async with asyncio.timeout(_RESYNC_TIMEOUT):
                await self._barrier(1)
        except TimeoutError:
            log.warning(
                "%s did not finish the retained replay within %.0fs of resubscribing; "
                "topics cleared during the outage are not reported this time",
                self.url.endpoint(),
                _RESYNC_TIMEOUT,
            )
            return
        for entry, sinks in resync:
            if self._entries.get(entry.native) is not entry:
                continue  # unsubscribed meanwhile: its sinks are closed
            for sink in sinks:
                if sink in entry.sinks:
                    sink.resync_end()
