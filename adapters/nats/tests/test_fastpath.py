"""The fast paths into nats-py: header parsing, header writing, flow control, fallback parity."""

from __future__ import annotations

import asyncio
import itertools
from types import MappingProxyType
from typing import Any

import nats
import pytest
from cascade_bus_nats import NatsTopicMapper
from cascade_bus_nats._fastpath import cached_headers, install_parser, parse_headers
from cascade_bus_nats._wire import WithMsgId, split_headers
from cascade_bus_nats._writer import _header_block
from hypothesis import given, settings
from hypothesis import strategies as st
from nats.protocol.parser import Parser

import cascade_bus
from cascade_bus import PublishError
from cascade_bus.spi import WithId

MAPPER = NatsTopicMapper()


@pytest.mark.parametrize(
    ("raw", "parsed"),
    [
        (b"NATS/1.0\r\nA: b\r\n\r\n", {"A": "b"}),
        (b"NATS/1.0\r\nce-id:  x y  \r\nc:\r\n\r\n", {"ce-id": "x y", "c": ""}),
        (b"NATS/1.0\r\nbad key: 1\r\nok: 2\r\n\r\n", {"ok": "2"}),  # names have no spaces
        (b"NATS/1.0 503\r\n\r\n", {"Status": "503"}),
        (b"NATS/1.0 404 No Messages\r\n\r\n", {"Status": "404", "Description": "No Messages"}),
        (
            b"NATS/1.0 100 Idle Heartbeat\r\nNats-Last-Consumer: 7\r\n\r\n",
            {"Status": "100", "Description": "Idle Heartbeat", "Nats-Last-Consumer": "7"},
        ),
        ("NATS/1.0\r\nk: ünï: x\r\n\r\n".encode(), {"k": "ünï: x"}),
        (b"NATS/1.0\r\nk: \xff\r\n\r\n", {"k": "\ufffd"}),  # bad UTF-8 is replaced, not fatal
    ],
)
def test_parse_headers(raw: bytes, parsed: dict[str, str]) -> None:
    assert parse_headers(raw) == parsed


_name = st.sampled_from(["ce-id", "Nats-Msg-Id", "ce-source", "content-type", "Status", "k"])
_value = st.text(alphabet="ab:% \t-", max_size=8)


@given(
    lines=st.lists(st.tuples(_name, _value), max_size=4),
    status=st.sampled_from(["", " 503"]),
)
def test_cached_headers_read_as_parse_headers(lines: list[tuple[str, str]], status: str) -> None:
    """Blocks whose last line is a per-message id are split from their cached rest."""
    raw = (f"NATS/1.0{status}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in lines) + "\r\n").encode()
    for _ in range(2):  # the second read hits the cache
        assert dict(cached_headers(raw)) == parse_headers(raw)


def test_a_qos1_id_is_framed_after_the_constant_block() -> None:
    constant = MappingProxyType({"content-type": "application/cloudevents+json"})
    framed = _header_block(WithMsgId(constant, "cbus:me:7"), set())
    assert framed == _header_block({**constant, "Nats-Msg-Id": "cbus:me:7"}, set())
    assert _header_block(WithMsgId(MappingProxyType({}), "x"), set()) == (
        b"NATS/1.0\r\nNats-Msg-Id: x\r\n\r\n"
    )


def test_same_length_constant_parts_are_not_confused() -> None:
    one = cached_headers(b"NATS/1.0\r\nk: aaaa\r\nNats-Msg-Id: 1\r\n\r\n")
    two = cached_headers(b"NATS/1.0\r\nk: bbbb\r\nNats-Msg-Id: 2\r\n\r\n")
    assert dict(one) == {"k": "aaaa", "Nats-Msg-Id": "1"}
    assert dict(two) == {"k": "bbbb", "Nats-Msg-Id": "2"}


def test_a_per_message_id_shares_the_rest_of_its_block() -> None:
    base = b"NATS/1.0\r\ncontent-type: application/cloudevents+json\r\n"
    first = cached_headers(base + b"Nats-Msg-Id: cbus:me:1\r\n\r\n")
    second = cached_headers(base + b"Nats-Msg-Id: cbus:other:2\r\n\r\n")
    assert isinstance(first, WithMsgId)
    assert isinstance(second, WithMsgId)
    assert first.base is second.base
    # Our own id is the adapter's (dropped, the shared rest handed on as it is); another
    # publisher's stays for the handler to see.
    assert split_headers(first, "cbus:me:")[0] is first.base
    assert split_headers(second, "cbus:me:") == (second, None)
    assert dict(second) == {"content-type": "application/cloudevents+json",
                            "Nats-Msg-Id": "cbus:other:2"}  # fmt: skip
    one = cached_headers(b"NATS/1.0\r\nce-source: s\r\nce-id: 1\r\n\r\n")
    two = cached_headers(b"NATS/1.0\r\nce-source: s\r\nce-id: 2\r\n\r\n")
    assert isinstance(one, WithId)
    assert isinstance(two, WithId)
    assert one.base is two.base
    assert (one["ce-id"], two["ce-id"]) == ("1", "2")


@pytest.mark.nats
async def test_header_values_cannot_inject_and_bad_names_are_refused(
    nats_url, unique_topic, buses, api
):
    bus = await cascade_bus.connect(nats_url, format="raw")
    buses.append(bus)
    nc = await nats.connect(nats_url)
    try:
        sub = await nc.subscribe(MAPPER.to_native(f"{unique_topic}/h"))
        await nc.flush()
        await nc.flush()  # the first PING may overtake the SUB (nats-py writes it directly)
        # "X-Note" is no attribute name: a plain header, whose CR/LF the writer replaces;
        # "x" is an extension attribute: ce-x, percent-encoded as the NATS binding says.
        headers = {"X-Note": "a\r\nInjected: yes", "x": "b\r\nInjected: yes"}
        await bus.publish(f"{unique_topic}/h", 1, headers=headers)
        msg = await sub.next_msg(timeout=5)
        assert msg.headers is not None
        assert "Injected" not in msg.headers
        assert msg.headers["X-Note"] == "a  Injected: yes"
        assert msg.headers["ce-x"] == "b%0D%0AInjected:%20yes"
        for bad in ("has space", "colon:", "new\r\nline", "ünï"):
            with pytest.raises(PublishError):
                await bus.publish(f"{unique_topic}/h", 1, headers={bad: "v"})
        await bus.publish(f"{unique_topic}/h", 2)
        assert (await sub.next_msg(timeout=5)).data == b"2"  # the connection is still fine
    finally:
        await nc.close()


@pytest.mark.nats
async def test_slow_handler_at_qos0_backlog_keeps_everything_in_order(
    nats_url, unique_topic, buses, api
):
    """The sink fills up (``buffer_size=4``): the receive path holds messages, none dropped."""
    sub = await cascade_bus.connect(nats_url, buffer_size=4)
    pub = await cascade_bus.connect(nats_url)
    buses.extend([sub, pub])
    got: list[int] = []
    done = asyncio.Event()

    async def slow(env: cascade_bus.Envelope[Any]) -> None:
        await asyncio.sleep(0)  # yields: the publisher runs ahead
        got.append(env.payload)
        if len(got) == 2000:
            done.set()

    await sub.subscribe(f"{unique_topic}/slow", slow)
    for i in range(2000):
        await pub.publish(f"{unique_topic}/slow", i)
    async with asyncio.timeout(10):
        await done.wait()
    assert got == list(range(2000))
    assert sub.stats().dropped_total == 0


# -- the offset-walking protocol parser is nats-py's parser, only faster ------------------------

token = st.text(alphabet="abcXYZ019._-$%*>", min_size=1, max_size=12)
body = st.binary(max_size=300)


@st.composite
def frame(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["MSG", "HMSG", "PING", "PONG", "+OK"]))
    if kind in ("PING", "PONG", "+OK"):
        return kind.encode() + b"\r\n"
    subject = draw(token).encode()
    sid = draw(st.integers(1, 10_000))
    reply = draw(st.one_of(st.just(b""), token.map(str.encode)))
    data = draw(body)
    reply_part = b" " + reply if reply else b""
    if kind == "MSG":
        return b"MSG %s %d%s %d\r\n%s\r\n" % (subject, sid, reply_part, len(data), data)
    block = (
        b"NATS/1.0\r\n"
        + b"".join(
            b"%s: %s\r\n" % (k.encode(), v.encode())
            for k, v in draw(st.dictionaries(token, token, max_size=3)).items()
        )
        + b"\r\n"
    )
    return b"HMSG %s %d%s %d %d\r\n%s%s\r\n" % (
        subject, sid, reply_part, len(block), len(block) + len(data), block, data,
    )  # fmt: skip


class _Recorder:
    """Stands in for the nats-py client behind a parser: records what the parser hands over."""

    def __init__(self) -> None:
        self.seen: list[tuple[Any, ...]] = []

    async def _process_msg(self, sid, subject, reply, data, headers) -> None:
        self.seen.append(("msg", sid, bytes(subject), bytes(reply), data, headers))

    async def _process_ping(self) -> None:
        self.seen.append(("ping",))

    async def _process_pong(self) -> None:
        self.seen.append(("pong",))


class _AllRoutes(dict[int, Any]):
    """Routes for every subscription id, recording as `_Recorder` does (headers parsed)."""

    def __init__(self, client: _Recorder) -> None:
        super().__init__()
        self.client = client

    def get(self, sid: int, default: Any = None) -> Any:
        def route(subject: str, reply: str, data: bytes, headers: Any) -> None:
            self.client.seen.append(("msg", sid, subject.encode(), reply.encode(), data,
                                     None if headers is None else dict(headers)))  # fmt: skip

        return route


async def _run_parser(
    stream: bytes, cuts: list[int], fast: bool, routed: bool = False
) -> list[tuple[Any, ...]]:
    client = _Recorder()
    parser = Parser(client)
    if fast:
        client._ps = parser  # type: ignore[attr-defined]
        install_parser(client, _AllRoutes(client) if routed else None)  # type: ignore[arg-type]
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    for start, end in itertools.pairwise(points):
        await parser.parse(stream[start:end])
    return client.seen


@given(
    frames=st.lists(frame(), min_size=1, max_size=40),
    cuts=st.lists(st.integers(0, 100_000), max_size=12),
)
@settings(max_examples=300, deadline=None)
async def test_fast_parser_hands_over_exactly_what_nats_py_does(
    frames: list[bytes], cuts: list[int]
) -> None:
    stream = b"".join(frames)
    expected = await _run_parser(stream, cuts, fast=False)
    assert await _run_parser(stream, cuts, fast=True) == expected
    assert len(expected) == sum(1 for f in frames if not f.startswith(b"+OK"))
    # Complete frames of routed subscriptions skip `_process_msg`: the same, headers parsed.
    routed = await _run_parser(stream, cuts, fast=True, routed=True)
    assert [_parsed(seen) for seen in routed] == [_parsed(seen) for seen in expected]


def _parsed(seen: tuple[Any, ...]) -> tuple[Any, ...]:
    """A record with its headers as a dict, whether they were handed over raw or parsed."""
    if seen[0] != "msg" or seen[5] is None:
        return seen
    headers = seen[5]
    return (*seen[:5], parse_headers(headers) if isinstance(headers, bytes) else dict(headers))
