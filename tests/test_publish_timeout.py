"""``publish_timeout`` bounds every QoS >= 1 wait, whichever way the transport returns it.

A transport whose broker never confirms is simulated by a tiny in-test transport (there is no
broker client to mock: this is the bus's own timeout logic). The transport hands back either an
`asyncio.Future` from ``send`` (watched by one shared timer) or a coroutine (bounded by
``asyncio.timeout``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Mapping
from typing import Any

import pytest

from cascade_bus import Bus, DropReason, PublishError
from cascade_bus._deadlines import Deadlines
from cascade_bus.spi import BusURL, Capabilities, MessageSink, Transport, TransportSubscription

WAIT = 5.0


class SilentBroker(Transport):
    """Accepts QoS 1 publishes and confirms only those published while ``confirming``."""

    capabilities = Capabilities(max_qos=1)

    def __init__(self, url: BusURL, options: Mapping[str, Any], *, futures: bool) -> None:
        super().__init__(url, options)
        self.confirming = False
        self.refusing = False
        self.pending: list[asyncio.Future[None]] = []
        self.futures = futures

    async def connect(self) -> None:
        """Nothing to connect to."""

    async def aclose(self) -> None:
        """Nothing to close."""

    def _confirmation(self) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.refusing:
            fut.set_exception(PublishError("refused by the broker", reason="publish_failed"))
        elif self.confirming:
            fut.set_result(None)
        self.pending.append(fut)
        return fut

    def send(
        self,
        topic: str,
        data: bytes,
        qos: int,
        retain: bool,
        headers: Mapping[str, str] | None,
        reply_to: str | None = None,
    ) -> Awaitable[None] | None:
        if not qos:
            return None
        confirmation = self._confirmation()
        return confirmation if self.futures else self._confirmed(confirmation)

    async def _confirmed(self, confirmation: asyncio.Future[None]) -> None:
        await confirmation

    async def subscribe(
        self, pattern: str, sink: MessageSink, *, qos: int = 0, queue: str | None = None
    ) -> TransportSubscription:
        raise AssertionError("not used")


@pytest.mark.parametrize("futures", [True, False], ids=["future", "coroutine"])
async def test_an_unconfirmed_qos1_publish_fails_after_publish_timeout(futures: bool) -> None:
    transport = SilentBroker(BusURL("silent://"), {}, futures=futures)
    async with Bus(transport=transport, publish_timeout=0.1) as bus:
        async with asyncio.timeout(WAIT):
            with pytest.raises(PublishError, match=r"not confirmed within 0\.1s"):
                await bus.publish("a/b", {"n": 1}, qos=1)
            transport.confirming = True
            for n in range(100):  # confirmed ones pass; the failed one left nothing behind
                await bus.publish("a/b", {"n": n}, qos=1)
        stats = bus.stats()
    assert stats.dropped == {DropReason.PUBLISH_FAILED: 1}
    assert stats.published == 100


@pytest.mark.parametrize("futures", [True, False], ids=["future", "coroutine"])
async def test_a_refusal_from_the_transport_names_the_topic(futures: bool) -> None:
    transport = SilentBroker(BusURL("silent://"), {}, futures=futures)
    transport.refusing = True
    async with Bus(transport=transport) as bus:
        with pytest.raises(PublishError, match="refused by the broker") as info:
            await bus.publish("a/b", {"n": 1}, qos=1)
        assert info.value.topic == "a/b"
        assert bus.stats().dropped == {DropReason.PUBLISH_FAILED: 1}


async def test_deadlines_fail_only_what_is_still_pending_in_order() -> None:
    loop = asyncio.get_running_loop()
    deadlines = Deadlines(0.05)
    first, second, third = (loop.create_future() for _ in range(3))
    for fut in (first, second, third):
        deadlines.watch(fut)
    second.set_result("in time")
    async with asyncio.timeout(WAIT):
        with pytest.raises(TimeoutError):
            await first
        with pytest.raises(TimeoutError):
            await third
    assert second.result() == "in time"
    assert len(deadlines) == 0


async def test_deadlines_forget_settled_futures_as_new_ones_come() -> None:
    loop = asyncio.get_running_loop()
    deadlines = Deadlines(60.0)
    for _ in range(1_000):
        fut: asyncio.Future[None] = loop.create_future()
        deadlines.watch(fut)
        fut.set_result(None)
    assert len(deadlines) == 1  # only the last one, settled after it was watched
