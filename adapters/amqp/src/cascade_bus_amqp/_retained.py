"""Retained messages emulated on a RabbitMQ stream: a log of retained publishes, plus snapshots.

RabbitMQ keeps no last value per routing key, so each retained publish is also appended to one
durable stream queue (``<exchange>.retained``), with its topic in a header; an empty body is a
clear. A new subscription reads the log up to a barrier it appended itself (every retained
publish confirmed before the barrier is in the log before it) and keeps the last value per
topic. So that a replay does not read the whole history, a replay that read more than
`COMPACT_AFTER` entries stores a snapshot (the state up to its barrier's offset) in
``<exchange>.retained.head``, a classic queue holding one message; the next replay starts from
the newest snapshot and reads the log from the offset after it. See docs/transports/amqp.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable
from typing import Any

import aiormq
import msgspec
from aiormq.abc import DeliveredMessage
from pamqp import commands as spec

from cascade_bus.spi import TaskSet

from ._wire import Wire, to_properties

__all__ = [
    "BARRIER",
    "COMPACT_AFTER",
    "RETAIN_ID",
    "TOPIC",
    "Replay",
    "RetainedLog",
    "Snapshot",
    "declare_log",
]

#: Header naming the portable topic of a log entry.
TOPIC = "x-cascade-topic"
#: Header with the id of one retained publish (in the log and on the live copy).
RETAIN_ID = "x-cascade-retain"
#: Header marking a replay barrier (its value: the replay's id).
BARRIER = "x-cascade-barrier"
#: A replay that read more log entries than this stores a snapshot.
COMPACT_AFTER = 1000

_PREFETCH = 2000


class Snapshot(msgspec.Struct, array_like=True):
    """The retained state up to (and including) log offset ``upto``."""

    upto: int
    values: dict[str, tuple[bytes, dict[str, str]]]
    ids: list[str]


_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(Snapshot).decode


def head_name(log_name: str) -> str:
    """The queue holding the newest snapshot of a log."""
    return f"{log_name}.head"


async def declare_log(channel: aiormq.abc.AbstractChannel, name: str, max_bytes: int) -> None:
    """Declare the retained log (a durable stream) and its snapshot queue; idempotent."""
    arguments: dict[str, Any] = {"x-queue-type": "stream"}
    if max_bytes:
        arguments["x-max-length-bytes"] = max_bytes
    await channel.queue_declare(name, durable=True, arguments=arguments)
    await channel.queue_declare(
        head_name(name), durable=True, arguments={"x-max-length": 1, "x-overflow": "drop-head"}
    )


class Replay:
    """The retained state of every topic, read from a snapshot and the log up to a barrier.

    Attributes:
        values: Topic -> (last body, its headers); clears removed.
        ids: The ids of the retained publishes read (to drop live copies of them).
        read: Log entries read (beyond the snapshot).
    """

    def __init__(self, barrier: str, snapshot: Snapshot | None) -> None:
        self.barrier = barrier
        self.values: dict[str, tuple[bytes, dict[str, Any] | None]] = {}
        self.ids: set[str] = set()
        self.new_ids: list[str] = []  # read from the log (a snapshot keeps only these)
        if snapshot is not None:
            self.values.update(snapshot.values)
            self.ids.update(snapshot.ids)
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.read = 0
        self.upto = -1

    def take(self, message: DeliveredMessage) -> bool:
        """Read one log entry; True once the barrier was reached."""
        self.read += 1
        headers = message.header.properties.headers or {}
        if headers.get(BARRIER) == self.barrier:
            offset = headers.get("x-stream-offset")
            self.upto = offset if isinstance(offset, int) else -1
            return True
        topic = headers.get(TOPIC)
        if not isinstance(topic, str):
            return False  # a barrier of another replay, or junk: skipped
        rid = headers.get(RETAIN_ID)
        if isinstance(rid, str):
            self.ids.add(rid)
            self.new_ids.append(rid)
        if message.body:
            self.values[topic] = (message.body, headers)
        else:
            self.values.pop(topic, None)
        return False

    def snapshot(self) -> bytes | None:
        """This state as a snapshot body (None: the barrier's offset is unknown)."""
        if self.upto < 0:
            return None
        values = {
            topic: (body, {k: v for k, v in (table or {}).items() if isinstance(v, str)})
            for topic, (body, table) in self.values.items()
        }
        return _encode(Snapshot(self.upto, values, self.new_ids))


async def append_barrier(wire: Wire, log_name: str, barrier: str) -> None:
    """Append a barrier to the log and wait until the broker confirmed it."""
    props = to_properties(None, False)
    props.headers = {BARRIER: barrier}
    confirm, wait = wire.send(log_name, b"", props, True, exchange="")
    if wait is not None:
        await wait
    if confirm is not None:
        await confirm


async def _newest_snapshot(channel: aiormq.abc.AbstractChannel, log_name: str) -> Snapshot | None:
    """The snapshot in the head queue, left there (None: none, junk, or another reader has it)."""
    got = await channel.basic_get(head_name(log_name), no_ack=False)
    if not isinstance(got.delivery, spec.Basic.GetOk):
        return None
    await channel.basic_reject(got.delivery.delivery_tag or 0, requeue=True)
    try:
        return _decode(got.body)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None  # junk: replay from the start (a new snapshot will replace it)


class RetainedLog:
    """The retained log as one connection reads it: a replay channel, snapshots, barriers.

    Args:
        connection: The transport's connection.
        wire: The publishing channel (barriers and snapshots are published there).
        name: The log's stream queue.
        tasks: The transport's tasks (consumer cancellations run there).
    """

    def __init__(
        self, connection: aiormq.abc.AbstractConnection, wire: Wire, name: str, tasks: TaskSet
    ) -> None:
        self.name = name
        self._conn = connection
        self._wire = wire
        self._tasks = tasks
        self._channel: aiormq.abc.AbstractChannel | None = None

    async def _open_channel(self) -> aiormq.abc.AbstractChannel:
        channel = self._channel
        if channel is None or channel.is_closed:
            channel = await self._conn.channel(publisher_confirms=False)
            await channel.basic_qos(prefetch_count=_PREFETCH)
            self._channel = channel
        return channel

    async def newest_snapshot(self) -> Snapshot | None:
        """The newest snapshot (may run while the subscription's queue is being bound)."""
        return await _newest_snapshot(await self._open_channel(), self.name)

    async def replay(self, opening: Awaitable[None] | None, timeout: float) -> Replay:
        """The retained state of every topic, read once ``opening`` bound the queue.

        The newest snapshot is fetched while ``opening`` runs (one round trip saved).
        """
        if opening is None:
            return await self.read(await self.newest_snapshot(), timeout)
        bound, found = await asyncio.gather(opening, self.newest_snapshot(), return_exceptions=True)
        if isinstance(bound, BaseException):
            raise bound
        if isinstance(found, BaseException):
            raise found
        return await self.read(found, timeout)

    async def read(self, snapshot: Snapshot | None, timeout: float) -> Replay:
        """Read the log after ``snapshot`` up to a new barrier; the state of every topic.

        Call it once the subscription's queue is bound: what is published after the barrier
        then arrives live.
        """
        channel = await self._open_channel()
        state = Replay(os.urandom(8).hex(), snapshot)

        async def on_entry(message: DeliveredMessage) -> None:
            if state.done.done():
                return
            if state.take(message):
                state.done.set_result(None)
            elif state.read % (_PREFETCH // 2) == 0:
                # Stream "acks" only give credit: one multiple ack per half window.
                await channel.basic_ack(message.delivery_tag or 0, multiple=True, wait=False)

        tag = f"cascade_bus.replay.{state.barrier}"
        start: int | str = snapshot.upto + 1 if snapshot is not None else "first"
        consuming = channel.basic_consume(
            self.name, on_entry, arguments={"x-stream-offset": start}, consumer_tag=tag
        )
        try:
            # Reading may start before the barrier is in: the reader stops at the barrier.
            results = await asyncio.gather(
                append_barrier(self._wire, self.name, state.barrier),
                consuming,
                return_exceptions=True,
            )
            for result in results:
                if isinstance(result, BaseException):
                    raise result
            async with asyncio.timeout(timeout):
                await state.done
        finally:
            self._tasks.spawn(self._cancel(channel, tag), "replay-cancel")
        if state.read > COMPACT_AFTER:
            await self._store(state)
        return state

    async def _cancel(self, channel: aiormq.abc.AbstractChannel, tag: str) -> None:
        if not channel.is_closed:
            with contextlib.suppress(aiormq.exceptions.AMQPError, ConnectionError):
                await channel.basic_cancel(tag)

    async def _store(self, state: Replay) -> None:
        """Store ``state`` as the newest snapshot (confirmed in the background)."""
        body = state.snapshot()
        if body is not None:
            props = to_properties(None, True)
            _, wait = self._wire.send(head_name(self.name), body, props, False, exchange="")
            if wait is not None and not self._wire.fast:
                await wait  # the public-API fallback publishes only when awaited
