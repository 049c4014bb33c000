"""NATS throughput and ping-pong latency: cascade-bus against bare nats-py and FastStream, one run.

Not a test: run it and read the table.

    .venv/bin/python bench/bench_nats.py [--messages N] [--js-messages M] [--pings K]
                                         [--repeat R] [--url nats://...] [--no-faststream]

It starts a private nats-server with JetStream (``start_nats``: file storage in a temporary
directory) on a free port and stops it at the end, unless ``--url`` names a running server.

Throughput (msg/s, median of R rounds; each round runs every case once, and the ratios are
medians of per-round ratios, so that a comparison is made under the same load): a publisher
and a subscriber on two connections in this process; the clock runs from the first publish
until the subscriber has all N messages.

Core NATS (QoS 0):

- ``nats-py bytes``: ``await nc.publish(subject, body)`` of a 100-byte body in a loop; the
  subscription callback counts. The ceiling: nothing is encoded or decoded.
- ``nats-py json``: what hand-written code does: ``json.dumps(dict).encode()`` per publish,
  ``json.loads(msg.data)`` in the callback.
- ``cascade-bus json``: ``await bus.publish(topic, dict)`` (the default CloudEvents JSON
  envelope on the wire); a handler subscription counts.
- ``cascade-bus raw``: ``format=raw``: the bare JSON payload, metadata in NATS headers.
- ``faststream``: FastStream's ``NatsBroker``: ``await broker.publish(dict, subject)`` and a
  ``@broker.subscriber`` handler taking the dict (when FastStream is installed).

JetStream (QoS 1), ``--js-messages`` each:

- ``nats-py js bytes`` / ``nats-py js json``: ``await js.publish(...)`` (waits for the stream's
  ack) in a loop; a push subscription (``manual_ack``) acks each message in its callback.
- ``cascade-bus qos1``: ``await bus.publish(topic, dict, qos=1)``; a ``qos=1`` subscription
  (the bus acks after the handler).
- ``... gathered``: ``asyncio.gather`` of ``--chunk`` publishes at a time, both clients.
- ``faststream js``: FastStream with a JetStream subscriber and ``publish(..., stream=...)``.

Ping-pong (µs, p50/p99 of K round trips, median over rounds): A publishes a ping, B receives it
and publishes a pong, A waits for the pong before the next ping; at QoS 1 both legs go through
the stream (ack) and a push consumer.

Targets (from the NATS adapter's issue): cascade-bus json ≥ 0.8x nats-py bytes and ≥ 1.0x
nats-py json, on core NATS and on JetStream; at most 30 µs added to the nats-py round trip p50.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import os
import platform
import statistics
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import nats
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import api as js_api

import cascade_bus
from cascade_bus import Envelope
from cascade_bus.testing.brokers import start_nats

BODY = b"x" * 100
PAYLOAD: dict[str, Any] = {"seq": 1, "value": 21.5, "unit": "C", "ok": True}
RECEIVE_TIMEOUT = 120.0  # seconds a throughput run may take before it counts as failed
BASELINE_STREAM = "BENCH_BARE"
FASTSTREAM_STREAM = "BENCH_FASTSTREAM"

TARGET_VS_BYTES = 0.8
TARGET_VS_JSON = 1.0
TARGET_ADDED_P50_US = 30.0


def token() -> str:
    return uuid.uuid4().hex[:10]


class Countdown:
    """Counts received messages; sets ``done`` on the last expected one."""

    __slots__ = ("count", "done", "expected")

    def __init__(self, expected: int) -> None:
        self.count = 0
        self.expected = expected
        self.done = asyncio.Event()

    def hit(self) -> None:
        self.count += 1
        if self.count == self.expected:
            self.done.set()

    def __call__(self, _message: Any) -> None:
        self.hit()


async def wait_done(cd: Countdown, what: str) -> None:
    try:
        async with asyncio.timeout(RECEIVE_TIMEOUT):
            await cd.done.wait()
    except TimeoutError:
        raise RuntimeError(f"{what}: received {cd.count} of {cd.expected}") from None


async def send_all(n: int, chunk: int, send: Callable[[], Awaitable[Any]]) -> None:
    """``chunk`` 1: each publish awaited in turn; otherwise gathered ``chunk`` at a time."""
    if chunk == 1:
        for _ in range(n):
            await send()
        return
    for first in range(0, n, chunk):
        await asyncio.gather(*(send() for _ in range(min(chunk, n - first))))


async def settle(nc: NatsClient) -> None:
    """Make sure the server has processed this client's SUBs (nats-py's flush() writes its PING
    ahead of what is still in its write buffer: the second PING goes out after it)."""
    await nc.flush()
    await nc.flush()


@contextlib.asynccontextmanager
async def two_clients(url: str) -> AsyncIterator[tuple[NatsClient, NatsClient]]:
    pub, sub = await nats.connect(url), await nats.connect(url)
    try:
        yield pub, sub
    finally:
        await pub.close()
        await sub.close()


# -- throughput: nats-py ---------------------------------------------------------------------


async def nats_core(url: str, n: int, mode: str) -> float:
    subject = f"bench.core.{token()}"
    async with two_clients(url) as (pub, sub):
        cd = Countdown(n)

        async def on_bytes(msg: Msg) -> None:
            cd.hit()

        async def on_json(msg: Msg) -> None:
            json.loads(msg.data)
            cd.hit()

        await sub.subscribe(subject, cb=on_bytes if mode == "bytes" else on_json)
        await settle(sub)
        start = time.perf_counter()
        if mode == "bytes":
            for _ in range(n):
                await pub.publish(subject, BODY)
        else:
            for _ in range(n):
                await pub.publish(subject, json.dumps(PAYLOAD).encode())
        await wait_done(cd, f"nats-py {mode}")
        return n / (time.perf_counter() - start)


async def nats_js(url: str, n: int, mode: str, chunk: int) -> float:
    subject = f"bench.bare.{token()}"
    async with two_clients(url) as (pub, sub):
        js_pub, js_sub = pub.jetstream(), sub.jetstream()
        cd = Countdown(n)

        async def on_message(msg: Msg) -> None:
            if mode == "json":
                json.loads(msg.data)
            await msg.ack()
            cd.hit()

        consumer = await js_sub.subscribe(
            subject, stream=BASELINE_STREAM, cb=on_message, manual_ack=True
        )

        async def send() -> None:
            body = BODY if mode == "bytes" else json.dumps(PAYLOAD).encode()
            await js_pub.publish(subject, body)

        start = time.perf_counter()
        await send_all(n, chunk, send)
        await wait_done(cd, f"nats-py js {mode}")
        rate = n / (time.perf_counter() - start)
        await consumer.unsubscribe()
        return rate


# -- throughput: cascade-bus -----------------------------------------------------------------


async def bus_run(url: str, n: int, fmt: str, qos: int, chunk: int) -> float:
    topic = f"bench/bus/{token()}"
    async with (
        cascade_bus.connect(url, format=fmt) as pub,
        cascade_bus.connect(url, format=fmt) as sub,
    ):
        cd = Countdown(n)
        await sub.subscribe(topic, cd, qos=qos)

        def send() -> Awaitable[None]:
            return pub.publish(topic, PAYLOAD, qos=qos)

        start = time.perf_counter()
        await send_all(n, chunk, send)
        await wait_done(cd, f"cascade-bus {fmt} qos{qos}")
        return n / (time.perf_counter() - start)


# -- throughput: FastStream ------------------------------------------------------------------


async def faststream_run(url: str, n: int, jetstream: bool) -> float:
    from faststream.nats import JStream, NatsBroker

    subject = f"bench.faststream.{token()}"
    broker = NatsBroker(url, logger=None)
    cd = Countdown(n)
    stream = JStream(FASTSTREAM_STREAM, subjects=["bench.faststream.>"]) if jetstream else None

    @broker.subscriber(subject, stream=stream)  # type: ignore[untyped-decorator,unused-ignore]
    async def handle(body: dict[str, Any]) -> None:
        cd.hit()

    await broker.start()
    try:
        start = time.perf_counter()
        for _ in range(n):
            if jetstream:
                await broker.publish(PAYLOAD, subject, stream=FASTSTREAM_STREAM)
            else:
                await broker.publish(PAYLOAD, subject)
        await wait_done(cd, "faststream")
        return n / (time.perf_counter() - start)
    finally:
        await broker.stop()


# -- latency ---------------------------------------------------------------------------------


async def nats_pingpong(url: str, k: int, jetstream: bool) -> list[float]:
    ping, pong = f"bench.ping.{token()}", f"bench.pong.{token()}"
    async with two_clients(url) as (a, b):
        js_a, js_b = a.jetstream(), b.jetstream()
        got: asyncio.Future[None] | None = None

        async def echo(msg: Msg) -> None:
            if jetstream:
                await msg.ack()
                await js_b.publish(pong, msg.data)
            else:
                await b.publish(pong, msg.data)

        async def back(msg: Msg) -> None:
            if jetstream:
                await msg.ack()
            if got is not None and not got.done():
                got.set_result(None)

        if jetstream:
            await js_b.subscribe(ping, stream=BASELINE_STREAM, cb=echo, manual_ack=True)
            await js_a.subscribe(pong, stream=BASELINE_STREAM, cb=back, manual_ack=True)
        else:
            await b.subscribe(ping, cb=echo)
            await a.subscribe(pong, cb=back)
            await settle(a)
            await settle(b)
        samples: list[float] = []
        loop = asyncio.get_running_loop()
        for _ in range(k):
            got = loop.create_future()
            start = time.perf_counter()
            if jetstream:
                await js_a.publish(ping, BODY)
            else:
                await a.publish(ping, BODY)
            async with asyncio.timeout(10):
                await got
            samples.append(time.perf_counter() - start)
        return samples


async def bus_pingpong(url: str, k: int, qos: int) -> list[float]:
    ping, pong = f"bench/ping/{token()}", f"bench/pong/{token()}"
    async with cascade_bus.connect(url) as a, cascade_bus.connect(url) as b:
        got: asyncio.Future[None] | None = None

        async def echo(env: Envelope[Any]) -> None:
            await b.publish(pong, env.payload, qos=qos)

        def back(_env: Envelope[Any]) -> None:
            if got is not None and not got.done():
                got.set_result(None)

        await b.subscribe(ping, echo, qos=qos)
        await a.subscribe(pong, back, qos=qos)
        samples: list[float] = []
        loop = asyncio.get_running_loop()
        for _ in range(k):
            got = loop.create_future()
            start = time.perf_counter()
            await a.publish(ping, PAYLOAD, qos=qos)
            async with asyncio.timeout(10):
                await got
            samples.append(time.perf_counter() - start)
        return samples


# -- running and reporting -------------------------------------------------------------------


@dataclass
class Row:
    name: str
    kind: str  # "core" or "jetstream"
    run: Callable[[], Awaitable[float]]
    rates: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return statistics.median(self.rates) if self.rates else 0.0

    def vs(self, other: Row) -> float:
        """Median of the per-round ratios: both ran in the same round, under the same load."""
        return statistics.median(a / b for a, b in zip(self.rates, other.rates, strict=True))


@dataclass
class LatencyRow:
    name: str
    kind: str
    run: Callable[[], Awaitable[list[float]]]
    p50s: list[float] = field(default_factory=list)
    p99s: list[float] = field(default_factory=list)

    @property
    def p50(self) -> float:
        return statistics.median(self.p50s)

    @property
    def p99(self) -> float:
        return statistics.median(self.p99s)

    def added(self, other: LatencyRow) -> float:
        """Median of the per-round p50 differences, in seconds."""
        return statistics.median(a - b for a, b in zip(self.p50s, other.p50s, strict=True))


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def have_faststream() -> bool:
    try:
        version("faststream")
    except PackageNotFoundError:
        return False
    return True


def build_rows(url: str, args: argparse.Namespace) -> list[Row]:
    n, m, chunk = args.messages, args.js_messages, args.chunk
    rows = [
        Row("nats-py bytes", "core", lambda: nats_core(url, n, "bytes")),
        Row("nats-py json", "core", lambda: nats_core(url, n, "json")),
        Row("cascade-bus json", "core", lambda: bus_run(url, n, "json", 0, 1)),
        Row("cascade-bus raw", "core", lambda: bus_run(url, n, "raw", 0, 1)),
        Row("nats-py js bytes", "jetstream", lambda: nats_js(url, m, "bytes", 1)),
        Row("nats-py js json", "jetstream", lambda: nats_js(url, m, "json", 1)),
        Row("cascade-bus qos1", "jetstream", lambda: bus_run(url, m, "json", 1, 1)),
        Row("nats-py js gathered", "jetstream", lambda: nats_js(url, m, "bytes", chunk)),
        Row("cascade-bus qos1 gathered", "jetstream", lambda: bus_run(url, m, "json", 1, chunk)),
    ]
    if args.faststream:
        rows.insert(4, Row("faststream", "core", lambda: faststream_run(url, n // 4, False)))
        rows.append(Row("faststream js", "jetstream", lambda: faststream_run(url, m, True)))
    return rows


def build_latency_rows(url: str, args: argparse.Namespace) -> list[LatencyRow]:
    k = args.pings
    return [
        LatencyRow("nats-py", "core", lambda: nats_pingpong(url, k, False)),
        LatencyRow("cascade-bus", "core", lambda: bus_pingpong(url, k, 0)),
        LatencyRow("nats-py js", "jetstream", lambda: nats_pingpong(url, k // 2, True)),
        LatencyRow("cascade-bus qos1", "jetstream", lambda: bus_pingpong(url, k // 2, 1)),
    ]


def find(rows: list[Row], name: str) -> Row:
    return next(r for r in rows if r.name == name)


def find_latency(rows: list[LatencyRow], name: str) -> LatencyRow:
    return next(r for r in rows if r.name == name)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def report(rows: list[Row], latency: list[LatencyRow], args: argparse.Namespace) -> bool:
    print(
        f"\nThroughput: {args.messages:,} core / {args.js_messages:,} JetStream messages, "
        f"median of {args.repeat} rounds (ratios: of per-round ratios); "
        f"gathered = {args.chunk} publishes per gather\n"
    )
    print(f"{'client':<27} {'kind':<10} {'msg/s':>9} {'vs bytes':>9} {'vs json':>8}")
    for row in rows:
        prefix = "nats-py js" if row.kind == "jetstream" else "nats-py"
        by_bytes = row.vs(find(rows, f"{prefix} bytes"))
        by_json = row.vs(find(rows, f"{prefix} json"))
        print(f"{row.name:<27} {row.kind:<10} {row.rate:>9,.0f} {by_bytes:>8.2f}x {by_json:>7.2f}x")
    print(f"\nPing-pong round trip (A -> server -> B -> server -> A), {args.pings:,} pings\n")
    print(f"{'client':<27} {'kind':<10} {'p50 µs':>9} {'p99 µs':>9} {'added p50':>10}")
    for lat in latency:
        base = find_latency(latency, "nats-py js" if lat.kind == "jetstream" else "nats-py")
        print(
            f"{lat.name:<27} {lat.kind:<10} {lat.p50 * 1e6:>9.0f} {lat.p99 * 1e6:>9.0f} "
            f"{lat.added(base) * 1e6:>+9.0f}"
        )
    print("\nTargets")
    ok = True
    checks: list[tuple[str, str, bool]] = []
    for kind, bus, bare in (
        ("core", "cascade-bus json", "nats-py"),
        ("JetStream", "cascade-bus qos1", "nats-py js"),
    ):
        row = find(rows, bus)
        by_bytes = row.vs(find(rows, f"{bare} bytes"))
        by_json = row.vs(find(rows, f"{bare} json"))
        checks.append(
            (
                f"{kind}: {bus} >= {TARGET_VS_BYTES}x {bare} bytes",
                f"{by_bytes:.2f}x",
                by_bytes >= TARGET_VS_BYTES,
            )
        )
        checks.append(
            (
                f"{kind}: {bus} >= {TARGET_VS_JSON}x {bare} json",
                f"{by_json:.2f}x",
                by_json >= TARGET_VS_JSON,
            )
        )
    for kind, bus, bare in (
        ("core", "cascade-bus", "nats-py"),
        ("JetStream", "cascade-bus qos1", "nats-py js"),
    ):
        added = find_latency(latency, bus).added(find_latency(latency, bare)) * 1e6
        checks.append(
            (
                f"{kind}: p50 added over {bare} <= {TARGET_ADDED_P50_US:.0f} µs",
                f"{added:+.0f} µs",
                added <= TARGET_ADDED_P50_US,
            )
        )
    for text, value, passed in checks:
        print(f"  {verdict(passed)}  {text:<56} {value}")
        ok &= passed
    return ok


async def prepare(url: str) -> None:
    """The streams the bare clients use (cascade-bus makes its own)."""
    nc = await nats.connect(url)
    try:
        jsm = nc.jsm()
        for name, subjects in (
            (BASELINE_STREAM, ["bench.bare.>", "bench.ping.>", "bench.pong.>"]),
        ):
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await jsm.delete_stream(name)
            await jsm.add_stream(
                js_api.StreamConfig(
                    name=name, subjects=subjects, storage=js_api.StorageType.FILE, max_age=600
                )
            )
    finally:
        await nc.close()


async def cleanup(url: str) -> None:
    nc = await nats.connect(url)
    try:
        for name in (BASELINE_STREAM, FASTSTREAM_STREAM):
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await nc.jsm().delete_stream(name)
    finally:
        await nc.close()


async def run(args: argparse.Namespace) -> bool:
    broker = None if args.url else await asyncio.to_thread(start_nats)
    url = args.url or (broker.url if broker is not None else "")
    try:
        await prepare(url)
        rows = build_rows(url, args)
        latency = build_latency_rows(url, args)
        for row in rows[:4]:  # warm up imports, caches and the server
            await row.run()
        for repeat in range(args.repeat):
            for row in rows:
                gc.collect()
                row.rates.append(await row.run())
            for lat in latency:
                gc.collect()
                samples = await lat.run()
                lat.p50s.append(percentile(samples, 0.50))
                lat.p99s.append(percentile(samples, 0.99))
            print(f"round {repeat + 1}/{args.repeat} done", file=sys.stderr)
        return report(rows, latency, args)
    finally:
        await cleanup(url)
        if broker is not None:
            await asyncio.to_thread(broker.close)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--messages", type=int, default=50_000, help="core messages per run")
    parser.add_argument("--js-messages", type=int, default=5_000, help="JetStream messages per run")
    parser.add_argument("--pings", type=int, default=1_000, help="round trips per latency run")
    parser.add_argument("--repeat", type=int, default=7, help="rounds (each case once; median)")
    parser.add_argument("--chunk", type=int, default=100, help="publishes per gather")
    parser.add_argument("--url", default="", help="use this server instead of a private one")
    parser.add_argument("--no-faststream", dest="faststream", action="store_false")
    args = parser.parse_args(argv)
    args.faststream = args.faststream and have_faststream()
    logging.getLogger("nats").setLevel(logging.CRITICAL)
    fs = f", FastStream {version('faststream')}" if args.faststream else ""
    print(
        f"cascade-bus {cascade_bus.__version__}, nats-py {version('nats-py')}{fs}, "
        f"Python {platform.python_version()}, {os.cpu_count()} CPUs, {platform.machine()}"
    )
    started = time.perf_counter()
    ok = asyncio.run(run(args))
    print(f"\n{time.perf_counter() - started:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
