"""Glob escaping and pattern mapping: unit tests, then the globs against a real Redis."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import redis.asyncio as aredis
from cascade_bus_redis import escape_glob, native_subscriptions, scan_glob

from cascade_bus import topic_matches

pytestmark = pytest.mark.redis


@pytest.mark.parametrize(
    ("text", "escaped"),
    [
        ("plain", "plain"),
        ("star*in", "star\\*in"),
        ("q?", "q\\?"),
        ("[x]", "\\[x\\]"),
        ("back\\slash", "back\\\\slash"),
        ("a*?[]\\b", "a\\*\\?\\[\\]\\\\b"),
        ("ünïcödé sp ace", "ünïcödé sp ace"),
    ],
)
def test_escape_glob(text: str, escaped: str) -> None:
    assert escape_glob(text) == escaped


@pytest.mark.parametrize(
    ("pattern", "natives"),
    [
        ("a/b", [("s", "a/b", None)]),
        ("a*/b", [("s", "a*/b", None)]),  # SUBSCRIBE is literal: nothing to escape
        ("a/+/c", [("p", "a/*/c", "a/+/c")]),
        ("a*/+", [("p", "a\\*/*", "a*/+")]),
        ("+", [("p", "*", "+")]),
        ("#", [("p", "*", "#")]),
        ("a/#", [("s", "a", None), ("p", "a/*", "a/+/#")]),
        ("a?/#", [("s", "a?", None), ("p", "a\\?/*", "a?/+/#")]),
        ("+/#", [("p", "*", "+"), ("p", "*/*", "+/+/#")]),
        ("a/+/#", [("p", "a/*", "a/+"), ("p", "a/*/*", "a/+/+/#")]),
    ],
)
def test_native_subscriptions(pattern: str, natives: list[tuple[str, str, str | None]]) -> None:
    assert [tuple(n) for n in native_subscriptions(pattern)] == natives


@pytest.mark.parametrize(
    ("pattern", "glob"),
    [("a/b", "a/b"), ("a/+", "a/*"), ("a/#", "a*"), ("#", "*"), ("x[1]/+/#", "x\\[1\\]/**")],
)
def test_scan_glob(pattern: str, glob: str) -> None:
    assert scan_glob(pattern) == glob


TOPICS = [
    "a", "ab", "a/b", "a/b/c", "a*/b", "aX/b", "a?/x", "ab/x", "[x]/y", "x/y", "\\/z",
    "$SYS/a", "a/$x", "st*r/q", "stXr/q",
]  # fmt: skip
PATTERNS = ["a/#", "a*/+", "a?/#", "+/#", "#", "[x]/+", "\\/+", "st*r/+", "+/b", "a/+/#", "$SYS/#"]


async def test_globs_over_approximate_and_filters_are_exact(redis_url: str) -> None:
    """On a real server: every native glob catches (at least) what the pattern matches, and
    the glob plus its filter delivers exactly the pattern's topics, each once."""
    client = aredis.Redis.from_url(redis_url, protocol=2)
    base = f"gl-{uuid.uuid4().hex}"
    try:
        for pattern in PATTERNS:
            pubsub = client.pubsub()
            natives = native_subscriptions(f"{base}/{pattern}")
            for native in natives:
                if native.kind == "s":
                    await pubsub.subscribe(native.name)
                else:
                    await pubsub.psubscribe(native.name)
            end = f"{base}-end"
            await pubsub.subscribe(end)
            for topic in TOPICS:
                await client.publish(f"{base}/{topic}", topic)
            await client.publish(end, "end")  # its own channel: arrives after the rest
            received: list[tuple[str, str]] = []
            async with asyncio.timeout(5):
                while True:
                    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5)
                    if msg is None:
                        continue
                    channel = msg["channel"].decode()
                    if channel == end:
                        break
                    received.append((msg["pattern"].decode() if msg["pattern"] else "", channel))
            await pubsub.aclose()
            delivered = []
            for native_pattern, channel in received:
                for native in natives:
                    if native.kind == "p" and native.name != native_pattern:
                        continue
                    if native.kind == "s" and (native_pattern or native.name != channel):
                        continue
                    if native.filter is None or topic_matches(native.filter, channel):
                        delivered.append(channel)
            expected = [
                f"{base}/{t}" for t in TOPICS if topic_matches(f"{base}/{pattern}", f"{base}/{t}")
            ]
            assert sorted(delivered) == sorted(expected), pattern
            assert len(delivered) == len(set(delivered)), pattern
    finally:
        await client.aclose()
