"""The adapter kit's pure parts (no broker): outgoing records, offline buffer, tasks, supervisor.

What they do against real brokers is covered by the fault suite each adapter runs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping

import pytest

from cascade_bus import BusURL, ConnectError, ConnectionLost, PublishError, UnsupportedFeature
from cascade_bus.spi import (
    DropReason,
    MessageSink,
    NetworkOptions,
    NetworkTransport,
    OfflineBuffer,
    Outgoing,
    StatsRecorder,
    Supervisor,
    TaskSet,
    TransportSubscription,
    describe_cause,
)


async def test_outgoing_is_settled_once() -> None:
    fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    out = Outgoing("a/b", b"x", 1, False, fut)
    out.settle()
    out.settle(PublishError("too late"))
    assert fut.result() is None
    assert out.future is None
    failed = Outgoing("a/b", b"x", 1, False, asyncio.get_running_loop().create_future())
    waiter = failed.future
    failed.settle(PublishError("refused"))
    assert waiter is not None
    with pytest.raises(PublishError, match="refused"):
        waiter.result()


async def test_offline_buffer_holds_up_to_its_limit_then_applies_the_policy() -> None:
    stats = StatsRecorder()
    buffer = OfflineBuffer(2, stats, "mqtt://broker:1883")
    buffer.hold(Outgoing("t", b"0", 1, False))
    buffer.hold(Outgoing("t", b"1", 0, False))
    buffer.hold(Outgoing("t", b"2", 0, False))  # QoS 0 beyond the limit: counted
    assert stats.dropped[DropReason.OFFLINE_OVERFLOW] == 1
    with pytest.raises(PublishError, match="offline buffer full") as caught:
        buffer.hold(Outgoing("t", b"3", 1, False))
    assert caught.value.reason == DropReason.OFFLINE_OVERFLOW
    assert "mqtt://broker:1883" in str(caught.value)
    assert [out.data for out in buffer] == [b"0", b"1"]
    with pytest.raises(ConnectionLost, match="reconnect is off"):
        buffer.hold(Outgoing("t", b"4", 0, False), reconnecting=False)


async def test_requeued_messages_go_first_in_order_and_their_publishers_return() -> None:
    loop = asyncio.get_running_loop()
    buffer = OfflineBuffer(1, StatsRecorder(), "x")
    buffer.hold(Outgoing("t", b"later", 1, False))
    inflight = [Outgoing("t", bytes([i]), 1, False, loop.create_future()) for i in range(3)]
    waiters = [out.future for out in inflight]
    buffer.requeue(inflight)  # beyond the limit: they were accepted before
    assert [out.data for out in buffer.take_all()] == [b"\0", b"\1", b"\2", b"later"]
    assert all(w is not None and w.done() and w.result() is None for w in waiters)


async def test_fail_all_settles_and_counts_and_wait_empty_follows() -> None:
    loop = asyncio.get_running_loop()
    stats = StatsRecorder()
    buffer = OfflineBuffer(5, stats, "x")
    out = Outgoing("t", b"", 1, False, loop.create_future())
    waiter = out.future
    buffer.hold(out)
    buffer.hold(Outgoing("t", b"", 0, False))
    assert not buffer._empty.is_set()
    assert buffer.fail_all(ConnectionLost("gone")) == 2
    assert stats.dropped[DropReason.DISCONNECTED] == 2
    assert waiter is not None
    assert isinstance(waiter.exception(), ConnectionLost)
    async with asyncio.timeout(1):
        await buffer.wait_empty()
    buffer.hold(Outgoing("t", b"", 0, False))
    assert buffer.popleft().qos == 0
    assert not buffer


async def test_taskset_names_tracks_and_stops_its_tasks(caplog: pytest.LogCaptureFixture) -> None:
    tasks = TaskSet("toy")
    forever = tasks.spawn(asyncio.Event().wait(), "waiter")

    async def boom() -> None:
        raise RuntimeError("kaboom")

    failing = tasks.spawn(boom(), "boom")
    assert forever.get_name() == "cascade_bus.toy.waiter"
    with caplog.at_level(logging.ERROR, logger="cascade_bus"):
        await asyncio.wait([failing])
        await asyncio.sleep(0)  # the done callback runs on the next loop turn
    assert "cascade_bus.toy.boom failed" in caplog.text
    assert len(tasks) == 1
    await tasks.aclose(timeout=1)
    assert forever.cancelled()
    assert len(tasks) == 0


def test_describe_cause_never_says_none() -> None:
    assert describe_cause(None) == "the connection was closed"
    assert describe_cause(ConnectionResetError()) == "ConnectionResetError"
    assert describe_cause(OSError("refused")) == "OSError: refused"


class _Steps:
    """A transport's steps, scripted: the supervisor's state machine without a network."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls: list[str] = []
        self.lost: asyncio.Queue[BaseException | None] = asyncio.Queue()

    async def wait_lost(self) -> BaseException | None:
        return await self.lost.get()

    async def on_lost(self, cause: BaseException | None) -> None:
        self.calls.append("on_lost")

    async def reopen(self) -> None:
        self.calls.append("reopen")
        if self.failures:
            self.failures -= 1
            raise ConnectError("broker still down")

    async def abandon(self) -> None:
        self.calls.append("abandon")

    async def restore(self) -> None:
        self.calls.append("restore")

    async def give_up(self, cause: BaseException | None) -> None:
        self.calls.append("give_up")


class _Toy(NetworkTransport):
    async def connect(self) -> None:
        self._set_connected(True)

    async def aclose(self) -> None:
        self._closed = True

    def send(
        self,
        topic: str,
        data: bytes,
        qos: int,
        retain: bool,
        headers: Mapping[str, str] | None,
        reply_to: str | None = None,
    ) -> None:
        return None

    async def subscribe(
        self, pattern: str, sink: MessageSink, *, qos: int = 0, queue: str | None = None
    ) -> TransportSubscription:
        raise UnsupportedFeature("toy", "subscriptions", "it only tests the supervisor")


async def test_supervisor_reconnects_with_backoff_and_one_line_per_step(
    caplog: pytest.LogCaptureFixture,
) -> None:
    transport = _Toy(BusURL("toy://u:secret@h:1"), {})
    await transport.connect()
    steps = _Steps(failures=2)
    options = NetworkOptions(reconnect_min=0.001, reconnect_max=0.002)
    supervisor = Supervisor(transport, steps, options)
    tasks = TaskSet("toy")
    with caplog.at_level(logging.INFO, logger="cascade_bus"):
        tasks.spawn(supervisor.run(), "supervisor")
        steps.lost.put_nowait(None)
        async with asyncio.timeout(5):
            await transport.wait_disconnected()
            await transport.wait_connected(reconnects=1)
    assert steps.calls == ["on_lost", "reopen", "abandon", "reopen", "abandon", "reopen", "restore"]
    assert "the connection was closed" in caplog.text
    assert caplog.text.count("reconnect attempt") == 2
    assert "reconnected to toy://h:1 after 3 attempt(s)" in caplog.text
    assert "secret" not in caplog.text
    supervisor.closing = True
    await tasks.aclose(timeout=1)


async def test_supervisor_gives_up_when_reconnect_is_off() -> None:
    transport = _Toy(BusURL("toy://h:1"), {})
    await transport.connect()
    steps = _Steps(failures=0)
    supervisor = Supervisor(transport, steps, NetworkOptions(reconnect=False))
    steps.lost.put_nowait(ConnectionResetError())
    async with asyncio.timeout(5):
        await supervisor.run()
    assert steps.calls == ["on_lost", "give_up"]
    assert not transport.connected


class _BuggySteps(_Steps):
    """A reopen that fails with an exception the adapter forgot to translate."""

    async def reopen(self) -> None:
        self.calls.append("reopen")
        if self.failures:
            self.failures -= 1
            raise RuntimeError("client bug")


async def test_supervisor_survives_an_untranslated_failure(
    caplog: pytest.LogCaptureFixture,
) -> None:
    transport = _Toy(BusURL("toy://h:1"), {})
    await transport.connect()
    steps = _BuggySteps(failures=1)
    supervisor = Supervisor(transport, steps, NetworkOptions(reconnect_min=0.001))
    tasks = TaskSet("toy")
    with caplog.at_level(logging.INFO, logger="cascade_bus"):
        tasks.spawn(supervisor.run(), "supervisor")
        steps.lost.put_nowait(None)
        async with asyncio.timeout(5):
            await transport.wait_connected(reconnects=1)
    assert steps.calls == ["on_lost", "reopen", "abandon", "reopen", "restore"]
    assert "failed unexpectedly: RuntimeError: client bug" in caplog.text
    supervisor.closing = True
    await tasks.aclose(timeout=1)
