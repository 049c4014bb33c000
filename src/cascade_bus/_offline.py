"""Adapter kit: outgoing records and the offline buffer, one publish-while-down policy for all.

While a transport is disconnected every publish goes to an `OfflineBuffer`: the publisher returns
once the message is held; beyond ``offline_buffer`` messages a QoS 0 one is dropped and counted
(``offline_overflow``) and a QoS >= 1 one raises `PublishError`. After the reconnect the
transport sends what is held, in order, what the broker never acknowledged first.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterable, Iterator

from ._errors import ConnectionLost, PublishError
from ._stats import DropReason, StatsRecorder

__all__ = ["OfflineBuffer", "Outgoing"]


class Outgoing:
    """One publish on its way to the broker; its waiter (if any) is settled exactly once.

    Adapters subclass it to add what their wire needs (``__slots__`` of their own).

    Attributes:
        topic: The portable topic.
        data: The body.
        qos: The QoS asked for.
        retain: Whether the broker should retain it.
        future: Settled when the broker confirmed it (or it failed); None when nobody waits.
    """

    __slots__ = ("data", "future", "qos", "retain", "topic")

    def __init__(
        self,
        topic: str,
        data: bytes,
        qos: int,
        retain: bool,
        future: asyncio.Future[None] | None = None,
    ) -> None:
        self.topic = topic
        self.data = data
        self.qos = qos
        self.retain = retain
        self.future = future

    def settle(self, error: BaseException | None = None) -> None:
        """Tell the waiter the outcome; later calls do nothing."""
        fut = self.future
        if fut is not None:
            self.future = None
            if not fut.done():
                if error is None:
                    fut.set_result(None)
                else:
                    fut.set_exception(error)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.topic!r} qos={self.qos} {len(self.data)} bytes>"


class OfflineBuffer:
    """Publishes held while disconnected: bounded, counted, resent in order after a reconnect.

    Args:
        limit: Messages it holds (the ``offline_buffer`` option); 0 holds none.
        stats: The transport's counters (drops are counted there).
        endpoint: Where the transport connects (masked), for error messages.
    """

    __slots__ = ("_empty", "_held", "_stats", "endpoint", "limit")

    def __init__(self, limit: int, stats: StatsRecorder, endpoint: str) -> None:
        self.limit = limit
        self.endpoint = endpoint
        self._stats = stats
        self._held: deque[Outgoing] = deque()
        self._empty = asyncio.Event()
        self._empty.set()

    def __len__(self) -> int:
        return len(self._held)

    def __bool__(self) -> bool:
        return bool(self._held)

    def __iter__(self) -> Iterator[Outgoing]:
        return iter(self._held)

    def hold(self, out: Outgoing, *, reconnecting: bool = True) -> None:
        """Keep ``out`` for the next connection; its publisher stops waiting (it is accepted).

        Raises:
            ConnectionLost: ``reconnecting`` is False (no next connection will come).
            PublishError: the buffer is full and ``out`` is QoS >= 1 (a QoS 0 one is dropped
                and counted as ``offline_overflow`` instead).
        """
        if not reconnecting:
            raise ConnectionLost(f"not connected to {self.endpoint} and reconnect is off")
        if len(self._held) >= self.limit:
            if out.qos == 0:
                self._stats.drop(DropReason.OFFLINE_OVERFLOW)
                return
            raise PublishError(
                f"offline buffer full ({self.limit} messages) while disconnected from "
                f"{self.endpoint}; QoS {out.qos} message for {out.topic!r} not accepted",
                topic=out.topic,
                reason=DropReason.OFFLINE_OVERFLOW,
            )
        self._held.append(out)
        self._empty.clear()

    def requeue(self, outs: Iterable[Outgoing]) -> None:
        """Put unacknowledged messages back in front, in their order, beyond the limit.

        They were accepted before the connection went: their publishers stop waiting now
        (`Outgoing.settle`), and the messages are resent first after the reconnect.
        """
        pending = list(outs)
        if not pending:
            return
        self._held.extendleft(reversed(pending))
        self._empty.clear()
        for out in pending:
            out.settle()

    def popleft(self) -> Outgoing:
        """Take the oldest held message (to send it now)."""
        out = self._held.popleft()
        if not self._held:
            self._empty.set()
        return out

    def take_all(self) -> list[Outgoing]:
        """Take every held message, oldest first."""
        outs = list(self._held)
        self._held.clear()
        self._empty.set()
        return outs

    def fail_all(self, error: BaseException) -> int:
        """Give up on every held message: settle each with ``error``, count them as lost.

        Returns how many were dropped (counted as ``disconnected``).
        """
        outs = self.take_all()
        for out in outs:
            out.settle(error)
        if outs:
            self._stats.drop(DropReason.DISCONNECTED, len(outs))
        return len(outs)

    async def wait_empty(self) -> None:
        """Return once nothing is held (bound it with ``asyncio.timeout``)."""
        await self._empty.wait()
