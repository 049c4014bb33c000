"""Portable topic syntax: validation tables, MQTT 3.1.1 §4.7 matching, and a reference model."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cascade_bus import BusError, InvalidTopic, topic_matches, validate_pattern, validate_topic
from cascade_bus._topics import MAX_TOPIC_BYTES

# -- validation tables ------------------------------------------------------------------------

VALID_TOPICS = [
    "a",
    "a/b",
    "sport/tennis/player1",
    "$SYS/broker/load",
    "a b/c d",  # spaces are ordinary characters
    "ünïcode/τοπικό/話題",
    "x" * MAX_TOPIC_BYTES,  # exactly at the limit
    "é" * (MAX_TOPIC_BYTES // 2) + "x",  # 2-byte characters: 65535 bytes in 32768 chars
]

# (topic, a fragment the error message must contain)
INVALID_TOPICS = [
    ("", "empty"),
    ("a//b", "empty level"),
    ("/a", "empty level"),
    ("a/", "empty level"),
    ("/", "empty level"),
    ("a\x00b", "NUL"),
    ("a/+", "wildcard"),
    ("a/#", "wildcard"),
    ("+", "wildcard"),
    ("#", "wildcard"),
    ("a+b", "wildcard"),
    ("a/b#", "wildcard"),
    ("x" * (MAX_TOPIC_BYTES + 1), "65535"),
    ("é" * (MAX_TOPIC_BYTES // 2 + 1), "65535"),  # 32768 chars but 65536 bytes
    ("話" * (MAX_TOPIC_BYTES // 3 + 1), "65535"),  # 3-byte characters: 65538 bytes
]

VALID_PATTERNS = [
    "a",
    "a/b",
    "+",
    "#",
    "a/+",
    "a/#",
    "+/+",
    "+/b/#",
    "sport/tennis/+/score/#",
    "$SYS/#",
    "x" * MAX_TOPIC_BYTES,
]

INVALID_PATTERNS = [
    ("", "empty"),
    ("a//b", "empty level"),
    ("/a", "empty level"),
    ("a/", "empty level"),
    ("/#", "empty level"),
    ("a/\x00", "NUL"),
    ("a/b#", "whole level"),
    ("a#", "whole level"),
    ("+a", "whole level"),
    ("a/b+", "whole level"),
    ("a/+b/c", "whole level"),
    ("a/#/b", "last level"),
    ("#/a", "last level"),
    ("#/#", "last level"),
    ("x" * (MAX_TOPIC_BYTES + 1), "65535"),
    ("é" * (MAX_TOPIC_BYTES // 2 + 1), "65535"),
]

NOT_STRINGS: list[Any] = [None, 1, b"a/b", ["a"], ("a", "b")]


@pytest.mark.parametrize("topic", VALID_TOPICS, ids=lambda t: repr(t[:20]))
def test_valid_topic_is_returned_unchanged(topic: str) -> None:
    assert validate_topic(topic) == topic


@pytest.mark.parametrize(("topic", "fragment"), INVALID_TOPICS, ids=lambda t: repr(t)[:20])
def test_invalid_topic_raises_with_reason(topic: str, fragment: str) -> None:
    with pytest.raises(InvalidTopic) as info:
        validate_topic(topic)
    assert fragment in str(info.value)
    assert isinstance(info.value, BusError)
    assert isinstance(info.value, ValueError)
    # The attribute holds the topic (shortened when huge), never something unrelated.
    assert info.value.topic[:20] == topic[:20]
    assert len(info.value.topic) <= 100


@pytest.mark.parametrize("pattern", VALID_PATTERNS, ids=lambda t: repr(t[:20]))
def test_valid_pattern_is_returned_unchanged(pattern: str) -> None:
    assert validate_pattern(pattern) == pattern


@pytest.mark.parametrize(("pattern", "fragment"), INVALID_PATTERNS, ids=lambda t: repr(t)[:20])
def test_invalid_pattern_raises_with_reason(pattern: str, fragment: str) -> None:
    with pytest.raises(InvalidTopic, match=fragment):
        validate_pattern(pattern)


@pytest.mark.parametrize("value", NOT_STRINGS, ids=repr)
def test_non_str_topic_is_rejected(value: Any) -> None:
    with pytest.raises(InvalidTopic, match=f"must be a str, not {type(value).__name__}"):
        validate_topic(value)


@pytest.mark.parametrize("value", NOT_STRINGS, ids=repr)
def test_non_str_pattern_is_rejected(value: Any) -> None:
    with pytest.raises(InvalidTopic, match=f"must be a str, not {type(value).__name__}"):
        validate_pattern(value)


def test_error_message_names_the_topic() -> None:
    with pytest.raises(InvalidTopic, match="'sensors//temp'"):
        validate_topic("sensors//temp")
    with pytest.raises(InvalidTopic, match=r"'a/#/b'"):
        validate_pattern("a/#/b")


def test_huge_topic_is_shortened_in_the_message() -> None:
    topic = "a/" + "b" * 200 + "/+"
    with pytest.raises(InvalidTopic) as info:
        validate_topic(topic)
    assert topic not in str(info.value)
    assert "..." in str(info.value)


def test_every_valid_topic_is_a_valid_pattern() -> None:
    for topic in VALID_TOPICS:
        assert validate_pattern(topic) == topic


# -- matching: MQTT 3.1.1 §4.7 examples ---------------------------------------------------

MATCHES = [
    # §4.7.1.2 multi-level wildcard
    ("sport/tennis/player1/#", "sport/tennis/player1", True),
    ("sport/tennis/player1/#", "sport/tennis/player1/ranking", True),
    ("sport/tennis/player1/#", "sport/tennis/player1/score/wimbledon", True),
    ("sport/tennis/player1/#", "sport/tennis/player2", False),
    ("sport/tennis/player1/#", "sport/tennis", False),
    ("sport/#", "sport", True),
    ("sport/#", "sports", False),
    ("#", "sport/tennis/player1", True),
    ("#", "a", True),
    # §4.7.1.3 single-level wildcard
    ("sport/tennis/+", "sport/tennis/player1", True),
    ("sport/tennis/+", "sport/tennis/player2", True),
    ("sport/tennis/+", "sport/tennis/player1/ranking", False),
    ("sport/+", "sport", False),
    ("+", "sport", True),
    ("+", "sport/tennis", False),
    ("+/tennis/#", "sport/tennis", True),
    ("+/tennis/#", "sport/tennis/player1", True),
    ("+/tennis/#", "sport/golf", False),
    ("sport/+/player1", "sport/tennis/player1", True),
    ("+/+", "a/b", True),
    ("+/+", "a/b/c", False),
    ("a/+/#", "a", False),
    ("a/+/#", "a/b", True),
    # exact
    ("a/b", "a/b", True),
    ("a/b", "a/c", False),
    ("a/b", "a/b/c", False),
    ("a/b/c", "a/b", False),
    ("A/b", "a/b", False),  # case-sensitive
    # §4.7.2 topics beginning with $
    ("#", "$SYS/x", False),
    ("+/x", "$SYS/x", False),
    ("+", "$SYS", False),
    ("+/#", "$SYS/x", False),
    ("$SYS/#", "$SYS/x", True),
    ("$SYS/#", "$SYS", True),
    ("$SYS/+", "$SYS/x", True),
    ("$SYS/x", "$SYS/x", True),
    ("$SYS/monitor/+", "$SYS/monitor/Clients", True),
    ("a/+", "a/$x", True),  # only a leading $ level is special
    ("a/#", "a/$x/y", True),
]


@pytest.mark.parametrize(("pattern", "topic", "expected"), MATCHES)
def test_topic_matches_table(pattern: str, topic: str, expected: bool) -> None:
    assert topic_matches(pattern, topic) is expected


# -- an independent reference model, compared by hypothesis --------------------------------


def reference_matches(pattern: str, topic: str) -> bool:
    """Straight from the MQTT 3.1.1 text, level by level, recursively."""
    p_levels = pattern.split("/")
    t_levels = topic.split("/")
    if t_levels[0].startswith("$") and p_levels[0] in ("+", "#"):
        return False

    def match(p: list[str], t: list[str]) -> bool:
        if not p:
            return not t
        head = p[0]
        if head == "#":
            return True  # the rest, including nothing (so "a/#" matches "a")
        if not t:
            return False
        if head == "+" or head == t[0]:
            return match(p[1:], t[1:])
        return False

    return match(p_levels, t_levels)


LEVELS = ["a", "b", "ab", "$SYS", "$x", "é"]
levels = st.sampled_from(LEVELS)
topics = st.lists(levels, min_size=1, max_size=5).map("/".join)


@st.composite
def patterns(draw: st.DrawFn) -> str:
    body = draw(st.lists(st.one_of(levels, st.just("+")), min_size=0, max_size=5))
    if not body or draw(st.booleans()):
        body.append("#")
    return "/".join(body)


@st.composite
def pattern_from_topic(draw: st.DrawFn) -> tuple[str, str]:
    """A pattern derived from a topic, so that matches are common, then maybe perturbed."""
    topic_levels = draw(st.lists(levels, min_size=1, max_size=5))
    pattern_levels = ["+" if draw(st.integers(0, 3)) == 0 else level for level in topic_levels]
    if draw(st.booleans()):
        cut = draw(st.integers(0, len(pattern_levels)))
        pattern_levels = [*pattern_levels[:cut], "#"]
    elif draw(st.integers(0, 3)) == 0:
        pattern_levels.append(draw(st.one_of(levels, st.just("+"))))  # one level too many
    elif len(pattern_levels) > 1 and draw(st.booleans()):
        pattern_levels.pop()  # one level too few
    return "/".join(pattern_levels), "/".join(topic_levels)


@settings(max_examples=400, deadline=None)
@given(pattern=patterns(), topic=topics)
def test_topic_matches_agrees_with_reference(pattern: str, topic: str) -> None:
    validate_pattern(pattern)
    validate_topic(topic)
    assert topic_matches(pattern, topic) is reference_matches(pattern, topic)


@settings(max_examples=400, deadline=None)
@given(pair=pattern_from_topic())
def test_topic_matches_agrees_with_reference_on_near_misses(pair: tuple[str, str]) -> None:
    pattern, topic = pair
    validate_pattern(pattern)
    assert topic_matches(pattern, topic) is reference_matches(pattern, topic)


@settings(max_examples=200, deadline=None)
@given(topic=topics)
def test_topic_matches_itself_and_hash_unless_dollar(topic: str) -> None:
    assert topic_matches(topic, topic)
    assert topic_matches("#", topic) is (not topic.startswith("$"))
    first = topic.split("/", 1)[0]
    # a/# matches a, and everything below a, whatever the first level is ($ included).
    assert topic_matches(f"{first}/#", topic)
    assert topic_matches(f"{topic}/#", topic)
    # + stands for exactly one level.
    plus = "/".join("+" for _ in topic.split("/"))
    assert topic_matches(plus, topic) is (not topic.startswith("$"))
    assert not topic_matches(plus + "/+", topic)


@settings(max_examples=100, deadline=None)
@given(first=levels)
def test_parent_level_matched_by_hash(first: str) -> None:
    assert topic_matches(f"{first}/#", first)
    assert not topic_matches(f"{first}/+", first)
