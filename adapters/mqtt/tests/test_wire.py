"""The adapter's own packet path (`_Wire`): encoding, parsing, split reads, windows, big writes.

The pure cases check our encoder and decoder against paho's decoder on the same bytes. The
broker cases go through a real Mosquitto, some behind a proxy that hands the broker's bytes to
the client a few at a time, so that every packet arrives split at many different points.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import paho.mqtt.client as paho_mqtt
import pytest
from cascade_bus_mqtt._packets import (
    _Malformed,
    _parse_publish,
    _publish_packet,
    _remaining,
    _remaining_length,
)
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

import cascade_bus
from cascade_bus import PublishError
from cascade_bus.testing import with_query
from cascade_bus.testing.brokers import host_port

pytestmark = pytest.mark.mqtt

#: Bodies around the remaining-length boundaries (1, 2, 3 bytes) and beyond one 64 KiB read.
SIZES = [0, 1, 100, 124, 125, 126, 127, 128, 16_380, 16_384, 70_000, 2_097_152]


def split_fixed_header(packet: bytes) -> tuple[int, int, int]:
    """(command, body start, body end) of one whole packet, via the adapter's own decoder."""
    length, start = _remaining_length(packet, 1, len(packet))
    assert start > 0
    assert start + length == len(packet)
    return packet[0], start, len(packet)


def paho_decode_publish(command: int, body: bytes, protocol: int) -> Any:
    """paho's own PUBLISH decoder (an oracle) from its private module; None before 2.2."""
    try:
        from paho.mqtt import _packet
    except ImportError:  # paho-mqtt 2.1 decodes inside the client: no oracle
        return None
    return _packet.decode_publish(command, body, protocol)


def publish_properties(**values: Any) -> bytes:
    """An MQTT 5 PUBLISH property block packed by paho."""
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    for name, value in values.items():
        if isinstance(value, list) and name == "SubscriptionIdentifier":
            for item in value:
                setattr(props, name, item)
        else:
            setattr(props, name, value)
    packed: bytes = props.pack()  # type: ignore[no-untyped-call]
    return packed


# -- pure: the adapter's encoder and decoder agree with paho --------------------------------------


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("qos", [0, 1])
@pytest.mark.parametrize("v5", [True, False])
def test_publish_packets_decode_as_paho_decodes_them(size: int, qos: int, v5: bool) -> None:
    head = len(b"t/\xc3\xa9/x").to_bytes(2, "big") + b"t/\xc3\xa9/x"  # a non-ASCII topic
    body = bytes(range(256)) * (size // 256) + bytes(size % 256)
    props = b"\x00" if v5 else b""
    for retain in (False, True):
        packet = _publish_packet(head, body, qos, retain, props, 513 if qos else 0)
        command, start, stop = split_fixed_header(packet)
        protocol = paho_mqtt.MQTTv5 if v5 else paho_mqtt.MQTTv311
        ours = _parse_publish(command, packet, start, stop, v5)
        assert ours is not None
        topic, payload, got_qos, mid, dup, got_retain, headers, ids = ours
        assert (topic, payload) == ("t/é/x", body)
        assert (got_qos, mid, dup, got_retain) == (qos, 513 if qos else 0, False, retain)
        assert headers is None
        assert ids is None
        theirs = paho_decode_publish(command, packet[start:stop], protocol)
        if theirs is not None:
            assert (theirs.topic.decode(), bytes(theirs.payload)) == (topic, payload)
            assert (theirs.qos, theirs.mid, theirs.dup, theirs.retain) == ours[2:6]


def test_mqtt5_properties_we_read_and_those_we_skip() -> None:
    props = publish_properties(
        PayloadFormatIndicator=1,
        MessageExpiryInterval=10,
        ContentType="text/plain",
        ResponseTopic="reply/here",
        CorrelationData=b"\x00\x01",
        SubscriptionIdentifier=[5, 300, 2_000_000],
        UserProperty=[("ce-id", "1"), ("ünï", "cödé"), ("ce-id", "2")],
    )
    head = (3).to_bytes(2, "big") + b"a/b"
    packet = _publish_packet(head, b"body", 1, False, props, 7)
    command, start, stop = split_fixed_header(packet)
    ours = _parse_publish(command, packet, start, stop, True)
    assert ours is not None
    assert ours[:4] == ("a/b", b"body", 1, 7)
    # The last of a repeated name wins; Content Type is the CloudEvents datacontenttype.
    assert ours[6] == {"ce-id": "2", "ünï": "cödé", "content-type": "text/plain"}
    assert ours[7] == [5, 300, 2_000_000]
    theirs = paho_decode_publish(command, packet[start:stop], paho_mqtt.MQTTv5)
    if theirs is not None:
        assert {**dict(theirs.properties.UserProperty), "content-type": "text/plain"} == ours[6]
        assert theirs.properties.SubscriptionIdentifier == ours[7]


def test_a_repeated_property_block_reads_as_the_first() -> None:
    """A block seen just before (a structured body's Content Type, one subscription id) is
    taken from the last read; any other block is read anew."""
    head = (3).to_bytes(2, "big") + b"a/b"
    same = publish_properties(
        ContentType="application/cloudevents+json", SubscriptionIdentifier=[9]
    )
    other = publish_properties(
        ContentType="application/cloudevents+json", SubscriptionIdentifier=[8]
    )
    typed = publish_properties(ContentType="text/plain", SubscriptionIdentifier=[9])
    seen = []
    for props, body in [(same, b"1"), (same, b"2"), (other, b"3"), (typed, b"4"), (same, b"5")]:
        packet = _publish_packet(head, body, 1, False, props, 7)
        command, start, stop = split_fixed_header(packet)
        ours = _parse_publish(command, packet, start, stop, True)
        assert ours is not None
        seen.append((ours[1], ours[6], ours[7]))
    assert seen == [
        (b"1", None, [9]),
        (b"2", None, [9]),
        (b"3", None, [8]),
        (b"4", {"content-type": "text/plain"}, [9]),
        (b"5", None, [9]),
    ]


def _unusual_packets() -> list[tuple[str, bytes, bool]]:
    a_b = (3).to_bytes(2, "big") + b"a/b"
    alias = publish_properties(TopicAlias=3)
    return [
        ("topic alias (empty topic)", _publish_packet(b"\x00\x00", b"x", 0, False, alias, 0), True),
        ("topic alias on a named topic", _publish_packet(a_b, b"x", 1, False, alias, 1), True),
        ("topic not UTF-8", _publish_packet(b"\x00\x02\xff\xfe", b"x", 0, False, b"", 0), False),
        (
            "user property not UTF-8",
            _publish_packet(b"\x00\x01a", b"x", 0, False, b"\x07\x26\x00\x01\xff\x00\x01v", 0),
            True,
        ),
        (
            "user property past the properties",
            _publish_packet(b"\x00\x01a", b"", 0, False, b"\x05\x26\x00\x01k\x00\x05v", 0),
            True,
        ),
        (
            "subscription identifier of 5 bytes",
            _publish_packet(b"\x00\x01a", b"", 0, False, b"\x06\x0b\x80\x80\x80\x80\x01", 0),
            True,
        ),
        ("topic length past the packet", b"\x30\x03\x00\x09a", False),
        ("packet identifier missing", b"\x32\x03\x00\x01a", False),
        ("property length past the packet", b"\x30\x05\x00\x01a\x09x", True),
    ]


UNUSUAL = _unusual_packets()


@pytest.mark.parametrize(("what", "packet", "v5"), UNUSUAL, ids=[case[0] for case in UNUSUAL])
def test_unusual_publishes_are_left_to_paho(what: str, packet: bytes, v5: bool) -> None:
    length, start = _remaining_length(packet, 1, len(packet))
    assert start > 0, what
    assert _parse_publish(packet[0], packet, start, start + length, v5) is None, what


@pytest.mark.parametrize(
    "size", [0, 1, 127, 128, 16_383, 16_384, 2_097_151, 2_097_152, 268_435_455]
)
def test_remaining_length_round_trips(size: int) -> None:
    encoded = b"\x30" + _remaining(size)
    assert len(encoded) - 1 == 1 + (size > 127) + (size > 16_383) + (size > 2_097_151)
    assert _remaining_length(encoded, 1, len(encoded)) == (size, len(encoded))
    for cut in range(1, len(encoded)):  # not all there yet: no length
        assert _remaining_length(encoded[:cut], 1, cut)[1] == -1


def test_remaining_length_of_five_bytes_is_malformed() -> None:
    with pytest.raises(_Malformed):
        _remaining_length(b"\x30\xff\xff\xff\xff\x01", 1, 6)


# -- broker: packets split at every point ----------------------------------------------------------

#: Piece sizes the proxy cuts the broker's byte stream into, in turn.
PIECES = (1, 2, 3, 5, 8, 13, 200, 7_000)


class Dribble:
    """A TCP proxy that forwards the broker's bytes a few at a time (client's bytes whole).

    After each piece it yields to the event loop, so the client reads that piece before the
    next is written: packets (and their fixed headers) arrive split at many points.
    """

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.get_running_loop().create_task(self._link(reader, writer))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self.writers += [writer, up_writer]
        for w in (writer, up_writer):
            w.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await asyncio.gather(
            self._pump(reader, up_writer, whole=True),
            self._pump(up_reader, writer, whole=False),
            return_exceptions=True,
        )

    @staticmethod
    async def _pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, whole: bool) -> None:
        sizes = itertools.cycle(PIECES)
        try:
            while data := await src.read(65_536):
                if whole:
                    dst.write(data)
                    await dst.drain()
                    continue
                view = memoryview(data)
                while view:
                    size = next(sizes)
                    dst.write(bytes(view[:size]))
                    view = view[size:]
                    await dst.drain()
                    await asyncio.sleep(0)  # a yield (not a wait): the client reads this piece
        finally:
            dst.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for writer in self.writers:
            writer.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


@pytest.fixture
async def dribble() -> AsyncIterator[Callable[[str], Awaitable[str]]]:
    """``await dribble(url)``: the URL of a `Dribble` proxy in front of that broker."""
    proxies: list[Dribble] = []

    async def make(url: str) -> str:
        proxy = Dribble(*host_port(url))
        proxies.append(proxy)
        return f"mqtt://127.0.0.1:{await proxy.start()}"

    try:
        yield make
    finally:
        async with asyncio.timeout(5.0):
            for proxy in proxies:
                await proxy.close()


@pytest.mark.parametrize("version", ["5", "3.1.1"])
async def test_split_packets_arrive_whole_in_order(
    mqtt_url, dribble, unique_topic, kit, buses, version
):
    """Every size, QoS and header set survives reads that split each packet anywhere.

    Publisher and subscriber both read through the proxy, so PUBACK, PUBREC and PUBCOMP
    arrive split too; ``format=raw`` puts the headers in MQTT 5 user properties.
    """
    url = with_query(await dribble(mqtt_url), version=version, format="raw")
    sub = await cascade_bus.connect(url)
    buses.append(sub)
    pub = await cascade_bus.connect(url)
    buses.append(pub)
    inboxes = {qos: kit.Inbox() for qos in (0, 1, 2)}
    for qos, inbox in inboxes.items():
        await sub.subscribe(f"{unique_topic}/q{qos}", inbox, qos=qos)
    sizes = [size for size in SIZES if size < 1_000_000]
    headers = {"k": "v", "ünï": "cödé"} if version == "5" else None
    for qos in (0, 1, 2):
        for size in sizes:
            body = bytes([qos + 1]) * size + size.to_bytes(4, "big")
            await pub.publish(f"{unique_topic}/q{qos}", body, qos=qos, headers=headers)
    for qos, inbox in inboxes.items():
        payloads = await inbox.wait_for(len(sizes))
        expected = [bytes([qos + 1]) * size + size.to_bytes(4, "big") for size in sizes]
        assert payloads == expected, qos
        if headers is not None:
            assert all(headers.items() <= env.headers.items() for env in inbox.envelopes)
    await pub.flush()
    assert pub.stats().published == 3 * len(sizes)


# -- broker: large writes, the in-flight window --------------------------------------------------


@pytest.mark.parametrize("qos", [0, 1])
async def test_a_write_larger_than_the_socket_takes_goes_out_whole(
    mqtt_url, unique_topic, kit, buses, qos
):
    """An 8 MB body is more than one send takes: the rest follows through paho's queue."""
    sub = await cascade_bus.connect(mqtt_url)
    buses.append(sub)
    pub = await cascade_bus.connect(mqtt_url)
    buses.append(pub)
    inbox = kit.Inbox()
    await sub.subscribe(f"{unique_topic}/big", inbox, qos=qos)
    big = bytes(range(251)) * (8 * 1024 * 1024 // 251)
    await pub.publish(f"{unique_topic}/big", big, qos=qos)
    await pub.publish(f"{unique_topic}/big", b"after", qos=qos)  # queued behind the rest
    assert await inbox.wait_for(2) == [big, b"after"]


async def test_the_window_holds_publishes_back_and_releases_them_in_order(
    mqtt_url, unique_topic, kit, buses
):
    """With ``max_inflight=3`` at most three are unacknowledged; the rest follow in order."""
    sub = await cascade_bus.connect(mqtt_url)
    buses.append(sub)
    pub = await cascade_bus.connect(mqtt_url, max_inflight=3)
    buses.append(pub)
    inbox = kit.Inbox()
    await sub.subscribe(f"{unique_topic}/w", inbox, qos=1)
    transport = kit.mqtt(pub)
    sends = asyncio.gather(*(pub.publish(f"{unique_topic}/w", n, qos=1) for n in range(300)))
    await asyncio.sleep(0)  # a yield: each publish has been handed to the transport
    assert len(transport._inflight.sent) == 3
    assert len(transport._inflight.waiting) == 297
    async with asyncio.timeout(kit.WAIT):
        await sends
    assert await inbox.wait_for(300) == list(range(300))
    assert not transport._inflight.sent
    assert not transport._inflight.waiting


async def test_waiting_publishes_are_resent_in_order_after_a_cut(
    private_mosquitto, tcp_proxy, unique_topic, kit, buses
):
    """Unacknowledged, then window-held, then offline: resent in the order of the calls."""
    broker = private_mosquitto()
    proxy = await tcp_proxy(broker.url)
    sub = await cascade_bus.connect(broker.url)
    buses.append(sub)
    inbox = kit.Inbox()
    await sub.subscribe(f"{unique_topic}/r", inbox, qos=1)
    pub = await cascade_bus.connect(proxy.url_for("mqtt"), max_inflight=2, **kit.FAST_RECONNECT)
    buses.append(pub)
    transport = kit.mqtt(pub)
    first = asyncio.gather(*(pub.publish(f"{unique_topic}/r", n, qos=1) for n in range(100)))
    await asyncio.sleep(0)  # a yield: two in flight, 98 held by the window
    assert len(transport._inflight.waiting) == 98
    proxy.pause()  # reconnect attempts are refused until resume()
    assert await proxy.cut() == 1
    await kit.wait_disconnected(pub)
    async with asyncio.timeout(kit.WAIT):
        await first  # every one acknowledged before the cut, or buffered since
        for n in range(100, 120):  # offline: buffered behind the requeued ones
            await pub.publish(f"{unique_topic}/r", n, qos=1)
    assert transport.buffered > 20
    proxy.resume()
    await kit.wait_connected(pub, reconnects=1)
    await inbox.wait_until(lambda: set(inbox.payloads) >= set(range(120)), "all 120")
    firsts = list(dict.fromkeys(inbox.payloads))  # first arrivals (resent ones may repeat)
    assert firsts == list(range(120))


@pytest.mark.parametrize("qos", [1, 2])
async def test_a_publish_the_broker_refuses_raises_and_the_next_goes_through(
    private_mosquitto, tmp_path, unique_topic, kit, buses, qos
):
    """MQTT 5: a PUBACK (QoS 1) or PUBREC (QoS 2) with a failure code fails that publish only.

    Mosquitto 2.0.11 then closes the connection (a bare paho client sees the same): the next
    publish may be resent after the reconnect, so the window is checked once ``flush()``
    returned, not when the subscriber has the message (it gets it before our PUBACK).
    """
    acl = tmp_path / "acl"
    acl.write_text(
        "user bob\ntopic readwrite _cascade_bus/#\n"  # the adapter's barriers
        f"topic readwrite {unique_topic}/ok/#\ntopic read {unique_topic}/no\n"
    )
    broker = private_mosquitto(users={"bob": "pw"}, extra_config=f"acl_file {acl}\n")
    url = f"mqtt://bob:pw@127.0.0.1:{broker.port}"
    pub = await cascade_bus.connect(url)
    buses.append(pub)
    sub = await cascade_bus.connect(url)
    buses.append(sub)
    inbox = kit.Inbox()
    await sub.subscribe(f"{unique_topic}/ok/#", inbox, qos=qos)
    with pytest.raises(PublishError, match="Not authorized") as refused:
        await pub.publish(f"{unique_topic}/no", {"n": 0}, qos=qos)
    assert refused.value.topic == f"{unique_topic}/no"
    await pub.publish(f"{unique_topic}/ok/1", {"n": 1}, qos=qos)
    assert await inbox.wait_for(1) == [{"n": 1}]
    assert pub.stats().dropped == {"publish_failed": 1}
    await pub.flush()
    assert not kit.mqtt(pub)._inflight.sent
