"""Routing keys and options without a broker: escaping, limits, bad options, masked secrets."""

from __future__ import annotations

import pytest
from cascade_bus_amqp import AmqpOptions, binding_key, routing_key, topic_from_key
from hypothesis import given
from hypothesis import strategies as st

from cascade_bus import InvalidTopic, InvalidURL, UnsupportedFeature
from cascade_bus.spi import BusURL

LEVEL = st.text(
    alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="/+#\x00"),
    min_size=1,
    max_size=8,
)


@pytest.mark.parametrize(
    ("topic", "key"),
    [
        ("a/b/c", "a.b.c"),
        ("a.b/c", "a%2Eb.c"),
        ("x*/y%", "x%2A.y%25"),
        ("lit#/z", "lit%23.z"),
        ("$SYS/ünï", "$SYS.ünï"),
    ],
)
def test_routing_keys(topic: str, key: str) -> None:
    assert routing_key(topic) == key
    assert topic_from_key(key) == topic


def test_binding_keys() -> None:
    assert binding_key("a/+/c") == "a.*.c"
    assert binding_key("a/#") == "a.#"
    assert binding_key("+/x.y/#") == "*.x%2Ey.#"


@given(st.lists(LEVEL, min_size=1, max_size=5))
def test_round_trip_is_a_bijection(levels: list[str]) -> None:
    topic = "/".join(levels)
    key = routing_key.__wrapped__(topic)
    assert topic_from_key.__wrapped__(key) == topic
    assert len(key.split(".")) == len(levels)  # one word per level: wildcards stay exact


def test_routing_key_limit() -> None:
    with pytest.raises(InvalidTopic, match="255"):
        routing_key("a/" + "x" * 300)


def test_foreign_percent_keys_pass_unchanged() -> None:
    assert topic_from_key("a.%41.b") == "a/%41/b"


def test_options_parse_vhost_and_defaults() -> None:
    opts = AmqpOptions.parse(BusURL("amqp://u:s3cret@h:5673/my%2Fvhost"), {"prefetch": "5"})
    assert (opts.host, opts.port, opts.vhost, opts.prefetch) == ("h", 5673, "my/vhost", 5)
    assert opts.exchange == "cascade_bus"
    assert "s3cret" not in repr(opts)
    tls = AmqpOptions.parse(BusURL("amqps://h"), {})
    assert (tls.port, tls.username, tls.network.tls is not None) == (5671, "guest", True)


@pytest.mark.parametrize(
    "options",
    [{"nope": "1"}, {"exchange": "amq.topic"}, {"exchange": "a b"}, {"prefetch": "0"}],
)
def test_bad_options_are_invalid_url(options: dict[str, str]) -> None:
    with pytest.raises(InvalidURL):
        AmqpOptions.parse(BusURL("amqp://u:s3cret@h/"), options)


def test_last_will_is_unsupported() -> None:
    with pytest.raises(UnsupportedFeature, match="last will"):
        AmqpOptions.parse(BusURL("amqp://h/"), {"will_topic": "a/b"})


def test_unreadable_tls_files_are_invalid_url() -> None:
    with pytest.raises(InvalidURL, match="amqps"):
        AmqpOptions.parse(BusURL("amqps://h"), {"ca_file": "/nonexistent/ca.pem"})
