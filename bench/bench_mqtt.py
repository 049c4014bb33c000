"""MQTT throughput and latency: cascade-bus against bare aiomqtt and paho, one run.

Not a test: run it and read the table.

    .venv/bin/python bench/bench_mqtt.py [--messages N] [--pings K] [--repeat R] [--markdown]

The default run (5,000 messages, 500 pings, 20 fresh subscriptions, 5 rounds) takes about two
minutes on 2 CPUs.

Every row runs against the broker users have: the running stock Mosquitto (``--url``, default
``mqtt://127.0.0.1:1883``: ``set_tcp_nodelay`` off, so the broker keeps Nagle's algorithm on).
Rows marked "tuned broker" run the same cascade-bus case on a private Mosquitto
(``start_mosquitto``: ``set_tcp_nodelay true``, ``max_queued_messages 0``) started on a free
port and stopped at the end (``--no-tuned`` skips them). Every client sets TCP_NODELAY
(cascade-bus does by default; the bare clients are given the socket option).

Throughput (msg/s, median of R repeats): a publisher and a subscriber on two connections in
this process; the clock runs from the first publish until the subscriber has all N messages.
Ratios are medians of per-round ratios (both sides of a ratio ran in the same round, under the
same load). ``CPU µs/msg`` is this process's CPU time (all threads, publisher and subscriber,
connection setup included) per message: it moves much less than msg/s when the machine is
shared. The bare clients publish a 100-byte body; cascade-bus publishes a small dict, which goes on
the wire as a CloudEvents JSON envelope (its size is in the ``wire B`` column).

- ``cascade-bus awaited``: ``await bus.publish(...)`` in a loop; a handler subscription.
- ``cascade-bus gathered``: ``asyncio.gather`` of ``--chunk`` publishes at a time.
- ``aiomqtt naive``: ``await client.publish(...)`` in a loop; ``async for m in client.messages``.
- ``aiomqtt gathered``: ``asyncio.gather`` of ``--chunk`` publishes at a time (its "pending
  publish calls" warning silenced); the same receiving loop (aiomqtt has no other).
- ``paho threads``: paho-mqtt with ``loop_start()`` (its own network threads), the publisher
  calling ``publish`` from the main thread: a reference, not a target.

Ping-pong (µs, p50/p99 of K round trips, median over repeats): client A publishes a ping,
client B (another connection) receives it and publishes a pong, A waits for the pong before
the next ping. Both legs use the row's QoS, so a round trip crosses the broker twice.

QoS 1 publish round trip (µs, p50/p99 of K publishes, median over repeats): from the publish
call until it returns (its PUBACK arrived), one at a time, to a topic nobody subscribes to.
``raw socket`` is the floor: a blocking socket sending a hand-made PUBLISH and reading the
PUBACK, no MQTT library and no event loop; what a row adds to it is the client's own share.

First message after a fresh subscribe (ms, p50/p90 of ``--fresh`` samples per round, rounds
pooled): a subscriber subscribes to a new topic (``subscribe`` returned), another connection
publishes one message, the clock runs from that publish call until the handler has it; then
the subscription is dropped and the next one made. "steady": the same, one message at a time on
one subscription. For MQTT 5 and 3.1.1, QoS 0 and 1, against bare aiomqtt and against
cascade-bus with ``tcp_quickack=false`` (what it did before issue 13: ~44 ms for the first
message, the broker's Nagle waiting on the subscriber's delayed ACK).

Targets (from the MQTT adapter's issues), checked like for like on the stock broker:
cascade-bus awaited ≥ 1.5x aiomqtt naive, cascade-bus gathered ≥ 1.0x aiomqtt gathered (at QoS 0
and QoS 1); QoS 1 round trip p50 ≤ 1 ms; at QoS 0 at most 30 µs added to the bare aiomqtt round
trip p50; the first message after a fresh subscribe p90 ≤ 5 ms and one at a time p50 ≤ 1 ms, at
QoS 0 and 1 with MQTT 5 and 3.1.1. The exit status is 1 when a target is missed.

The stock broker drops what waits beyond ``max_queued_messages`` (1,000) for a subscriber that
falls behind: a throughput round whose subscriber stops receiving (3 s without a message) has
no rate; the ``lossy`` column counts those rounds and the ratios leave them out.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import math
import os
import platform
import socket
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from importlib.metadata import version
from typing import Any
from urllib.parse import urlsplit

import aiomqtt
import paho.mqtt.client as paho_mqtt
from paho.mqtt.enums import CallbackAPIVersion

import cascade_bus
from cascade_bus import Envelope
from cascade_bus.testing.brokers import BrokerProcess, start_mosquitto

BODY = b"x" * 100
PAYLOAD: dict[str, Any] = {"seq": 1, "value": 21.5, "unit": "C", "ok": True}
NODELAY = ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),)
RECEIVE_TIMEOUT = 60.0  # seconds a throughput run may take before it counts as failed
IDLE_TIMEOUT = 3.0  # seconds without a new message: the broker dropped the rest

TARGET_VS_NAIVE = 1.5
TARGET_VS_GATHERED = 1.0
TARGET_QOS1_P50_US = 1000.0
TARGET_ADDED_P50_US = 30.0
TARGET_FIRST_P90_MS = 5.0  # first message after a fresh subscribe, stock broker
TARGET_STEADY_P50_MS = 1.0  # one message at a time, stock broker

# aiomqtt warns once per publish while more than 10 are pending: silence it for gathering.
QUIET = logging.getLogger("bench.aiomqtt")
QUIET.setLevel(logging.ERROR)
QUIET.addHandler(logging.NullHandler())
QUIET.propagate = False


TUNED = ", tuned broker"  # suffix of the rows run on the private tuned Mosquitto


def topic(kind: str) -> str:
    return f"bench/{kind}/{uuid.uuid4().hex[:8]}"


# -- throughput ---------------------------------------------------------------------------------


class Countdown:
    """Counts received messages; sets ``done`` on the last expected one."""

    __slots__ = ("count", "done", "expected")

    def __init__(self, expected: int) -> None:
        self.count = 0
        self.expected = expected
        self.done = asyncio.Event()

    def __call__(self, _message: Any) -> None:
        self.count += 1
        if self.count == self.expected:
            self.done.set()


class Dropped(Exception):
    """The subscriber stopped receiving before it had every message: the broker dropped some.

    Stock Mosquitto drops what waits beyond ``max_queued_messages`` (1,000) for a subscriber
    that falls behind, without telling anyone; such a round has no rate (shown as lost).
    """


async def wait_done(cd: Countdown, what: str) -> None:
    deadline = time.monotonic() + RECEIVE_TIMEOUT
    seen = -1
    while not cd.done.is_set():
        if cd.count == seen or time.monotonic() > deadline:
            raise Dropped(f"{what}: received {cd.count} of {cd.expected}")
        seen = cd.count
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(IDLE_TIMEOUT):
                await cd.done.wait()


async def bus_throughput(url: str, n: int, qos: int, chunk: int) -> float:
    """``chunk`` 1: each publish awaited; otherwise gathered ``chunk`` at a time."""
    t = topic("bus")
    async with cascade_bus.connect(url) as pub, cascade_bus.connect(url) as sub:
        cd = Countdown(n)
        await sub.subscribe(t, cd, qos=qos)
        start = time.perf_counter()
        if chunk == 1:
            for _ in range(n):
                await pub.publish(t, PAYLOAD, qos=qos)
        else:
            for first in range(0, n, chunk):
                await asyncio.gather(
                    *(pub.publish(t, PAYLOAD, qos=qos) for _ in range(min(chunk, n - first)))
                )
        await wait_done(cd, "cascade-bus")
        return n / (time.perf_counter() - start)


async def stop(task: asyncio.Task[None]) -> None:
    """Cancel until it ends: Python 3.11's ``wait_for`` (inside aiomqtt's publish) can swallow
    a cancellation that arrives as its wait completes, and the loop then waits for more."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=0.5)
    if not task.cancelled():
        task.exception()  # retrieved


def aiomqtt_client(port: int) -> aiomqtt.Client:
    return aiomqtt.Client("127.0.0.1", port, socket_options=NODELAY, logger=QUIET)


async def aiomqtt_throughput(port: int, n: int, qos: int, chunk: int) -> float:
    t = topic("aiomqtt")
    async with aiomqtt_client(port) as pub, aiomqtt_client(port) as sub:
        await sub.subscribe(t, qos)
        cd = Countdown(n)

        async def consume() -> None:
            async for message in sub.messages:
                cd(message)
                if cd.done.is_set():
                    return

        consumer = asyncio.create_task(consume())
        start = time.perf_counter()
        if chunk == 1:
            for _ in range(n):
                await pub.publish(t, BODY, qos)
        else:
            for first in range(0, n, chunk):
                await asyncio.gather(
                    *(pub.publish(t, BODY, qos) for _ in range(min(chunk, n - first)))
                )
        try:
            await wait_done(cd, "aiomqtt")
        finally:
            await stop(consumer)
        return n / (time.perf_counter() - start)


def paho_client(port: int) -> paho_mqtt.Client:
    client = paho_mqtt.Client(CallbackAPIVersion.VERSION2, protocol=paho_mqtt.MQTTv5)
    connected = threading.Event()
    client.on_connect = lambda *_args: connected.set()
    client.connect("127.0.0.1", port)
    client.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # type: ignore[union-attr]
    client.loop_start()
    if not connected.wait(10):
        raise RuntimeError("paho did not connect")
    return client


def paho_subscribe(client: paho_mqtt.Client, t: str, qos: int) -> None:
    subscribed = threading.Event()
    client.on_subscribe = lambda *_args: subscribed.set()
    client.subscribe(t, qos)
    if not subscribed.wait(10):
        raise RuntimeError("paho did not subscribe")


def paho_close(*clients: paho_mqtt.Client) -> None:
    for client in clients:
        client.disconnect()
        client.loop_stop()


def paho_throughput(port: int, n: int, qos: int) -> float:
    t = topic("paho")
    pub, sub = paho_client(port), paho_client(port)
    try:
        count = 0
        done = threading.Event()

        def on_message(*_args: Any) -> None:
            nonlocal count
            count += 1
            if count == n:
                done.set()

        sub.on_message = on_message
        paho_subscribe(sub, t, qos)
        start = time.perf_counter()
        for _ in range(n):
            pub.publish(t, BODY, qos)
        deadline = time.monotonic() + RECEIVE_TIMEOUT
        seen = -1
        while not done.wait(IDLE_TIMEOUT):
            if count == seen or time.monotonic() > deadline:
                raise Dropped(f"paho: received {count} of {n}")
            seen = count
        return n / (time.perf_counter() - start)
    finally:
        paho_close(pub, sub)


# -- ping-pong ----------------------------------------------------------------------------------


async def bus_pingpong(url: str, k: int, qos: int) -> list[float]:
    ping, pong = topic("ping"), topic("pong")
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()
    async with cascade_bus.connect(url) as a, cascade_bus.connect(url) as b:

        async def echo(env: Envelope[Any]) -> None:
            await b.publish(pong, env.payload, qos=qos)

        def got(_env: Envelope[Any]) -> None:
            if not waiter.done():
                waiter.set_result(None)

        await b.subscribe(ping, echo, qos=qos)
        await a.subscribe(pong, got, qos=qos)
        samples: list[float] = []
        for i in range(k + k // 10):
            waiter = loop.create_future()
            start = time.perf_counter()
            await a.publish(ping, PAYLOAD, qos=qos)
            await waiter
            if i >= k // 10:  # the first tenth warms up
                samples.append(time.perf_counter() - start)
        return samples


async def aiomqtt_pingpong(port: int, k: int, qos: int) -> list[float]:
    ping, pong = topic("ping"), topic("pong")
    async with aiomqtt_client(port) as a, aiomqtt_client(port) as b:
        await b.subscribe(ping, qos)
        await a.subscribe(pong, qos)

        async def echo() -> None:
            async for message in b.messages:
                await b.publish(pong, message.payload, qos)

        echoer = asyncio.create_task(echo())
        replies = aiter(a.messages)
        samples: list[float] = []
        try:
            for i in range(k + k // 10):
                start = time.perf_counter()
                await a.publish(ping, BODY, qos)
                await anext(replies)
                if i >= k // 10:
                    samples.append(time.perf_counter() - start)
        finally:
            await stop(echoer)
        return samples


def paho_pingpong(port: int, k: int, qos: int) -> list[float]:
    ping, pong = topic("ping"), topic("pong")
    a, b = paho_client(port), paho_client(port)
    try:
        reply = threading.Event()

        def echo(_client: paho_mqtt.Client, _userdata: Any, msg: paho_mqtt.MQTTMessage) -> None:
            b.publish(pong, msg.payload, qos)

        b.on_message = echo
        a.on_message = lambda *_args: reply.set()
        paho_subscribe(b, ping, qos)
        paho_subscribe(a, pong, qos)
        samples: list[float] = []
        for i in range(k + k // 10):
            reply.clear()
            start = time.perf_counter()
            a.publish(ping, BODY, qos)
            if not reply.wait(10):
                raise RuntimeError("paho: no pong")
            if i >= k // 10:
                samples.append(time.perf_counter() - start)
        return samples
    finally:
        paho_close(a, b)


# -- QoS 1 publish round trip (publish call -> PUBACK) ------------------------------------------


def mqtt_packet(first: int, body: bytes) -> bytes:
    """One MQTT packet: the first byte, the remaining length, the body (bodies < 16 KiB)."""
    size = len(body)
    length = bytes((size,)) if size < 128 else bytes((size & 0x7F | 0x80, size >> 7))
    return bytes((first,)) + length + body


def read_packet(sock: socket.socket, buf: bytearray) -> bytes:
    """Read one whole packet (blocking); bytes after it stay in ``buf``."""
    while True:
        if len(buf) >= 2:
            size, shift, at = 0, 0, 1
            while at < len(buf):
                size |= (buf[at] & 0x7F) << shift
                shift += 7
                at += 1
                if buf[at - 1] < 0x80:
                    if len(buf) >= at + size:
                        packet = bytes(buf[: at + size])
                        del buf[: at + size]
                        return packet
                    break
        data = sock.recv(65_536)
        if not data:
            raise RuntimeError("the broker closed the connection")
        buf += data


def raw_publish_rtt(port: int, k: int) -> list[float]:
    """The floor: hand-made MQTT 5 packets over a blocking socket, nothing else."""
    t = topic("raw").encode()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client_id = f"raw-{uuid.uuid4().hex[:8]}".encode()
        connect = b"\x00\x04MQTT\x05\x02\x00\x3c\x00" + len(client_id).to_bytes(2, "big")
        sock.sendall(mqtt_packet(0x10, connect + client_id))
        buf = bytearray()
        if read_packet(sock, buf)[0] != 0x20:
            raise RuntimeError("no CONNACK")
        head = len(t).to_bytes(2, "big") + t
        samples: list[float] = []
        for i in range(k + k // 10):
            packet = mqtt_packet(0x32, head + (i % 65_535 + 1).to_bytes(2, "big") + b"\x00" + BODY)
            start = time.perf_counter()
            sock.sendall(packet)
            if read_packet(sock, buf)[0] != 0x40:
                raise RuntimeError("no PUBACK")
            if i >= k // 10:
                samples.append(time.perf_counter() - start)
        sock.sendall(b"\xe0\x00")  # DISCONNECT
        return samples


async def aiomqtt_publish_rtt(port: int, k: int) -> list[float]:
    t = topic("aiomqtt-rtt")
    async with aiomqtt_client(port) as client:
        samples: list[float] = []
        for i in range(k + k // 10):
            start = time.perf_counter()
            await client.publish(t, BODY, 1)
            if i >= k // 10:
                samples.append(time.perf_counter() - start)
        return samples


async def bus_publish_rtt(url: str, k: int) -> list[float]:
    t = topic("bus-rtt")
    async with cascade_bus.connect(url) as bus:
        samples: list[float] = []
        for i in range(k + k // 10):
            start = time.perf_counter()
            await bus.publish(t, PAYLOAD, qos=1)
            if i >= k // 10:
                samples.append(time.perf_counter() - start)
        return samples


def paho_publish_rtt(port: int, k: int) -> list[float]:
    t = topic("paho-rtt")
    client = paho_client(port)
    try:
        samples: list[float] = []
        for i in range(k + k // 10):
            start = time.perf_counter()
            client.publish(t, BODY, 1).wait_for_publish(10)
            if i >= k // 10:
                samples.append(time.perf_counter() - start)
        return samples
    finally:
        paho_close(client)


# -- first message after a fresh subscribe, and one message at a time --------------------------


def with_option(url: str, option: str) -> str:
    """``url`` with one more query option (``name=value``)."""
    return f"{url}{'&' if '?' in url else '?'}{option}"


def spread(samples: list[float]) -> tuple[float, float]:
    """(p50, p90) of ``samples``."""
    return percentile(samples, 0.50), percentile(samples, 0.90)


async def bus_first_and_steady(url: str, k: int, qos: int) -> tuple[list[float], list[float]]:
    """Seconds from the publish call to the handler: the first message after each of ``k``
    fresh subscriptions, then ``k`` messages one at a time on one subscription."""
    loop = asyncio.get_running_loop()
    arrived: asyncio.Future[float] = loop.create_future()

    def got(_env: Envelope[Any]) -> None:
        if not arrived.done():
            arrived.set_result(time.perf_counter())

    async def one(t: str) -> float:
        nonlocal arrived
        arrived = loop.create_future()
        start = time.perf_counter()
        await pub.publish(t, PAYLOAD, qos=qos)
        async with asyncio.timeout(10):
            return await arrived - start

    first: list[float] = []
    async with cascade_bus.connect(url) as pub, cascade_bus.connect(url) as sub:
        for _ in range(k):
            t = topic("first")
            subscription = await sub.subscribe(t, got, qos=qos)
            first.append(await one(t))
            await subscription.unsubscribe()
        t = topic("steady")
        await sub.subscribe(t, got, qos=qos)
        warm = max(1, k // 10)  # the first one is a first message, not a steady one
        steady = [await one(t) for _ in range(k + warm)][warm:]
    return first, steady


async def aiomqtt_first_and_steady(
    port: int, version: str, k: int, qos: int
) -> tuple[list[float], list[float]]:
    """`bus_first_and_steady` with two bare aiomqtt clients (TCP_NODELAY set)."""
    protocol = aiomqtt.ProtocolVersion.V5 if version == "5" else aiomqtt.ProtocolVersion.V311

    def client() -> aiomqtt.Client:
        return aiomqtt.Client(
            "127.0.0.1", port, protocol=protocol, socket_options=NODELAY, logger=QUIET
        )

    async with client() as pub, client() as sub:
        messages = aiter(sub.messages)

        async def one(t: str) -> float:
            start = time.perf_counter()
            await pub.publish(t, BODY, qos)
            async with asyncio.timeout(10):
                await anext(messages)
            return time.perf_counter() - start

        first: list[float] = []
        for _ in range(k):
            t = topic("first")
            await sub.subscribe(t, qos)
            first.append(await one(t))
            await sub.unsubscribe(t)
        t = topic("steady")
        await sub.subscribe(t, qos)
        warm = max(1, k // 10)  # the first one is a first message, not a steady one
        steady = [await one(t) for _ in range(k + warm)][warm:]
    return first, steady


@dataclass
class FirstRow:
    """One client on one broker, one MQTT version and QoS: first-message and steady latency."""

    broker: str
    client: str
    version: str
    qos: int
    run: Callable[[], Awaitable[tuple[list[float], list[float]]]]
    first: list[float] = field(default_factory=list)  # every sample of every round
    steady: list[float] = field(default_factory=list)


def build_first_rows(
    stock: SharedBroker, tuned: BrokerProcess | None, args: argparse.Namespace
) -> list[FirstRow]:
    k = args.fresh
    rows: list[FirstRow] = []
    for mqtt_version in ("5", "3.1.1"):
        for qos in (0, 1):
            url = with_option(stock.url, f"version={mqtt_version}")
            rows += [
                FirstRow(
                    "stock",
                    "cascade-bus",
                    mqtt_version,
                    qos,
                    partial(bus_first_and_steady, url, k, qos),
                ),
                FirstRow(
                    "stock",
                    "cascade-bus tcp_quickack=false",
                    mqtt_version,
                    qos,
                    partial(bus_first_and_steady, with_option(url, "tcp_quickack=false"), k, qos),
                ),
                FirstRow(
                    "stock",
                    "aiomqtt",
                    mqtt_version,
                    qos,
                    partial(aiomqtt_first_and_steady, stock.port, mqtt_version, k, qos),
                ),
            ]
            if tuned is not None:
                rows.append(
                    FirstRow(
                        "tuned",
                        "cascade-bus",
                        mqtt_version,
                        qos,
                        partial(
                            bus_first_and_steady,
                            with_option(tuned.url, f"version={mqtt_version}"),
                            k,
                            qos,
                        ),
                    )
                )
    return rows


def first_checks(rows: list[FirstRow]) -> list[tuple[str, str, bool]]:
    """The issue's targets on the stock broker, for each MQTT version and QoS."""
    checks: list[tuple[str, str, bool]] = []
    for row in rows:
        if row.broker != "stock" or row.client != "cascade-bus":
            continue
        first_p90 = percentile(row.first, 0.90) * 1e3
        steady_p50 = percentile(row.steady, 0.50) * 1e3
        where = f"stock broker, MQTT {row.version}, QoS {row.qos}"
        checks += [
            (
                f"{where}: first message after subscribe p90 <= {TARGET_FIRST_P90_MS:g} ms",
                f"{first_p90:.2f} ms",
                first_p90 <= TARGET_FIRST_P90_MS,
            ),
            (
                f"{where}: one at a time p50 <= {TARGET_STEADY_P50_MS:g} ms",
                f"{steady_p50:.2f} ms",
                steady_p50 <= TARGET_STEADY_P50_MS,
            ),
        ]
    return checks


def report_first(rows: list[FirstRow], args: argparse.Namespace) -> None:
    print(
        f"\nFirst message after a fresh subscribe, and one message at a time (publish call -> "
        f"handler, ms; {args.fresh} of each per round, all rounds pooled)\n"
    )
    lines = []
    for row in rows:
        first, steady = spread(row.first), spread(row.steady)
        lines.append(
            [
                f"{row.client}, {row.broker} broker",
                row.version,
                str(row.qos),
                *(f"{x * 1e3:.2f}" for x in (*first, *steady)),
            ]
        )
    table(
        ["client", "MQTT", "QoS", "first p50", "first p90", "steady p50", "steady p90"],
        lines,
        args.markdown,
    )


# -- running and reporting ----------------------------------------------------------------------


@dataclass
class Row:
    name: str
    qos: int
    wire: int
    run: Callable[[], Awaitable[float]]
    rates: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)  # this process's CPU seconds per message

    @property
    def rate(self) -> float:
        """Median msg/s over the rounds that received every message (NaN: none did)."""
        whole = [r for r in self.rates if r == r]
        return statistics.median(whole) if whole else math.nan

    @property
    def lost(self) -> int:
        """Rounds in which the broker dropped messages (no rate)."""
        return sum(1 for r in self.rates if r != r)


@dataclass
class LatencyRow:
    name: str
    qos: int
    run: Callable[[], Awaitable[list[float]]]
    p50s: list[float] = field(default_factory=list)
    p99s: list[float] = field(default_factory=list)

    @property
    def p50(self) -> float:
        return statistics.median(self.p50s)

    @property
    def p99(self) -> float:
        return statistics.median(self.p99s)


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def bus_wire_size() -> int:
    codec = cascade_bus.connect("memory://bench-size")._codec
    return len(codec.encode_plain(topic("bus"), PAYLOAD))


def build_rows(
    broker: SharedBroker, tuned: BrokerProcess | None, args: argparse.Namespace
) -> list[Row]:
    url, port, n, chunk = broker.url, broker.port, args.messages, args.chunk
    wire = bus_wire_size()
    rows: list[Row] = []
    for qos in (0, 1):
        rows += [
            Row("cascade-bus awaited", qos, wire, partial(bus_throughput, url, n, qos, 1)),
            Row("cascade-bus gathered", qos, wire, partial(bus_throughput, url, n, qos, chunk)),
        ]
        if tuned is not None:
            rows += [
                Row(
                    f"cascade-bus awaited{TUNED}",
                    qos,
                    wire,
                    partial(bus_throughput, tuned.url, n, qos, 1),
                ),
                Row(
                    f"cascade-bus gathered{TUNED}",
                    qos,
                    wire,
                    partial(bus_throughput, tuned.url, n, qos, chunk),
                ),
            ]
        rows += [
            Row("aiomqtt naive", qos, len(BODY), partial(aiomqtt_throughput, port, n, qos, 1)),
            Row(
                "aiomqtt gathered", qos, len(BODY), partial(aiomqtt_throughput, port, n, qos, chunk)
            ),
        ]
        if not args.no_paho:
            rows.append(
                Row(
                    "paho threads",
                    qos,
                    len(BODY),
                    partial(asyncio.to_thread, paho_throughput, port, n, qos),
                )
            )
    return rows


def build_latency_rows(
    broker: SharedBroker, tuned: BrokerProcess | None, args: argparse.Namespace
) -> list[LatencyRow]:
    url, port, k = broker.url, broker.port, args.pings
    rows: list[LatencyRow] = []
    for qos in (0, 1):
        rows.append(LatencyRow("cascade-bus", qos, partial(bus_pingpong, url, k, qos)))
        if tuned is not None:
            rows.append(
                LatencyRow(f"cascade-bus{TUNED}", qos, partial(bus_pingpong, tuned.url, k, qos))
            )
        rows += [
            LatencyRow("aiomqtt", qos, partial(aiomqtt_pingpong, port, k, qos)),
        ]
        if not args.no_paho:
            rows.append(
                LatencyRow(
                    "paho threads", qos, partial(asyncio.to_thread, paho_pingpong, port, k, qos)
                )
            )
    return rows


def build_publish_rows(
    broker: SharedBroker, tuned: BrokerProcess | None, args: argparse.Namespace
) -> list[LatencyRow]:
    url, port, k = broker.url, broker.port, args.pings
    rows = [
        LatencyRow("raw socket", 1, partial(asyncio.to_thread, raw_publish_rtt, port, k)),
        LatencyRow("cascade-bus", 1, partial(bus_publish_rtt, url, k)),
    ]
    if tuned is not None:
        rows.append(LatencyRow(f"cascade-bus{TUNED}", 1, partial(bus_publish_rtt, tuned.url, k)))
    rows += [
        LatencyRow("aiomqtt", 1, partial(aiomqtt_publish_rtt, port, k)),
    ]
    if not args.no_paho:
        rows.append(
            LatencyRow("paho threads", 1, partial(asyncio.to_thread, paho_publish_rtt, port, k))
        )
    return rows


def find(rows: list[Row], name: str, qos: int) -> Row:
    return next(r for r in rows if r.name == name and r.qos == qos)


def find_latency(rows: list[LatencyRow], name: str, qos: int) -> LatencyRow:
    return next(r for r in rows if r.name == name and r.qos == qos)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def paired(rows: list[float], base: list[float], op: Callable[[float, float], float]) -> float:
    """Median over rounds of ``op(row, base)`` for the same round (both ran under one load);
    rounds where either side lost messages (NaN) do not count."""
    pairs = [op(x, y) for x, y in zip(rows, base, strict=True) if x == x and y == y]
    return statistics.median(pairs) if pairs else math.nan


def ratio(x: float, y: float) -> float:
    return x / y


def difference(x: float, y: float) -> float:
    return x - y


def table(header: list[str], lines: list[list[str]], markdown: bool) -> None:
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    if markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|")
        for line in lines:
            print("| " + " | ".join(line) + " |")
        return
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    print(fmt.format(*header))
    for line in lines:
        print(fmt.format(*line))


def report(
    rows: list[Row],
    latency: list[LatencyRow],
    publish_rtt: list[LatencyRow],
    first: list[FirstRow],
    args: argparse.Namespace,
) -> bool:
    print(
        f"\nThroughput: {args.messages:,} messages of ~100 B, median of {args.repeat} rounds "
        f"(ratios: median of per-round ratios); gathered = {args.chunk} publishes per gather; "
        f"lossy: rounds in which the broker dropped messages (left out)\n"
    )
    lines = []
    for row in rows:
        naive = find(rows, "aiomqtt naive", row.qos).rates
        gathered = find(rows, "aiomqtt gathered", row.qos).rates
        lines.append(
            [
                row.name,
                str(row.qos),
                f"{row.rate:,.0f}",
                f"{paired(row.rates, naive, ratio):.2f}x",
                f"{paired(row.rates, gathered, ratio):.2f}x",
                f"{statistics.median(row.cpu) * 1e6:,.0f}",
                str(row.wire),
                f"{row.lost}/{len(row.rates)}",
            ]
        )
    table(
        ["client", "QoS", "msg/s", "vs naive", "vs gathered", "CPU µs/msg", "wire B", "lossy"],
        lines,
        args.markdown,
    )
    print(f"\nPing-pong round trip (A -> broker -> B -> broker -> A), {args.pings:,} pings\n")
    lines = []
    for lat in latency:
        raw = find_latency(latency, "aiomqtt", lat.qos).p50s
        lines.append(
            [
                lat.name,
                str(lat.qos),
                f"{lat.p50 * 1e6:,.0f}",
                f"{lat.p99 * 1e6:,.0f}",
                f"{paired(lat.p50s, raw, difference) * 1e6:+.0f}",
            ]
        )
    table(["client", "QoS", "p50 µs", "p99 µs", "added p50 µs"], lines, args.markdown)
    print(
        f"\nQoS 1 publish round trip (publish call until its PUBACK; nobody subscribes), "
        f"{args.pings:,} publishes one at a time\n"
    )
    lines = []
    floor = find_latency(publish_rtt, "raw socket", 1).p50s
    for lat in publish_rtt:
        lines.append(
            [
                lat.name,
                f"{lat.p50 * 1e6:,.0f}",
                f"{lat.p99 * 1e6:,.0f}",
                f"{paired(lat.p50s, floor, difference) * 1e6:+.0f}",
            ]
        )
    table(["client", "p50 µs", "p99 µs", "over raw socket p50 µs"], lines, args.markdown)
    report_first(first, args)
    print(f"\nTargets (on {args.url})")
    checks: list[tuple[str, str, bool]] = []
    for qos in (0, 1):
        awaited = find(rows, "cascade-bus awaited", qos).rates
        bus_gathered = find(rows, "cascade-bus gathered", qos).rates
        naive = find(rows, "aiomqtt naive", qos).rates
        gathered = find(rows, "aiomqtt gathered", qos).rates
        vs_naive = paired(awaited, naive, ratio)
        vs_gathered = paired(bus_gathered, gathered, ratio)
        checks += [
            (
                f"QoS {qos}: cascade-bus awaited >= {TARGET_VS_NAIVE}x aiomqtt naive",
                f"{vs_naive:.2f}x",
                vs_naive >= TARGET_VS_NAIVE,
            ),
            (
                f"QoS {qos}: cascade-bus gathered >= {TARGET_VS_GATHERED}x aiomqtt gathered",
                f"{vs_gathered:.2f}x",
                vs_gathered >= TARGET_VS_GATHERED,
            ),
        ]
    qos1 = find_latency(latency, "cascade-bus", 1).p50 * 1e6
    added = (
        paired(
            find_latency(latency, "cascade-bus", 0).p50s,
            find_latency(latency, "aiomqtt", 0).p50s,
            difference,
        )
        * 1e6
    )
    checks += [
        (
            f"QoS 1 round trip p50 <= {TARGET_QOS1_P50_US:,.0f} µs",
            f"{qos1:,.0f} µs",
            qos1 <= TARGET_QOS1_P50_US,
        ),
        (
            f"QoS 0 round trip p50 added to aiomqtt's <= {TARGET_ADDED_P50_US:.0f} µs",
            f"{added:+.0f} µs",
            added <= TARGET_ADDED_P50_US,
        ),
        *first_checks(first),
    ]
    width = max(len(text) for text, _, _ in checks)
    for text, value, passed in checks:
        print(f"  {verdict(passed)}  {text:<{width}}  {value}")
    return all(passed for _, _, passed in checks)


@dataclass
class SharedBroker:
    """A broker already running (``--url``): used as users run it, never stopped here."""

    url: str
    port: int


async def run(args: argparse.Namespace) -> bool:
    broker = SharedBroker(args.url, urlsplit(args.url).port or 1883)
    tuned = None if args.no_tuned else await asyncio.to_thread(start_mosquitto)
    try:
        rows = build_rows(broker, tuned, args)
        latency = build_latency_rows(broker, tuned, args)
        publish_rtt = build_publish_rows(broker, tuned, args)
        first = build_first_rows(broker, tuned, args)
        for repeat in range(args.repeat):
            for row in rows:
                gc.collect()
                cpu = time.process_time()
                try:
                    row.rates.append(await row.run())
                except Dropped as exc:
                    print(f"  {row.name} QoS {row.qos}: {exc} (broker dropped)", file=sys.stderr)
                    row.rates.append(math.nan)
                row.cpu.append((time.process_time() - cpu) / args.messages)
                if args.verbose:
                    print(f"  {row.name} QoS {row.qos}: {row.rates[-1]:,.0f}/s", file=sys.stderr)
            for lat in latency + publish_rtt:
                gc.collect()
                samples = await lat.run()
                lat.p50s.append(percentile(samples, 0.50))
                lat.p99s.append(percentile(samples, 0.99))
            for one in first:
                gc.collect()
                fresh, steady = await one.run()
                one.first += fresh
                one.steady += steady
            print(f"repeat {repeat + 1}/{args.repeat} done", file=sys.stderr)
        return report(rows, latency, publish_rtt, first, args)
    finally:
        if tuned is not None:
            await asyncio.to_thread(tuned.close)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--messages", type=int, default=5_000, help="messages per throughput run")
    parser.add_argument("--pings", type=int, default=500, help="round trips per latency run")
    parser.add_argument("--repeat", type=int, default=5, help="runs per case (median)")
    parser.add_argument("--chunk", type=int, default=1_000, help="publishes per gather")
    parser.add_argument("--verbose", action="store_true", help="print each run as it ends")
    parser.add_argument("--markdown", action="store_true", help="print Markdown tables")
    parser.add_argument("--no-paho", action="store_true", help="skip the paho reference rows")
    parser.add_argument(
        "--url",
        default="mqtt://127.0.0.1:1883",
        help="the running broker measured (default: the stock shared Mosquitto)",
    )
    parser.add_argument(
        "--fresh", type=int, default=20, help="fresh subscriptions (and steady messages) per round"
    )
    parser.add_argument(
        "--no-tuned",
        action="store_true",
        help="skip the extra rows on a private tuned Mosquitto (set_tcp_nodelay true)",
    )
    args = parser.parse_args(argv)
    print(
        f"cascade-bus {cascade_bus.__version__}, aiomqtt {version('aiomqtt')}, "
        f"paho-mqtt {version('paho-mqtt')}, Python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs, {platform.machine()}"
    )
    started = time.perf_counter()
    ok = asyncio.run(run(args))
    print(f"\n{time.perf_counter() - started:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
