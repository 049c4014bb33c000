"""Matching on a real nats-server equals `topic_matches` for generated topics and patterns.

Hypothesis draws a batch of topics and patterns from a small alphabet full of characters NATS
cannot carry natively (so matches are frequent and escaping is exercised); the bus subscribes
every pattern, publishes every topic once, and each subscription must receive exactly the
topics `topic_matches` says — no more, no fewer, with the exact concrete topic. A private server
keeps other tests' traffic away from the ``#`` and ``+`` patterns.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cascade_bus
from cascade_bus import topic_matches

pytestmark = pytest.mark.nats

LEVELS = ["a", "b", "$a", "a.b", "s p", "x*", ">", "%", "%2E", "ü"]
level = st.sampled_from(LEVELS)
topic = st.lists(level, min_size=1, max_size=3).map("/".join)


@st.composite
def pattern(draw: st.DrawFn) -> str:
    parts = draw(st.lists(st.one_of(level, st.just("+")), min_size=1, max_size=3))
    if draw(st.booleans()):
        parts.append("#")
    return "/".join(parts)


@pytest.fixture
def server(private_nats: Any) -> Any:
    return private_nats()


@given(
    topics=st.lists(topic, min_size=1, max_size=12, unique=True),
    patterns=st.lists(st.one_of(pattern(), st.just("#"), st.just("+/+")), min_size=1, max_size=8),
)
@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
async def test_server_matching_equals_topic_matches(
    server: Any, topics: list[str], patterns: list[str]
) -> None:
    run = uuid.uuid4().hex
    got: dict[int, list[str]] = {i: [] for i in range(len(patterns))}
    done: dict[int, asyncio.Event] = {i: asyncio.Event() for i in range(len(patterns))}
    async with cascade_bus.connect(server.url, retain=False) as bus:

        def handler(i: int) -> Any:
            def record(env: cascade_bus.Envelope[Any]) -> None:
                payload = env.payload
                if not isinstance(payload, dict) or payload.get("run") != run:
                    return
                if payload.get("end") == i:
                    done[i].set()
                elif "end" not in payload:
                    got[i].append(env.topic)

            return record

        for i, p in enumerate(patterns):
            await bus.subscribe(p, handler(i))
        for t in topics:
            await bus.publish(t, {"run": run})
        # One end marker per pattern, on a topic that pattern matches, after everything else.
        for i, p in enumerate(patterns):
            marker = "/".join("end" if lv in ("+", "#") else lv for lv in p.split("/"))
            await bus.publish(marker, {"run": run, "end": i})
        async with asyncio.timeout(10):
            for event in done.values():
                await event.wait()
    for i, p in enumerate(patterns):
        expected = sorted(t for t in topics if topic_matches(p, t))
        assert sorted(got[i]) == expected, f"pattern {p!r}"
