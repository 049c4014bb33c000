"""memory:// throughput and envelope codec cost, against the baselines the design names.

Not a test: run it and read the table.

    .venv/bin/python bench/bench_memory.py [--messages N] [--repeat R] [--seconds S]

Throughput cases (deliveries/s = messages x subscribers / wall time from the first publish
until the last handler ran, median of R repeats):

- ``bus``: ``memory://`` with 1 and 8 handler subscriptions (async handlers that count and set
  an event on the last expected message) and 1 iterator subscription. The publisher awaits
  ``bus.publish(topic, payload)`` of a small dict.
- ``queue``: the ceiling, one bare ``asyncio.Queue`` per subscriber; the producer
  ``put_nowait``s the same dict into each queue and yields every ``--batch`` messages (the
  bus yields when a subscription's buffer fills), consumer tasks ``await q.get()`` and call
  the same counting handler.
- ``naive``: what hand-written code does, a list of (pattern, handler); each publish does
  ``json.dumps``, scans every subscription with a simple MQTT matcher and for each match does
  ``json.loads`` and awaits the handler directly.

Every case first runs once with N/10 messages (warm-up and rate estimate); then its message
count is scaled from N so that one run takes about ``--seconds`` (``--seconds 0``: exactly N
messages everywhere).

Codec cases, ns per message timed with ``time.perf_counter_ns``: the envelope round trip
(``Codec.encode_envelope`` then ``decoder_for(Any).decode``, what crosses a broker; the target
row), its two halves, building an envelope (``Codec.envelope``: fresh id and time, publish-side
work) and build + round trip together; against stdlib ``json.dumps`` + ``json.loads`` of a
dict with the same fields, and ``msgspec.json`` on that plain dict.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import msgspec

import cascade_bus
from cascade_bus import connect
from cascade_bus._codec import Codec, decoder_for
from cascade_bus._envelope import new_id

TOPIC = "bench/sensor-1/temperature"
PATTERN = "bench/+/temperature"
PAYLOAD: dict[str, Any] = {"seq": 1, "value": 21.5, "unit": "C", "ok": True}
SOURCE = "cascade-bus://bench/1"
TYPE = "cascade_bus.message"

TARGET_RATE = 500_000.0  # deliveries/s
TARGET_RATIO = 0.5  # of the bare-queue ceiling
TARGET_NS = 2_000.0  # ns per envelope round trip

AsyncHandler = Callable[[Any], Awaitable[None]]


# -- shared helpers ----------------------------------------------------------------------------


class Countdown:
    """Counts deliveries across all subscribers; sets ``done`` on the last expected one."""

    __slots__ = ("count", "done", "expected")

    def __init__(self, expected: int) -> None:
        self.count = 0
        self.expected = expected
        self.done = asyncio.Event()


def counting_handler(cd: Countdown) -> AsyncHandler:
    """The handler every throughput case uses: count, and signal the last message."""

    async def handler(_message: Any) -> None:
        cd.count += 1
        if cd.count == cd.expected:
            cd.done.set()

    return handler


_broker_ids = itertools.count()


def fresh_url() -> str:
    """A memory:// broker of its own for each run (brokers live as long as the process)."""
    return f"memory://bench-{os.getpid()}-{next(_broker_ids)}"


# -- (a) the bus -------------------------------------------------------------------------------


async def bus_handlers(n: int, subscribers: int, batch: int) -> float:
    """``n`` publishes to ``subscribers`` handler subscriptions; returns seconds."""
    del batch
    cd = Countdown(n * subscribers)
    handler = counting_handler(cd)
    async with connect(fresh_url()) as bus:
        for _ in range(subscribers):
            await bus.subscribe(PATTERN, handler)
        publish = bus.publish
        payload = PAYLOAD
        start = time.perf_counter()
        for _ in range(n):
            await publish(TOPIC, payload)
        await cd.done.wait()
        elapsed = time.perf_counter() - start
    assert cd.count == cd.expected, (cd.count, cd.expected)
    return elapsed


async def bus_iterator(n: int, subscribers: int, batch: int) -> float:
    """``n`` publishes to one iterator subscription drained by ``async for``; returns seconds."""
    del batch
    assert subscribers == 1
    cd = Countdown(n)

    async def consume(sub: cascade_bus.Subscription[Any]) -> None:
        async for _env in sub:
            cd.count += 1
            if cd.count == cd.expected:
                cd.done.set()
                return

    async with connect(fresh_url()) as bus, bus.subscribe(PATTERN) as sub:
        consumer = asyncio.create_task(consume(sub))
        publish = bus.publish
        payload = PAYLOAD
        start = time.perf_counter()
        for _ in range(n):
            await publish(TOPIC, payload)
        await cd.done.wait()
        elapsed = time.perf_counter() - start
        await consumer
    assert cd.count == cd.expected, (cd.count, cd.expected)
    return elapsed


# -- (b) the ceiling: a bare asyncio.Queue per subscriber --------------------------------------


async def bare_queue(n: int, subscribers: int, batch: int) -> float:
    """Fan ``n`` messages out to ``subscribers`` bare queues; returns seconds."""
    cd = Countdown(n * subscribers)
    handler = counting_handler(cd)

    async def consume(q: asyncio.Queue[dict[str, Any]]) -> None:
        get = q.get
        for _ in range(n):
            await handler(await get())

    queues: list[asyncio.Queue[dict[str, Any]]] = [asyncio.Queue() for _ in range(subscribers)]
    consumers = [asyncio.create_task(consume(q)) for q in queues]
    await asyncio.sleep(0)  # consumers are waiting in get(), like subscriptions
    puts = [q.put_nowait for q in queues]
    payload = PAYLOAD
    start = time.perf_counter()
    for i in range(n):
        for put in puts:
            put(payload)
        if i % batch == batch - 1:
            await asyncio.sleep(0)
    await cd.done.wait()
    elapsed = time.perf_counter() - start
    await asyncio.gather(*consumers)
    return elapsed


# -- (c) a naive per-publish scan dispatcher ---------------------------------------------------


def naive_match(pattern: str, topic: str) -> bool:
    """MQTT matching as hand-written code does it: split both and walk the levels."""
    p = pattern.split("/")
    t = topic.split("/")
    for i, level in enumerate(p):
        if level == "#":
            return True
        if i >= len(t) or (level != "+" and level != t[i]):
            return False
    return len(p) == len(t)


class NaiveBus:
    """A list of (pattern, handler); every publish serialises, scans and calls in place."""

    def __init__(self) -> None:
        self.subscriptions: list[tuple[str, AsyncHandler]] = []

    def subscribe(self, pattern: str, handler: AsyncHandler) -> None:
        self.subscriptions.append((pattern, handler))

    async def publish(self, topic: str, payload: Any) -> None:
        data = json.dumps(payload)
        for pattern, handler in self.subscriptions:
            if naive_match(pattern, topic):
                await handler(json.loads(data))


async def naive_scan(n: int, subscribers: int, batch: int) -> float:
    """``n`` publishes through `NaiveBus` to ``subscribers`` handlers; returns seconds."""
    del batch
    cd = Countdown(n * subscribers)
    handler = counting_handler(cd)
    bus = NaiveBus()
    for _ in range(subscribers):
        bus.subscribe(PATTERN, handler)
    publish = bus.publish
    payload = PAYLOAD
    start = time.perf_counter()
    for _ in range(n):
        await publish(TOPIC, payload)
    await cd.done.wait()
    elapsed = time.perf_counter() - start
    assert cd.count == cd.expected, (cd.count, cd.expected)
    return elapsed


# -- the throughput driver ---------------------------------------------------------------------

Runner = Callable[[int, int, int], Awaitable[float]]


@dataclass
class Case:
    name: str
    runner: Runner
    subscribers: int
    kind: str  # "bus", "queue" or "naive"
    messages: int = 0
    seconds: list[float] = field(default_factory=list)

    def rates(self) -> list[float]:
        return [self.messages * self.subscribers / s for s in self.seconds]

    def median_rate(self) -> float:
        return statistics.median(self.rates())


def throughput_cases() -> list[Case]:
    return [
        Case("bus memory:// handler, 1 sub", bus_handlers, 1, "bus"),
        Case("bus memory:// handler, 8 subs", bus_handlers, 8, "bus"),
        Case("bus memory:// iterator, 1 sub", bus_iterator, 1, "bus"),
        Case("bare asyncio.Queue, 1 sub", bare_queue, 1, "queue"),
        Case("bare asyncio.Queue, 8 subs", bare_queue, 8, "queue"),
        Case("naive scan + json, 1 sub", naive_scan, 1, "naive"),
        Case("naive scan + json, 8 subs", naive_scan, 8, "naive"),
    ]


async def run_once(case: Case, n: int, batch: int) -> float:
    gc.collect()
    return await case.runner(n, case.subscribers, batch)


async def run_throughput(
    cases: list[Case], messages: int, repeat: int, seconds: float, batch: int
) -> None:
    warmup = max(1_000, messages // 10)
    for case in cases:
        took = await run_once(case, warmup, batch)
        if seconds > 0:
            scale = min(50.0, max(0.05, seconds / (took * messages / warmup)))
            case.messages = max(warmup, int(round(messages * scale, -3)))
        else:
            case.messages = messages
    for _ in range(repeat):  # interleaved, so drift hits every case alike
        for case in cases:
            case.seconds.append(await run_once(case, case.messages, batch))


# -- (d) envelope codec ------------------------------------------------------------------------


@dataclass
class CodecCase:
    name: str
    bench: Callable[[int], int]  # iterations -> elapsed ns
    target: bool = False
    ns: list[float] = field(default_factory=list)

    def median_ns(self) -> float:
        return statistics.median(self.ns)


def bench_envelope(iterations: int) -> int:
    codec = Codec("json", SOURCE)
    decode = decoder_for(Any).decode
    envelope = codec.envelope
    encode = codec.encode_envelope
    payload = PAYLOAD
    start = time.perf_counter_ns()
    for _ in range(iterations):
        env = envelope(TOPIC, payload)
        decode(TOPIC, encode(env))
    return time.perf_counter_ns() - start


def bench_envelope_round_trip(iterations: int) -> int:
    """Encode an envelope and decode the body again: what crosses a broker, per message."""
    codec = Codec("json", SOURCE)
    env = codec.envelope(TOPIC, PAYLOAD)
    encode = codec.encode_envelope
    decode = decoder_for(Any).decode
    start = time.perf_counter_ns()
    for _ in range(iterations):
        decode(TOPIC, encode(env))
    return time.perf_counter_ns() - start


def bench_envelope_build(iterations: int) -> int:
    envelope = Codec("json", SOURCE).envelope
    payload = PAYLOAD
    start = time.perf_counter_ns()
    for _ in range(iterations):
        envelope(TOPIC, payload)
    return time.perf_counter_ns() - start


def bench_envelope_encode(iterations: int) -> int:
    codec = Codec("json", SOURCE)
    env = codec.envelope(TOPIC, PAYLOAD)
    encode = codec.encode_envelope
    start = time.perf_counter_ns()
    for _ in range(iterations):
        encode(env)
    return time.perf_counter_ns() - start


def bench_envelope_decode(iterations: int) -> int:
    codec = Codec("json", SOURCE)
    data = codec.encode_envelope(codec.envelope(TOPIC, PAYLOAD))
    decode = decoder_for(Any).decode
    start = time.perf_counter_ns()
    for _ in range(iterations):
        decode(TOPIC, data)
    return time.perf_counter_ns() - start


def equivalent_dict(payload: Any) -> dict[str, Any]:
    """The envelope's fields as a plain dict, built the same way (fresh id and time)."""
    return {
        "specversion": "1.0",
        "id": new_id(),
        "source": SOURCE,
        "type": TYPE,
        "time": datetime.now(UTC).isoformat(),
        "topic": TOPIC,
        "data": payload,
        "datacontenttype": "application/json",
    }


def bench_stdlib_json(iterations: int) -> int:
    """The same fields as a dict, ``json.dumps`` then ``json.loads`` (the round trip)."""
    dumps = json.dumps
    loads = json.loads
    event = equivalent_dict(PAYLOAD)
    start = time.perf_counter_ns()
    for _ in range(iterations):
        loads(dumps(event).encode())
    return time.perf_counter_ns() - start


def bench_msgspec_dict(iterations: int) -> int:
    """The same fields as a dict through msgspec.json without a schema."""
    encode = msgspec.json.Encoder().encode
    decode = msgspec.json.Decoder().decode
    event = equivalent_dict(PAYLOAD)
    start = time.perf_counter_ns()
    for _ in range(iterations):
        decode(encode(event))
    return time.perf_counter_ns() - start


def codec_cases() -> list[CodecCase]:
    return [
        CodecCase("envelope encode+decode (round trip)", bench_envelope_round_trip, target=True),
        CodecCase("  of which encode_envelope()", bench_envelope_encode),
        CodecCase("  of which decoder.decode()", bench_envelope_decode),
        CodecCase("envelope build (Codec.envelope)", bench_envelope_build),
        CodecCase("build + round trip", bench_envelope),
        CodecCase("stdlib json dumps+loads (dict)", bench_stdlib_json),
        CodecCase("msgspec.json enc+dec (dict)", bench_msgspec_dict),
    ]


def run_codec(cases: list[CodecCase], iterations: int, repeat: int) -> None:
    for case in cases:
        case.bench(max(1_000, iterations // 10))  # warm-up
    for _ in range(repeat):
        for case in cases:
            gc.collect()
            case.ns.append(case.bench(iterations) / iterations)


# -- report ------------------------------------------------------------------------------------


def si(value: float) -> str:
    if value >= 1e6:
        return f"{value / 1e6:.2f}M"
    if value >= 1e3:
        return f"{value / 1e3:.0f}k"
    return f"{value:.0f}"


def rows(cases: list[Case], codecs: list[CodecCase]) -> Iterator[tuple[str, ...]]:
    ceiling = {c.subscribers: c.median_rate() for c in cases if c.kind == "queue"}
    for c in cases:
        rate = c.median_rate()
        spread = f"{si(min(c.rates()))}-{si(max(c.rates()))}"
        ratio = rate / ceiling[c.subscribers]
        if c.kind == "bus":
            target = f">= {si(TARGET_RATE)}/s, >= {TARGET_RATIO:.1f}x"
            misses = [
                what
                for what, ok in (("rate", rate >= TARGET_RATE), ("ratio", ratio >= TARGET_RATIO))
                if not ok
            ]
            verdict = "pass" if not misses else "FAIL (" + ", ".join(misses) + ")"
        else:
            target = verdict = "-"
        yield (
            c.name,
            f"{si(c.messages)}",
            f"{si(rate)}/s",
            spread,
            f"{ratio:.2f}x",
            target,
            verdict,
        )
    stdlib = next(c for c in codecs if c.name.startswith("stdlib")).median_ns()
    for k in codecs:
        ns = k.median_ns()
        spread = f"{min(k.ns):.0f}-{max(k.ns):.0f}"
        if k.target:
            target = f"<= {TARGET_NS:.0f} ns"
            verdict = "pass" if ns <= TARGET_NS else "FAIL"
        else:
            target = verdict = "-"
        yield (k.name, "", f"{ns:.0f} ns/msg", spread, f"{ns / stdlib:.2f}x", target, verdict)


def print_table(cases: list[Case], codecs: list[CodecCase]) -> None:
    header = ("case", "msgs", "deliveries/s | ns", "min-max", "ratio*", "target", "result")
    body = list(rows(cases, codecs))
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def line(r: tuple[str, ...]) -> str:
        return " | ".join(
            cell.ljust(w) if i in (0, 5, 6) else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(r, widths, strict=True))
        )

    print(line(header))
    print("-+-".join("-" * w for w in widths))
    for i, r in enumerate(body):
        if i == len(cases):
            print("-+-".join("-" * w for w in widths))
        print(line(r))
    print(
        "* ratio: throughput rows vs the bare asyncio.Queue with the same subscriber count; "
        "codec rows vs stdlib json"
    )
    naive = {c.subscribers: c.median_rate() for c in cases if c.kind == "naive"}
    print(
        "  bus vs naive scan: "
        + ", ".join(
            f"{c.name.removeprefix('bus memory:// ')} {c.median_rate() / naive[c.subscribers]:.2f}x"
            for c in cases
            if c.kind == "bus"
        )
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--messages", type=int, default=100_000, help="base message count N (default 100000)"
    )
    parser.add_argument("--repeat", type=int, default=5, help="repeats; medians (default 5)")
    parser.add_argument(
        "--seconds",
        type=float,
        default=0.75,
        help="scale each throughput case to about this long per run; 0 = N messages each",
    )
    parser.add_argument(
        "--iterations", type=int, default=100_000, help="codec iterations per repeat"
    )
    parser.add_argument(
        "--batch", type=int, default=5_000, help="bare-queue producer yields every B messages"
    )
    args = parser.parse_args(argv)
    if args.messages < 1 or args.repeat < 1 or args.iterations < 1 or args.batch < 1:
        parser.error("--messages, --repeat, --iterations and --batch must be >= 1")

    began = time.perf_counter()
    print(f"Python {sys.version.split()[0]} ({platform.python_implementation()}) on {sys.platform}")
    print(
        f"CPUs: {os.cpu_count()}  |  cascade-bus {cascade_bus.__version__} "
        f"({os.path.dirname(cascade_bus.__file__ or '?')})  |  "
        f"msgspec {msgspec.__version__}  |  "
        f"loop policy: {type(asyncio.get_event_loop_policy()).__name__}"
    )
    print(
        f"N={args.messages}  repeat={args.repeat} (medians)  ~{args.seconds}s per run  "
        f"codec iterations={args.iterations}  payload={json.dumps(PAYLOAD)}"
    )
    print(f"topic {TOPIC!r}, subscriptions on {PATTERN!r}")
    print()

    cases = throughput_cases()
    asyncio.run(run_throughput(cases, args.messages, args.repeat, args.seconds, args.batch))
    codecs = codec_cases()
    run_codec(codecs, args.iterations, args.repeat)
    print_table(cases, codecs)
    print(f"\ntotal run time {time.perf_counter() - began:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
