"""Conformance cases: queue groups (competing consumers) and request/reply."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from .. import (
    Bus,
    BusError,
    DecodeError,
    Envelope,
    NoResponders,
    RequestTimeout,
)
from ._base import SuiteBase
from ._helpers import (
    BusFactory,
    Collector,
    Reading,
    Signal,
    sentinel,
)

__all__ = ["QueueRequestCases"]


class QueueRequestCases(SuiteBase):
    """Queue groups share work; requests get their own replies, timeouts and no-responders."""

    # -- queue groups --------------------------------------------------------------------------

    async def test_queue_group_each_message_once(
        self, bus: Bus, make_bus: BusFactory, topic: str
    ) -> None:
        """3 queue members share 300 messages (each once, spread); a plain subscriber gets all."""
        self.require(bus, "queue_groups")
        group = Signal()
        members = [Collector(group) for _ in range(3)]
        for member in members:
            await (await make_bus()).subscribe(f"{topic}/jobs", member, queue="workers")
        everything = Collector()
        await bus.subscribe(f"{topic}/jobs", everything)
        publisher = await make_bus()
        for i in range(300):
            await publisher.publish(f"{topic}/jobs", i)
        await publisher.publish(f"{topic}/jobs", sentinel())
        await everything.wait_sentinel(self.wait_timeout)
        await group.wait_for(
            lambda: sum(len(m.envelopes) for m in members) >= 301,
            "301 messages across the group",
            self.wait_timeout,
        )
        handled = sorted(v for m in members for v in m.values)
        assert handled == list(range(300)), f"{len(handled)} handled, {len(set(handled))} distinct"
        assert sum(m.seen_sentinel() for m in members) == 1
        assert sum(1 for m in members if m.values) > 1, [len(m.values) for m in members]
        if bus.capabilities.ordering:
            assert everything.values == list(range(300))
            for member in members:
                assert member.values == sorted(member.values)
        else:
            assert sorted(everything.values) == list(range(300))

    # -- request / reply -----------------------------------------------------------------------

    async def test_request_reply(self, bus: Bus, make_bus: BusFactory, topic: str) -> None:
        """Concurrent requests each get their own reply through bus.reply()."""
        self.require(bus, "request_reply")
        responder = await make_bus()
        requests: list[Envelope[Any]] = []

        async def answer(env: Envelope[Any]) -> None:
            requests.append(env)
            await responder.reply(env, {"echo": env.payload, "cid": env.correlation_id})

        await responder.subscribe(f"{topic}/svc", answer)
        async with asyncio.timeout(self.wait_timeout * 2):
            replies = await asyncio.gather(
                *(
                    bus.request(f"{topic}/svc", {"n": n}, timeout=self.wait_timeout)
                    for n in range(10)
                )
            )
        for n, reply in enumerate(replies):
            assert reply.payload["echo"] == {"n": n}
            assert reply.payload["cid"] == reply.correlation_id
        assert len({r.reply_to for r in requests}) == 10
        assert len({r.correlation_id for r in requests}) == 10
        assert all(r.reply_to and r.correlation_id for r in requests)

    async def test_reply_by_plain_publish(self, bus: Bus, make_bus: BusFactory, topic: str) -> None:
        """A responder that publishes to env.reply_to answers the request."""
        self.require(bus, "request_reply")
        responder = await make_bus()

        async def answer(env: Envelope[Any]) -> None:
            assert env.reply_to is not None
            await responder.publish(env.reply_to, {"plain": env.payload})

        await responder.subscribe(f"{topic}/plain-svc", answer)
        reply = await bus.request(f"{topic}/plain-svc", "ping", timeout=self.wait_timeout)
        assert reply.payload == {"plain": "ping"}

    async def test_request_typed_reply(self, bus: Bus, make_bus: BusFactory, topic: str) -> None:
        """``request(type=...)`` converts the reply; a mismatch raises DecodeError."""
        self.require(bus, "request_reply")
        responder = await make_bus()

        async def answer(env: Envelope[Any]) -> None:
            await responder.reply(env, Reading("r", float(env.payload)))

        await responder.subscribe(f"{topic}/typed-svc", answer)
        reply = await bus.request(f"{topic}/typed-svc", 7, timeout=self.wait_timeout, type=Reading)
        assert reply.payload == Reading("r", 7.0)
        with pytest.raises(DecodeError):
            await bus.request(f"{topic}/typed-svc", 8, timeout=self.wait_timeout, type=list[str])

    async def test_request_timeout(self, bus: Bus, make_bus: BusFactory, topic: str) -> None:
        """A responder that never answers: RequestTimeout (a TimeoutError and a BusError)."""
        self.require(bus, "request_reply")
        silent = await make_bus()
        heard = Collector()
        await silent.subscribe(f"{topic}/silent-svc", heard)
        async with asyncio.timeout(self.wait_timeout):
            with pytest.raises(RequestTimeout) as info:
                await bus.request(f"{topic}/silent-svc", {"q": 1}, timeout=0.2)
        assert not isinstance(info.value, NoResponders)
        assert isinstance(info.value, TimeoutError)
        assert isinstance(info.value, BusError)
        await heard.wait_for(lambda: heard.values == [{"q": 1}], "the request", self.wait_timeout)
        await self.assert_still_works(bus, topic)

    async def test_request_no_responders(self, bus: Bus, topic: str) -> None:
        """Nobody subscribed: NoResponders at once, not after the (long) timeout."""
        self.require(bus, "request_reply")
        self.require(bus, "no_responders")
        async with asyncio.timeout(self.wait_timeout):
            with pytest.raises(NoResponders, match="nobody-home"):
                await bus.request(f"{topic}/nobody-home", {"q": 1}, timeout=3600)
        await self.assert_still_works(bus, topic)
