"""One connection's packet path beside paho: PUBLISH out, acknowledgements both ways.

`_Wire` reads the socket in large chunks, settles acks of our publishes (`InflightWindow`),
hands QoS 0/1 PUBLISH packets to the `Router` and everything else to paho whole; `_Ack`
sends the PUBACK of a received message once every local subscription handled it.
"""

from __future__ import annotations

import socket
import time
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

import aiomqtt
import paho.mqtt.client as paho_mqtt

from ._packets import (
    _PUBACK,
    _PUBCOMP,
    _PUBLISH,
    _PUBREC,
    _Malformed,
    _opaque,
    _parse_publish,
    _remaining_length,
)

if TYPE_CHECKING:
    from ._inflight import InflightWindow
    from ._routing import Router

__all__ = ["_Ack", "_Wire"]

_READ_SIZE = 64 * 1024  # bytes asked of the socket per read (below malloc's mmap threshold)
_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)  # Linux only
_PUBLISH_QOS1, _PUBLISH_QOS2, _PUBACK_BYTE = 0x32, 0x34, 0x40  # first byte & 0xF6


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
        "quick",
        "quickack",
        "raw",
        "recv",
        "router",
        "sock",
        "stamp",
        "v5",
        "watching",
        "window",
        "wrote",
    )

    def __init__(
        self,
        router: Router,
        window: InflightWindow,
        client: aiomqtt.Client,
        v5: bool,
        quickack: bool = True,
    ) -> None:
        self.router = router
        self.window = window
        self.v5 = v5
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
        # Re-arms TCP_QUICKACK after a read (see `_ack_now`); None: off, or not Linux.
        self.quick = quickack and _QUICKACK is not None
        self.quickack: Callable[[], None] | None = None
        self.wrote = True  # something was sent since the last re-arm
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
        if self.quick and _QUICKACK is not None:
            tcp = sock._socket if isinstance(sock, paho_mqtt._WebsocketWrapper) else sock
            self.quickack = partial(tcp.setsockopt, socket.IPPROTO_TCP, _QUICKACK, 1)

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
        self.wrote = True
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
                if self.wrote:
                    self._ack_now(data[0])
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

    def _ack_now(self, first: int) -> None:
        """Acknowledge what was just read at once, and leave delayed-ACK mode (Linux).

        Having sent data puts Linux's TCP in "ping-pong" mode, where the ACK of what arrives
        next is held up to 40 ms for a reply to carry it; a broker with Nagle on (Mosquitto's
        default) holds its next small packet until that ACK: the first message after a
        SUBACK, the PUBLISH that follows a PUBACK. TCP_QUICKACK sends the pending ACK and
        leaves that mode, but not for good (the next send enters it again), so it is re-armed
        after the first read that follows a send: one ``setsockopt`` per read only while we
        also write, none for a subscriber that only reads. Not when a packet of ours is sure
        to follow and carry the ACK: after a QoS 1/2 message (its acknowledgement, once the
        handler ran: within the 40 ms the ACK may wait anyway), or after a PUBACK on a
        connection nothing else will arrive on (no subscriptions, no barrier awaited). Each
        re-arm sends a bare ACK, which costs the process ~3 µs on loopback.
        """
        self.wrote = False
        quickack = self.quickack
        if quickack is None:
            return
        kind = first & 0xF6  # packet type and QoS bits of the first packet read
        if kind in (_PUBLISH_QOS1, _PUBLISH_QOS2):
            return  # a message to acknowledge: our PUBACK / PUBREC carries the ACK
        if kind == _PUBACK_BYTE and not self.router.entries and not len(self.router.barriers):
            return  # a publisher's PUBACK: nothing more is coming unasked, the next send acks
        quickack()  # a failure is the connection's: `readable` reports it

    def resume(self) -> None:
        """Handle the packets read before reading paused (flow control), then read on."""
        if not self.alive or self.router.paused:
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
        router = self.router
        window = self.window
        inflight = window.sent
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
                if sent is not None and window.acked(
                    self, mid, sent, kind, data[start + 2] if length > 2 else 0
                ):
                    continue
            elif kind == _PUBLISH and not command & 0x04:  # QoS 0 or 1 (paho keeps QoS 2)
                parsed = _parse_publish(command, data, start, stop, self.v5)
                if parsed is not None:
                    router.received(self, *parsed)
                    if router.full and self._paused_now():
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
            if router.full and self._paused_now():
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
        router = self.router
        router.pause_reading(self)
        return router.paused


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
