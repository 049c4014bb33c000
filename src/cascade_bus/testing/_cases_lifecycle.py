"""Conformance cases: closing, counters, bad input and declared capabilities."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from .. import (
    Bus,
    BusClosed,
    DropReason,
    EncodeError,
    InvalidTopic,
    PayloadTooLarge,
    UnsupportedFeature,
)
from ._base import SuiteBase
from ._helpers import (
    BusFactory,
    Collector,
    Signal,
    sentinel,
    with_query,
)

__all__ = ["LifecycleCases"]


class LifecycleCases(SuiteBase):
    """Closing, stats counters, refused input and what the declared capabilities promise."""

    # -- closing -------------------------------------------------------------------------------

    async def test_close_ends_a_waiting_iterator(self, make_bus: BusFactory, topic: str) -> None:
        """close() ends a waiting ``async for`` and a pending ``get()`` promptly."""
        bus = await make_bus()
        got: list[Any] = []
        arrived = Signal()
        sub = await bus.subscribe(f"{topic}/closing")

        async def consume() -> None:
            async for env in sub:
                got.append(env.payload)
                arrived.notify()

        task = asyncio.create_task(consume())
        waiter = asyncio.create_task(
            (await bus.subscribe(f"{topic}/closing-get")).get()  # no timeout: close must end it
        )
        await bus.publish(f"{topic}/closing", 1)
        await arrived.wait_for(lambda: got == [1], "the consumer", self.wait_timeout)
        # Both consumers are now parked waiting for the next message.
        async with asyncio.timeout(self.wait_timeout):
            await bus.close()
            await task  # the iteration ended (StopAsyncIteration), no exception
            with pytest.raises(BusClosed):
                await waiter
        assert got == [1]
        assert sub.closed
        with pytest.raises(BusClosed):
            await bus.publish(f"{topic}/closing", 2)
        with pytest.raises(BusClosed):
            await bus.subscribe(f"{topic}/closing", Collector())
        await bus.close()  # idempotent

    async def test_close_drains_published_messages(
        self, bus: Bus, make_bus: BusFactory, topic: str
    ) -> None:
        """Everything published before close() reaches a subscriber on another bus."""
        inbox = Collector()
        await bus.subscribe(f"{topic}/drain", inbox)
        publisher = await make_bus()
        for i in range(500):
            await publisher.publish(f"{topic}/drain", i)
        assert publisher.stats().published == 500
        async with asyncio.timeout(self.wait_timeout):
            await publisher.close()
        assert not publisher.is_open
        await inbox.wait_count(500, self.wait_timeout)
        if bus.capabilities.ordering:
            assert inbox.payloads == list(range(500))
        else:
            assert sorted(inbox.payloads) == list(range(500))
        assert bus.is_open

    # -- counters ------------------------------------------------------------------------------

    async def test_stats_counters(self, make_bus: BusFactory, topic: str) -> None:
        """The published and delivered counters are exact; nothing is dropped."""
        publisher, subscriber = await make_bus(), await make_bus()
        inbox = Collector()
        await subscriber.subscribe(f"{topic}/stats", inbox)
        for i in range(5):
            await publisher.publish(f"{topic}/stats", i)
        await publisher.publish(f"{topic}/stats", sentinel())
        await publisher.flush(self.wait_timeout)
        await inbox.wait_sentinel(self.wait_timeout)
        sent, received = publisher.stats(), subscriber.stats()
        assert sent.published == 6
        assert sent.delivered == 0
        assert received.published == 0
        assert received.delivered == 6
        assert sent.dropped_total == 0
        assert received.dropped_total == 0
        async with subscriber.subscribe(f"{topic}/stats-iter") as sub:
            await publisher.publish(f"{topic}/stats-iter", "one")
            await sub.get(timeout=self.wait_timeout)
        assert subscriber.stats().delivered == 7
        assert publisher.stats().published == 7

    # -- bad input -----------------------------------------------------------------------------

    @pytest.mark.parametrize(
        "bad",
        ["{t}/a/+", "{t}/#", "{t}/a/+/b", "{t}//x", "{t}/x/", "/{t}", "", "{t}/nul\x00"],
    )
    async def test_invalid_publish_topic(self, bus: Bus, topic: str, bad: str) -> None:
        """Wildcards, empty levels, NUL in a publish topic: InvalidTopic; the bus still works."""
        with pytest.raises(InvalidTopic):
            await bus.publish(bad.format(t=topic), {"x": 1})
        await self.assert_still_works(bus, topic)

    async def test_non_string_topic(self, bus: Bus, topic: str) -> None:
        """A topic that is not a str: InvalidTopic."""
        with pytest.raises(InvalidTopic):
            await bus.publish(123, {"x": 1})  # type: ignore[arg-type]
        await self.assert_still_works(bus, topic)

    @pytest.mark.parametrize("bad", ["{t}/a#", "{t}/#/a", "{t}/a+/b", "{t}//x", "{t}/", ""])
    async def test_invalid_subscribe_pattern(self, bus: Bus, topic: str, bad: str) -> None:
        """A malformed pattern: InvalidTopic; the bus still works."""
        with pytest.raises(InvalidTopic):
            await bus.subscribe(bad.format(t=topic), Collector())
        await self.assert_still_works(bus, topic)

    @pytest.mark.parametrize("fmt", ["json", "msgpack", "raw"])
    async def test_unencodable_payload(
        self, make_bus: BusFactory, transport_url: str, topic: str, fmt: str
    ) -> None:
        """A payload msgspec cannot encode: EncodeError, nothing published."""
        bus = await make_bus(with_query(transport_url, format=fmt))
        with pytest.raises(EncodeError):
            await bus.publish(f"{topic}/enc", object())
        with pytest.raises(EncodeError):
            await bus.publish(f"{topic}/enc", {"nested": {1, 2, 3j}})
        assert bus.stats().published == 0
        await self.assert_still_works(bus, topic)

    async def test_oversized_payload(self, bus: Bus, topic: str) -> None:
        """A body above the transport's max_payload: PayloadTooLarge, counted."""
        limit = bus.transport.max_payload
        if limit is None:
            pytest.skip(f"{bus.url.scheme} lacks capability: max_payload")
        if limit > self.max_oversized:
            pytest.skip(
                f"{bus.url.scheme} lacks capability: max_payload<={self.max_oversized} "
                f"(it is {limit}; raise max_oversized to test it)"
            )
        with pytest.raises(PayloadTooLarge) as info:
            await bus.publish(f"{topic}/big", b"x" * (limit + 1))
        assert info.value.limit == limit
        assert info.value.size > limit
        assert bus.stats().dropped.get(DropReason.PAYLOAD_TOO_LARGE) == 1
        await self.assert_still_works(bus, topic)

    async def test_unsupported_features_refused(self, bus: Bus, topic: str) -> None:
        """What the transport does not declare is refused with UnsupportedFeature, never ignored."""
        caps = bus.capabilities
        too_high = caps.max_qos + 1
        with pytest.raises(UnsupportedFeature) as info:
            await bus.publish(f"{topic}/qos", {"x": 1}, qos=too_high)
        assert info.value.transport == bus.url.scheme
        assert isinstance(info.value, NotImplementedError)
        with pytest.raises(UnsupportedFeature):
            await bus.subscribe(f"{topic}/qos", Collector(), qos=too_high)
        if not caps.retain:
            with pytest.raises(UnsupportedFeature):
                await bus.publish(f"{topic}/r", {"x": 1}, retain=True)
        if not caps.queue_groups:
            with pytest.raises(UnsupportedFeature):
                await bus.subscribe(f"{topic}/q", Collector(), queue="workers")
        if not caps.wildcards:
            with pytest.raises(UnsupportedFeature):
                await bus.subscribe(f"{topic}/+", Collector())
        if not caps.request_reply:
            with pytest.raises(UnsupportedFeature):
                await bus.request(f"{topic}/svc", {}, timeout=0.1)
        await self.assert_still_works(bus, topic)

    async def test_every_declared_qos_round_trips(
        self, bus: Bus, make_bus: BusFactory, topic: str
    ) -> None:
        """Every QoS up to capabilities.max_qos publishes and subscribes."""
        publisher = await make_bus()
        inbox = Collector()
        top = bus.capabilities.max_qos
        for qos in range(top + 1):
            await bus.subscribe(f"{topic}/qos{qos}", inbox, qos=qos)
        for qos in range(top + 1):
            await publisher.publish(f"{topic}/qos{qos}", {"qos": qos}, qos=qos)
        await inbox.wait_count(top + 1, self.wait_timeout)
        assert sorted(p["qos"] for p in inbox.payloads) == list(range(top + 1))
