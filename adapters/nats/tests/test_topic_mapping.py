"""The NATS topic mapper, property-tested: it round-trips, and NATS matching equals MQTT matching.

Pure logic, no server: `nats_matches` is NATS's subject matching (``*`` one token, ``>`` one or
more trailing tokens), written from the NATS documentation.
"""

from __future__ import annotations

import pytest
from cascade_bus_nats import NatsTopicMapper
from cascade_bus_nats._mapper import needs_escape
from hypothesis import given, settings
from hypothesis import strategies as st

from cascade_bus import topic_matches, validate_pattern, validate_topic

MAPPER = NatsTopicMapper()

# Levels that stress the escaping: separators, wildcards, the escape itself, look-alike escapes.
TRICKY = [".", "*", ">", "%", "%2E", "%25", "%zz", " ", "\t", "\r\n", "$", "a.b", "ü", "x*y"]
level = st.one_of(
    st.sampled_from(TRICKY),
    st.text(
        alphabet=st.characters(blacklist_characters="/+#\x00", blacklist_categories=("Cs",)),
        min_size=1,
        max_size=6,
    ),
)
topics = st.lists(level, min_size=1, max_size=5).map("/".join)


@st.composite
def patterns(draw: st.DrawFn, levels: st.SearchStrategy[str] = level) -> str:
    parts = draw(st.lists(st.one_of(levels, st.just("+")), min_size=1, max_size=4))
    if draw(st.booleans()):
        parts.append("#")
    return "/".join(parts)


def nats_matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: ``*`` is one token, a last ``>`` is one or more tokens."""
    p, s = pattern.split("."), subject.split(".")
    for i, token in enumerate(p):
        if token == ">":
            return len(s) > i
        if i >= len(s) or (token != "*" and token != s[i]):
            return False
    return len(p) == len(s)


def adapter_keeps(pattern: str, topic: str) -> bool:
    """The transport's own filter: a leading wildcard never delivers a ``$`` topic."""
    return not (pattern[0] in "+#" and topic[0] == "$")


@given(topics)
@settings(max_examples=400)
def test_topics_round_trip(topic: str) -> None:
    validate_topic(topic)
    native = MAPPER.to_native(topic)
    assert MAPPER.from_native(native) == topic
    assert MAPPER.to_native(MAPPER.from_native(native)) == native


@given(topics)
@settings(max_examples=300)
def test_subjects_are_literal_nats_subjects(topic: str) -> None:
    native = MAPPER.to_native(topic)
    tokens = native.split(".")
    assert len(tokens) == topic.count("/") + 1  # one token per level
    for token in tokens:
        assert token
        assert "*" not in token
        assert ">" not in token
        assert not any(ord(c) <= 0x20 or c == "\x7f" for c in token)


@given(topics, topics)
def test_distinct_topics_give_distinct_subjects(a: str, b: str) -> None:
    assert (a == b) == (MAPPER.to_native(a) == MAPPER.to_native(b))


@given(patterns(), topics)
@settings(max_examples=600)
def test_nats_matching_equals_topic_matches(pattern: str, topic: str) -> None:
    validate_pattern(pattern)
    natives = MAPPER.to_native_patterns(pattern)
    on_nats = any(nats_matches(n, MAPPER.to_native(topic)) for n in natives)
    assert (on_nats and adapter_keeps(pattern, topic)) == topic_matches(pattern, topic)


SMALL = st.sampled_from(["a", "b", "$a", "a.b", "*"])


@given(patterns(SMALL), st.lists(SMALL, min_size=1, max_size=4).map("/".join))
@settings(max_examples=600)
def test_matching_on_a_small_alphabet(pattern: str, topic: str) -> None:
    """Small alphabets make matches frequent, so both outcomes are exercised."""
    natives = MAPPER.to_native_patterns(pattern)
    on_nats = any(nats_matches(n, MAPPER.to_native(topic)) for n in natives)
    assert (on_nats and adapter_keeps(pattern, topic)) == topic_matches(pattern, topic)


@pytest.mark.parametrize(
    ("topic", "native"),
    [
        ("a/b/c", "a.b.c"),
        ("with.dot/x", "with%2Edot.x"),
        ("sp ace", "sp%20ace"),
        ("star*in/gt>in", "star%2Ain.gt%3Ein"),
        ("100%", "100%25"),
        ("tab\there", "tab%09here"),
        ("ünïcödé/$x", "ünïcödé.$x"),
        ("$SYS/broker", "$SYS.broker"),
    ],
)
def test_examples(topic: str, native: str) -> None:
    assert MAPPER.to_native(topic) == native
    assert MAPPER.from_native(native) == topic


@pytest.mark.parametrize(
    ("pattern", "natives"),
    [
        ("a/+/c", ("a.*.c",)),
        ("a/#", ("a", "a.>")),
        ("a/+/#", ("a.*", "a.*.>")),
        ("#", (">",)),
        ("+", ("*",)),
        ("x.y/#", ("x%2Ey", "x%2Ey.>")),
    ],
)
def test_pattern_examples(pattern: str, natives: tuple[str, ...]) -> None:
    assert MAPPER.to_native_patterns(pattern) == natives


def test_foreign_subjects_decode_leniently() -> None:
    """A plain client's subject with a stray '%' or a code we never write stays as it is."""
    assert MAPPER.from_native("rate.100%") == "rate/100%"
    assert MAPPER.from_native("x.%41") == "x/%41"
    assert MAPPER.from_native("x.%2e") == "x/%2e"  # lower-case hex is not ours
    assert not needs_escape("A")
    assert needs_escape("%")
