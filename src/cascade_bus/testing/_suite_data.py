"""The data the conformance cases publish: round-trip payloads, wildcard matrix, odd levels."""

from __future__ import annotations

from typing import Any

__all__ = [
    "ODD_LEVELS",
    "RAW_ROUND_TRIP_PAYLOADS",
    "ROUND_TRIP_PAYLOADS",
    "WILDCARD_MATRIX",
    "WILDCARD_TOPICS",
]

#: Payloads that must come back equal and of the same type (bytes stay bytes).
ROUND_TRIP_PAYLOADS: tuple[Any, ...] = (
    {"a": 1, "b": "two", "c": [1, 2]},
    {},
    [1, "two", 3.5, None, True],
    [],
    'plain text with ünïcödé and "quotes"',
    "",
    42,
    -7,
    2**53,
    3.25,
    True,
    False,
    None,
    {"nested": {"list": [{"deep": [1, 2, {"x": None}]}], "empty": {}, "n": 0, "f": -0.5}},
    b"\x00\x01\xfe\xffbinary",
    b"{}",  # bytes that look like JSON still come back as bytes
)

#: The same for ``format=raw``: the body is the bare payload, so bytes must not look like JSON.
RAW_ROUND_TRIP_PAYLOADS: tuple[Any, ...] = (
    {"a": 1, "b": "two", "c": [1, 2]},
    {},
    [1, "two", 3.5, None, True],
    "plain text with ünïcödé",
    42,
    3.25,
    True,
    {"nested": {"list": [{"deep": [1, 2, {"x": None}]}]}},
    b"\x00\x01\xfe\xffbinary",
)

#: Concrete topics (relative to the test's prefix) the wildcard matrix publishes to.
WILDCARD_TOPICS: tuple[str, ...] = (
    "a",
    "ab",
    "a/b",
    "a/c",
    "b/a",
    "x/y",
    "A/b",
    "a/b/c",
    "a/x/c",
    "a/b/d",
    "a/b/c/d",
)

#: Pattern (relative to the prefix) → exactly the topics of `WILDCARD_TOPICS` it matches.
#: Written out by hand rather than computed, so the suite does not trust the matcher it tests.
WILDCARD_MATRIX: dict[str, frozenset[str]] = {
    "a": frozenset({"a"}),
    "a/b": frozenset({"a/b"}),
    "a/b/c/d": frozenset({"a/b/c/d"}),
    "+": frozenset({"a", "ab"}),
    "a/+": frozenset({"a/b", "a/c"}),
    "+/b": frozenset({"a/b", "A/b"}),
    "A/+": frozenset({"A/b"}),
    "+/+": frozenset({"a/b", "a/c", "b/a", "x/y", "A/b"}),
    "a/+/c": frozenset({"a/b/c", "a/x/c"}),
    "+/+/c": frozenset({"a/b/c", "a/x/c"}),
    "a/#": frozenset({"a", "a/b", "a/c", "a/b/c", "a/x/c", "a/b/d", "a/b/c/d"}),
    "a/b/#": frozenset({"a/b", "a/b/c", "a/b/d", "a/b/c/d"}),
    "a/+/#": frozenset({"a/b", "a/c", "a/b/c", "a/x/c", "a/b/d", "a/b/c/d"}),
    "a/b/c/d/#": frozenset({"a/b/c/d"}),
    "#": frozenset(WILDCARD_TOPICS),
}

#: Topic levels with characters some brokers cannot carry natively (the adapter must escape).
ODD_LEVELS: tuple[str, ...] = (
    "with.dot",
    "ünïcödé",
    "dash-and_underscore",
    "sp ace",
    "star*in",
    "gt>in",
    "dollar$in",
    "UPPER",
    "123",
    "semi;colon:",
)
