"""Persistent sessions: the backlog that arrives before ``subscribe()`` could claim it.

A restarted process resuming its session (``clean_start=false``) receives the broker's queue
right after CONNACK. Messages no local route wants wait here (bounded, ``unclaimed_buffer``);
``subscribe()`` claims the ones its filter matches, in arrival order, before its barrier.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque

from cascade_bus.spi import DropReason, Message, MessageSink, StatsRecorder, topic_matches

from ._wire import _Ack

__all__ = ["Unclaimed"]

log = logging.getLogger("cascade_bus.mqtt")


class Unclaimed:
    """Received messages no local subscription wanted yet, with their ack while unacknowledged.

    Args:
        limit: Messages held (``unclaimed_buffer``); beyond it they are counted as overflow.
        stats: The transport's counters.
        full: The router's list of subscriptions that reported "full" (reading pauses).
    """

    __slots__ = ("claimer", "full", "held", "held_more", "hold_unacked", "limit", "stats", "warned")

    def __init__(self, limit: int, stats: StatsRecorder, full: list[MessageSink]) -> None:
        self.limit = limit
        self.stats = stats
        self.full = full
        self.held: deque[tuple[Message, _Ack | None]] = deque()
        # True until the first subscribe() or flush(): held messages stay unacknowledged.
        self.hold_unacked = True
        # The subscription whose barrier is pending: it takes the backlog that matches it.
        self.claimer: tuple[str, MessageSink] | None = None
        self.warned = False
        self.held_more = asyncio.Event()

    def __len__(self) -> int:
        return len(self.held)

    async def wait(self, count: int) -> None:
        """Wait until at least ``count`` messages are held (unbounded: use a timeout)."""
        while len(self.held) < count:
            self.held_more.clear()
            await self.held_more.wait()

    def take(self, message: Message, ack: _Ack | None) -> None:
        """Hand an unrouted message to the subscription being made, or hold it (bounded).

        Held messages stay unacknowledged until the first ``subscribe()`` or ``flush()``, so a
        crash before that loses nothing (the broker resends them); with MQTT 5 the Receive
        Maximum we announce bounds how many the broker sends that way. From then on they are
        acknowledged on arrival: an unacknowledged one holds a slot of the broker's in-flight
        window, and a full window would keep the QoS 1 barrier of ``subscribe()`` out for ever.
        """
        claimer = self.claimer
        if claimer is not None and topic_matches(claimer[0], message.topic):
            # Its barrier is pending: everything the broker queued before the SUBSCRIBE
            # arrives before the barrier, so this is the tail of that subscription's backlog.
            if ack is not None:
                ack.expect(1)
            if not claimer[1].deliver(message):
                self.full.append(claimer[1])
            return
        held = self.held
        if len(held) >= self.limit:
            self.stats.drop(DropReason.OVERFLOW)
            if not self.warned:
                self.warned = True
                log.warning(
                    "%d messages of the resumed session wait for a subscribe() that wants "
                    "them (unclaimed_buffer); further ones are counted in "
                    "stats().dropped['overflow']",
                    len(held),
                )
            if ack is not None:
                ack.expect(0)
            return
        if ack is not None and not self.hold_unacked:
            ack.expect(0)
            message.ack = None
            ack = None
        held.append((message, ack))
        self.held_more.set()

    def release(self) -> None:
        """Acknowledge every held message now (they stay held) and hold new ones acknowledged."""
        self.hold_unacked = False
        held = self.held
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

    def claim(self, pattern: str, sink: MessageSink) -> None:
        """Give a new subscription the held messages its filter matches, in arrival order.

        Each goes to this subscription only, once (the broker's copy was meant for the
        previous process's subscription, which this one replaces); one still unacknowledged
        is acknowledged after its handler ran, as usual. The rest is acknowledged now (see
        `take`) and stays held for later subscriptions; whatever is never claimed is
        counted as ``no_subscriber`` when the transport closes (`drop_all`). Matching is by
        topic: a message is claimed by the first ``subscribe()`` whose filter matches it,
        whatever its queue group.
        """
        held = self.held
        self.hold_unacked = False
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
            self.full.append(sink)  # reading pauses until the handler made room

    def drop_all(self) -> None:
        """The transport closes: whatever was never claimed is counted once, here."""
        if self.held:
            self.stats.drop(DropReason.NO_SUBSCRIBER, len(self.held))
            self.held.clear()
