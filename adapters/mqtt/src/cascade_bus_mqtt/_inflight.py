"""The in-flight window: our QoS>=1 publishes by packet identifier, their acks, and the queue.

At most ``max_inflight`` publishes are unacknowledged on a connection; the rest wait in order
and go out as acknowledgements free the window. Control records (barriers, presence) belong
to one connection: never buffered or resent.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING

from cascade_bus.spi import DropReason, Outgoing, StatsRecorder

from ._errors import publish_refused
from ._packets import (
    _NO_MATCHING_SUBSCRIBERS,
    _PUBACK,
    _PUBREC,
    _PUBREL,
    TopicHeads,
    _publish_packet,
)

if TYPE_CHECKING:
    from ._wire import _Wire

__all__ = ["InflightWindow", "MqttOutgoing"]


class MqttOutgoing(Outgoing):
    """A publish the broker has not acknowledged yet (or that waits for a connection).

    ``props`` is the encoded MQTT 5 property block (a single zero byte for none; empty with
    3.1.1). ``control``: the adapter's own (barrier, presence), tied to one connection: never
    buffered or resent, its future cancelled when that connection goes.
    """

    __slots__ = ("control", "props")

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
        # Not Outgoing.__init__: one call less per publish (the hot path).
        self.topic = topic
        self.data = data
        self.qos = qos
        self.retain = retain
        self.future = future
        self.props = props
        self.control = control


class InflightWindow:
    """One connection's unacknowledged QoS>=1 publishes and those waiting for room.

    Args:
        limit: ``max_inflight`` (0: unlimited).
        heads: The transport's topic cache.
        stats: The transport's counters (``no_subscriber`` acks are counted there).
    """

    __slots__ = ("heads", "idle", "limit", "sent", "stats", "waiting")

    def __init__(self, limit: int, heads: TopicHeads, stats: StatsRecorder) -> None:
        self.limit = limit
        self.heads = heads
        self.stats = stats
        # Sent publishes by packet identifier (in sending order), and those waiting for room.
        self.sent: dict[int, MqttOutgoing] = {}
        self.waiting: deque[MqttOutgoing] = deque()
        self.idle = asyncio.Event()  # nothing sent unacknowledged, nothing waiting
        self.idle.set()

    def send(self, wire: _Wire, out: MqttOutgoing, now: bool) -> None:
        """Give a QoS>=1 publish a packet identifier and send it, or queue it for the window.

        ``now``: write it at once when nothing is queued before it (see `_Wire.write`).
        """
        self.idle.clear()
        sent = self.sent
        limit = self.limit
        if self.waiting or (limit > 0 and len(sent) >= limit):
            self.waiting.append(out)
            return
        paho = wire.paho
        mid = paho._mid_generate()
        while mid in sent:  # only after 65,535 publishes with one still unacknowledged
            mid = paho._mid_generate()
        sent[mid] = out
        head = self.heads.get(out.topic) or self.heads.head(out.topic)
        wire.write(_publish_packet(head, out.data, out.qos, out.retain, out.props, mid), now)

    def acked(self, wire: _Wire, mid: int, out: MqttOutgoing, kind: int, reason: int) -> bool:
        """Handle the PUBACK, PUBREC or PUBCOMP of our publish ``mid``; False: not for it."""
        if kind == _PUBACK:
            if out.qos != 1:
                return False
        elif out.qos != 2:
            return False
        elif kind == _PUBREC and reason < 0x80:
            wire.write(bytes((_PUBREL | 2, 2, mid >> 8, mid & 0xFF)), False)
            return True  # done at PUBCOMP
        sent = self.sent
        del sent[mid]
        if out.control:
            fut = out.future
            if fut is not None and not fut.done():
                fut.set_result(None)
        elif reason >= 0x80:
            out.settle(publish_refused(out.topic, kind, reason))
        else:
            if reason == _NO_MATCHING_SUBSCRIBERS and not out.retain:
                # Accepted, but the broker says nobody subscribes: count it (QoS >= 1).
                self.stats.drop(DropReason.NO_SUBSCRIBER)
            out.settle()
        if self.waiting:
            self._release(wire)
        elif not sent:
            self.idle.set()
        return True

    def _release(self, wire: _Wire) -> None:
        """Send what waited for room in the window, in order, as far as it fits."""
        waiting = self.waiting
        sent = self.sent
        limit = self.limit
        heads = self.heads
        paho = wire.paho
        while waiting and (limit <= 0 or len(sent) < limit):
            out = waiting.popleft()
            mid = paho._mid_generate()
            while mid in sent:
                mid = paho._mid_generate()
            sent[mid] = out
            head = heads.get(out.topic) or heads.head(out.topic)
            wire.write(_publish_packet(head, out.data, out.qos, out.retain, out.props, mid), False)

    def busy_for_users(self, barrier_topic: str) -> bool:
        """One of the user's publishes (or the presence) waits for its acknowledgement."""
        return bool(self.sent) and any(out.topic != barrier_topic for out in self.sent.values())

    def drop_control(self) -> None:
        """Forget the adapter's own publishes of the connection that ends (see `MqttOutgoing`)."""
        sent = self.sent
        for mid, out in list(sent.items()):
            if out.control:
                del sent[mid]
                if out.future is not None:
                    out.future.cancel()
        if any(out.control for out in self.waiting):
            for out in self.waiting:
                if out.control and out.future is not None:
                    out.future.cancel()
            self.waiting = deque(out for out in self.waiting if not out.control)
        if not sent and not self.waiting:
            self.idle.set()

    def take(self) -> list[MqttOutgoing]:
        """Take every publish the connection never acknowledged: sent ones, then waiting ones.

        Control records are dropped first (`drop_control`); the window is idle afterwards.
        """
        self.drop_control()
        pending = [*self.sent.values(), *self.waiting]
        self.sent.clear()
        self.waiting.clear()
        self.idle.set()
        return pending
