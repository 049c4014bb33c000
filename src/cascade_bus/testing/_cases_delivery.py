"""Conformance cases: ordering, concurrency, handler failures, unsubscribe, iterators, types."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from .. import (
    Bus,
    BusClosed,
    DecodeError,
    DropReason,
    Envelope,
)
from ._base import SuiteBase
from ._helpers import (
    BusFactory,
    Collector,
    ErrorRecorder,
    Reading,
    Signal,
    is_sentinel,
    sentinel,
)

__all__ = ["DeliveryCases"]


class _Boom(Exception):
    """What the failing handlers raise."""


class DeliveryCases(SuiteBase):
    """How messages reach subscribers: order, volume, failing handlers, iterators and types."""

    # -- ordering and volume -------------------------------------------------------------------

    async def test_fifo_order_of_1000_messages(
        self, bus: Bus, make_bus: BusFactory, topic: str
    ) -> None:
        """1,000 messages from one publisher arrive in the order they were published."""
        self.require(bus, "ordering")
        publisher = await make_bus()
        inbox = Collector()
        await bus.subscribe(f"{topic}/fifo", inbox)
        for i in range(1000):
            await publisher.publish(f"{topic}/fifo", i)
        await inbox.wait_count(1000, self.wait_timeout * 2)
        assert inbox.payloads == list(range(1000))

    async def test_concurrent_publishers(self, bus: Bus, make_bus: BusFactory, topic: str) -> None:
        """50 tasks x 100 messages: all 5,000 arrive exactly once."""
        publisher = await make_bus()
        inbox = Collector()
        await bus.subscribe(f"{topic}/many", inbox)

        async def produce(p: int) -> None:
            for n in range(100):
                await publisher.publish(f"{topic}/many", [p, n])

        async with asyncio.timeout(self.wait_timeout * 4):
            await asyncio.gather(*(produce(p) for p in range(50)))
        await publisher.publish(f"{topic}/many", sentinel())
        await inbox.wait_sentinel(self.wait_timeout * 2)
        await inbox.wait_count(5001, self.wait_timeout)
        got = [tuple(v) for v in inbox.values]
        assert len(got) == 5000, f"{len(got)} messages, {len(set(got))} distinct"
        assert sorted(got) == [(p, n) for p in range(50) for n in range(100)]
        if bus.capabilities.ordering:
            for p in range(50):
                assert [n for q, n in got if q == p] == list(range(100)), f"publisher {p}"

    async def test_two_subscriptions_on_one_pattern(
        self, bus: Bus, make_bus: BusFactory, topic: str
    ) -> None:
        """Every subscription on a pattern gets every message, on one bus or another."""
        publisher = await make_bus()
        first, second, elsewhere = Collector(), Collector(), Collector()
        pattern = f"{topic}/dup/+" if bus.capabilities.wildcards else f"{topic}/dup/x"
        await bus.subscribe(pattern, first)
        await bus.subscribe(pattern, second)
        other = await make_bus()
        await other.subscribe(pattern, elsewhere)
        for i in range(20):
            await publisher.publish(f"{topic}/dup/x", i)
        await publisher.publish(f"{topic}/dup/x", sentinel())
        for inbox in (first, second, elsewhere):
            await inbox.wait_sentinel(self.wait_timeout)
            if bus.capabilities.ordering:
                assert inbox.values == list(range(20))
            else:
                assert sorted(inbox.values) == list(range(20))

    async def test_subscribers_do_not_share_payload_objects(self, bus: Bus, topic: str) -> None:
        """A handler mutating its payload does not change what another one sees."""
        mutated = Signal()
        done: list[bool] = []

        def mutate(env: Envelope[Any]) -> None:
            env.payload["items"].append("mutated")
            env.payload["new"] = True
            done.append(True)
            mutated.notify()

        reader = Collector()
        await bus.subscribe(f"{topic}/iso", mutate)
        await bus.subscribe(f"{topic}/iso", reader)
        await bus.publish(f"{topic}/iso", {"items": [1]})
        await mutated.wait_for(lambda: bool(done), "the mutating handler", self.wait_timeout)
        await reader.wait_count(1, self.wait_timeout)
        assert reader.payloads == [{"items": [1]}]

    # -- handler failures ----------------------------------------------------------------------

    async def test_handler_errors_are_isolated_and_counted(
        self, make_bus: BusFactory, topic: str
    ) -> None:
        """A raising handler: later messages still handled, others unaffected, counted."""
        errors = ErrorRecorder()
        bus = await make_bus(on_error=errors)
        publisher = await make_bus()
        handled: list[Any] = []
        done = Signal()

        async def flaky(env: Envelope[Any]) -> None:
            if isinstance(env.payload, int) and env.payload % 2:
                raise _Boom(f"odd {env.payload}")
            handled.append(env.payload)
            done.notify()

        def sync_flaky(env: Envelope[Any]) -> None:
            if env.payload == 4:
                raise _Boom("four")

        steady = Collector()
        await bus.subscribe(f"{topic}/err", flaky)
        await bus.subscribe(f"{topic}/err", sync_flaky)
        await bus.subscribe(f"{topic}/err", steady)
        for i in range(10):
            await publisher.publish(f"{topic}/err", i)
        await publisher.publish(f"{topic}/err", sentinel())
        await steady.wait_sentinel(self.wait_timeout)
        await done.wait_for(
            lambda: any(is_sentinel(p) for p in handled), "the flaky handler", self.wait_timeout
        )
        await errors.wait_for(lambda: len(errors.calls) >= 6, "6 errors", self.wait_timeout)
        assert [p for p in handled if not is_sentinel(p)] == [0, 2, 4, 6, 8]
        assert steady.values == list(range(10))
        assert sorted(str(e) for e, _, _ in errors.calls) == sorted(
            ["four", *(f"odd {i}" for i in (1, 3, 5, 7, 9))]
        )
        for error, name, env in errors.calls:
            assert isinstance(error, _Boom)
            assert name == f"{topic}/err"
            assert env is not None
            assert env.topic == name
        assert bus.stats().dropped.get(DropReason.HANDLER_ERROR) == 6

    # -- unsubscribe and iterator mode ---------------------------------------------------------

    async def test_unsubscribe_stops_delivery_and_is_idempotent(
        self, bus: Bus, make_bus: BusFactory, topic: str
    ) -> None:
        """No delivery after unsubscribe(); calling it again is harmless."""
        publisher = await make_bus()
        gone, probe = Collector(), Collector()
        sub = await bus.subscribe(f"{topic}/unsub", gone)
        await bus.subscribe(f"{topic}/unsub", probe)
        await publisher.publish(f"{topic}/unsub", 1)
        await gone.wait_count(1, self.wait_timeout)
        await sub.unsubscribe()
        assert sub.closed
        await sub.unsubscribe()  # idempotent
        await publisher.publish(f"{topic}/unsub", 2)
        await publisher.publish(f"{topic}/unsub", sentinel())
        await probe.wait_sentinel(self.wait_timeout)
        assert probe.values == [1, 2]
        assert gone.payloads == [1]
        await sub.unsubscribe()
        assert bus.is_open

    async def test_iterator_mode(self, bus: Bus, make_bus: BusFactory, topic: str) -> None:
        """``async with bus.subscribe(p) as sub: async for env in sub`` and ``get()``."""
        publisher = await make_bus()
        got: list[Any] = []
        async with bus.subscribe(f"{topic}/iter") as sub:
            for i in range(3):
                await publisher.publish(f"{topic}/iter", i)
            async with asyncio.timeout(self.wait_timeout):
                async for env in sub:
                    assert env.topic == f"{topic}/iter"
                    got.append(env.payload)
                    if len(got) == 3:
                        break
            await publisher.publish(f"{topic}/iter", "via get")
            env = await sub.get(timeout=self.wait_timeout)
            assert env.payload == "via get"
            with pytest.raises(TimeoutError):
                await sub.get(timeout=0.05)
        assert got == [0, 1, 2]
        assert sub.closed
        async with asyncio.timeout(self.wait_timeout):
            assert [e async for e in sub] == []  # iteration of a closed subscription ends
        with pytest.raises(BusClosed):
            await sub.get(timeout=self.wait_timeout)

    async def test_handler_subscription_cannot_be_iterated(self, bus: Bus, topic: str) -> None:
        """A subscription with a handler refuses iteration with TypeError."""
        sub = await bus.subscribe(f"{topic}/h", Collector())
        with pytest.raises(TypeError):
            sub.__aiter__()
        await sub.unsubscribe()

    # -- typed payloads ------------------------------------------------------------------------

    async def test_typed_payloads(self, make_bus: BusFactory, topic: str) -> None:
        """``type=`` decodes payloads; a mismatch goes to on_error as DecodeError and is counted."""
        errors = ErrorRecorder()
        bus = await make_bus(on_error=errors)
        publisher = await make_bus()
        inbox = Collector()
        await bus.subscribe(f"{topic}/typed", inbox, type=Reading)
        await publisher.publish(f"{topic}/typed", {"sensor": "t1", "value": 1.5})
        await publisher.publish(f"{topic}/typed", Reading("t2", 2.0))
        await publisher.publish(f"{topic}/typed", {"sensor": 3, "value": "not a number"})
        await publisher.publish(f"{topic}/typed", [1, 2, 3])
        await publisher.publish(f"{topic}/typed", {"sensor": "t5", "value": 5})
        await inbox.wait_count(3, self.wait_timeout)
        await errors.wait_for(lambda: len(errors.calls) >= 2, "2 decode errors", self.wait_timeout)
        assert inbox.payloads == [Reading("t1", 1.5), Reading("t2", 2.0), Reading("t5", 5.0)]
        assert all(type(p) is Reading for p in inbox.payloads)
        assert len(errors.calls) == 2
        for error, name, _ in errors.calls:
            assert isinstance(error, DecodeError), error
            assert name == f"{topic}/typed"
        assert bus.stats().dropped.get(DropReason.DECODE_ERROR) == 2

    async def test_typed_iterator(self, bus: Bus, make_bus: BusFactory, topic: str) -> None:
        """``type=`` works in iterator mode too."""
        publisher = await make_bus()
        async with bus.subscribe(f"{topic}/typed-iter", type=Reading) as sub:
            await publisher.publish(f"{topic}/typed-iter", {"sensor": "x", "value": 0.5})
            env = await sub.get(timeout=self.wait_timeout)
        assert env.payload == Reading("x", 0.5)
