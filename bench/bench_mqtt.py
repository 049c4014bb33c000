"""MQTT throughput and ping-pong latency: cascade-bus against bare aiomqtt and paho, one run.

Not a test: run it and read the table.

    .venv/bin/python bench/bench_mqtt.py [--messages N] [--pings K] [--repeat R] [--markdown]

The default run (5,000 messages, 500 pings, 5 rounds) takes about a minute on 2 CPUs.

It starts a private Mosquitto (``start_mosquitto``: ``set_tcp_nodelay true``,
``max_queued_messages 0``) on a free port and stops it at the end. Every client sets
TCP_NODELAY (cascade-bus does by default; the bare clients are given the socket option), so
no row waits on Nagle's algorithm.

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

Targets (from the MQTT adapter's issue), checked like for like: cascade-bus awaited ≥ 1.5x
aiomqtt naive, cascade-bus gathered ≥ 1.0x aiomqtt gathered (at QoS 0 and QoS 1); QoS 1 round
trip p50 ≤ 1 ms; at QoS 0 at most 30 µs added to the bare aiomqtt round trip p50. The exit
status is 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
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

TARGET_VS_NAIVE = 1.5
TARGET_VS_GATHERED = 1.0
TARGET_QOS1_P50_US = 1000.0
TARGET_ADDED_P50_US = 30.0

# aiomqtt warns once per publish while more than 10 are pending: silence it for gathering.
QUIET = logging.getLogger("bench.aiomqtt")
QUIET.setLevel(logging.ERROR)
QUIET.addHandler(logging.NullHandler())
QUIET.propagate = False


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


async def wait_done(cd: Countdown, what: str) -> None:
    try:
        async with asyncio.timeout(RECEIVE_TIMEOUT):
            await cd.done.wait()
    except TimeoutError:
        raise RuntimeError(f"{what}: received {cd.count} of {cd.expected}") from None


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
        if not done.wait(RECEIVE_TIMEOUT):
            raise RuntimeError(f"paho: received {count} of {n}")
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
        return statistics.median(self.rates) if self.rates else 0.0


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


def build_rows(broker: BrokerProcess | SharedBroker, args: argparse.Namespace) -> list[Row]:
    url, port, n, chunk = broker.url, broker.port, args.messages, args.chunk
    wire = bus_wire_size()
    rows: list[Row] = []
    for qos in (0, 1):
        rows += [
            Row("cascade-bus awaited", qos, wire, partial(bus_throughput, url, n, qos, 1)),
            Row("cascade-bus gathered", qos, wire, partial(bus_throughput, url, n, qos, chunk)),
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
    broker: BrokerProcess | SharedBroker, args: argparse.Namespace
) -> list[LatencyRow]:
    url, port, k = broker.url, broker.port, args.pings
    rows: list[LatencyRow] = []
    for qos in (0, 1):
        rows += [
            LatencyRow("cascade-bus", qos, partial(bus_pingpong, url, k, qos)),
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
    broker: BrokerProcess | SharedBroker, args: argparse.Namespace
) -> list[LatencyRow]:
    url, port, k = broker.url, broker.port, args.pings
    rows = [
        LatencyRow("raw socket", 1, partial(asyncio.to_thread, raw_publish_rtt, port, k)),
        LatencyRow("cascade-bus", 1, partial(bus_publish_rtt, url, k)),
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
    """Median over rounds of ``op(row, base)`` for the same round (both ran under one load)."""
    return statistics.median(op(x, y) for x, y in zip(rows, base, strict=True))


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
    args: argparse.Namespace,
) -> bool:
    print(
        f"\nThroughput: {args.messages:,} messages of ~100 B, median of {args.repeat} rounds "
        f"(ratios: median of per-round ratios); gathered = {args.chunk} publishes per gather\n"
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
            ]
        )
    table(
        ["client", "QoS", "msg/s", "vs naive", "vs gathered", "CPU µs/msg", "wire B"],
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
    print("\nTargets")
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

    def close(self) -> None:
        """Nothing to stop: the broker is not ours."""


async def run(args: argparse.Namespace) -> bool:
    broker: BrokerProcess | SharedBroker
    if args.url:
        broker = SharedBroker(args.url, urlsplit(args.url).port or 1883)
    else:
        broker = await asyncio.to_thread(start_mosquitto)
    try:
        rows = build_rows(broker, args)
        latency = build_latency_rows(broker, args)
        publish_rtt = build_publish_rows(broker, args)
        for repeat in range(args.repeat):
            for row in rows:
                gc.collect()
                cpu = time.process_time()
                row.rates.append(await row.run())
                row.cpu.append((time.process_time() - cpu) / args.messages)
                if args.verbose:
                    print(f"  {row.name} QoS {row.qos}: {row.rates[-1]:,.0f}/s", file=sys.stderr)
            for lat in latency + publish_rtt:
                gc.collect()
                samples = await lat.run()
                lat.p50s.append(percentile(samples, 0.50))
                lat.p99s.append(percentile(samples, 0.99))
            print(f"repeat {repeat + 1}/{args.repeat} done", file=sys.stderr)
        return report(rows, latency, publish_rtt, args)
    finally:
        await asyncio.to_thread(broker.close)


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
        default="",
        help="use this running broker (the stock mqtt://127.0.0.1:1883) instead of a private one",
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
