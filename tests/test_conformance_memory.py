"""The conformance suite against the in-process memory:// transport (no skips allowed)."""

from __future__ import annotations

from cascade_bus.testing import ConformanceSuite, with_query


class TestMemory(ConformanceSuite):
    url = "memory://conformance"


def test_with_query_appends_or_replaces() -> None:
    assert with_query("memory://x", format="raw") == "memory://x?format=raw"
    assert with_query("memory://", format="raw") == "memory://?format=raw"
    assert (
        with_query("mqtt://u:p@h:1883/?client_id=a&format=json", format="raw")
        == "mqtt://u:p@h:1883/?client_id=a&format=raw"
    )
    assert with_query("nats://h?x=1", format="msgpack") == "nats://h?x=1&format=msgpack"
    assert with_query("redis://h?empty=", a="b c") == "redis://h?empty=&a=b+c"
