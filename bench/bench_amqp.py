"""AMQP (RabbitMQ): cascade-bus against a naive aio-pika loop and FastStream, interleaved in rounds.

Not a test: run it and read the table.

    .venv/bin/python bench/bench_amqp.py [--url amqp://guest:guest@127.0.0.1:5672/]
        [--messages N] [--rounds R] [--pings P] [--cases a,b,...]

Every case moves the same N messages (~100 B JSON payload) from one publisher to one subscriber,
each on its own connection in this process, on an exchange of the run's own (deleted at the
end); its clock runs from the first publish until the subscriber has *received and decoded* all
N (counted exactly; a case that gets fewer times out and the run fails).

- ``aio-pika naive``: what an aio-pika user writes: ``await exchange.publish(Message(json))`` per
  message on a channel with publisher confirms (aio-pika's default, so each publish waits for
  the broker's ack); the subscriber consumes its own queue (no ack) and decodes each body.
- ``cascade-bus awaited publish``: the naive loop ``await bus.publish(topic, payload)`` (QoS 0:
  confirms are collected in the background), default JSON envelope and ``format=raw``; the
  subscriber is a bus handler.
- ``cascade-bus QoS 1``: ``bus.publish(..., qos=1)`` gathered in batches of 1,000 (each returns
  on the broker's confirm), a QoS 1 subscription (ack after the handler).
- ``faststream rabbit`` (optional, skipped with the reason when it cannot be imported):
  FastStream's ``RabbitBroker`` as its users write it, ``await broker.publish(payload, queue)``
  one by one, a ``@broker.subscriber`` handler taking the decoded dict; ``logger=None`` on both
  (by default it logs two lines per message, which no other case does).

The cases run in R rounds, in an order that rotates each round, so load from other jobs on the
shared 2-core machine hits all alike; the table gives the median (and min-max) over rounds, and
the ratio against aio-pika computed per round. Latency: the first delivery after ``subscribe()``
(a fresh subscription, then one publish), and P ping-pongs of one message, publish -> handler,
p50/p99 in microseconds, bare aio-pika against cascade-bus. Retained: ``subscribe()`` time
against the length of the retained log, reading the whole log and with snapshots
(``--retained-sizes``). A target line says PASS only if every round met it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aio_pika

import cascade_bus

EXCHANGE = f"cbbench_{uuid.uuid4().hex[:8]}"


def payload(i: int) -> dict[str, Any]:
    return {"sensor": "t1", "value": 21.5, "seq": i, "pad": "x" * 48}


@dataclass
class Run:
    n: int
    wall: float
    publish_wall: float


Case = Callable[[str, int], Awaitable[Run]]


class Counter:
    """Counts received messages; ``done`` is set at ``n``."""

    def __init__(self, n: int) -> None:
        self.n, self.seen, self.done = n, 0, asyncio.Event()

    def hit(self) -> None:
        self.seen += 1
        if self.seen >= self.n:
            self.done.set()


async def _finish(counter: Counter, t0: float, t_pub: float) -> Run:
    async with asyncio.timeout(120):
        await counter.done.wait()
    return Run(counter.n, time.perf_counter() - t0, t_pub)


async def _pika_pair(url: str) -> tuple[Any, Any, Any, Any]:
    pub_conn = await aio_pika.connect(url)
    sub_conn = await aio_pika.connect(url)
    pub_channel = await pub_conn.channel()
    exchange = await pub_channel.declare_exchange(
        EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
    )
    sub_channel = await sub_conn.channel()
    return pub_conn, sub_conn, exchange, sub_channel


async def case_pika(url: str, n: int) -> Run:
    pub_conn, sub_conn, exchange, sub_channel = await _pika_pair(url)
    try:
        queue = await sub_channel.declare_queue(exclusive=True)
        await queue.bind(EXCHANGE, "bench.pika")
        counter = Counter(n)

        async def on_message(message: Any) -> None:
            json.loads(message.body)
            counter.hit()

        await queue.consume(on_message, no_ack=True)
        t0 = time.perf_counter()
        for i in range(n):
            body = json.dumps(payload(i)).encode()
            await exchange.publish(aio_pika.Message(body), routing_key="bench.pika")
        return await _finish(counter, t0, time.perf_counter() - t0)
    finally:
        await pub_conn.close()
        await sub_conn.close()


def case_bus(fmt: str, qos: int) -> Case:
    async def run(url: str, n: int) -> Run:
        async with (
            cascade_bus.connect(url, exchange=EXCHANGE, format=fmt) as pub,
            cascade_bus.connect(url, exchange=EXCHANGE, format=fmt) as sub,
        ):
            counter = Counter(n)
            await sub.subscribe(f"bench/bus{qos}", lambda env: counter.hit(), qos=qos)
            t0 = time.perf_counter()
            if qos:
                for start in range(0, n, 1000):
                    await asyncio.gather(
                        *(
                            pub.publish(f"bench/bus{qos}", payload(i), qos=1)
                            for i in range(start, min(n, start + 1000))
                        )
                    )
            else:
                for i in range(n):
                    await pub.publish(f"bench/bus{qos}", payload(i))
            return await _finish(counter, t0, time.perf_counter() - t0)

    return run


async def case_faststream(url: str, n: int) -> Run:
    from faststream.rabbit import RabbitBroker  # optional

    publisher, subscriber = RabbitBroker(url, logger=None), RabbitBroker(url, logger=None)
    counter = Counter(n)
    queue = f"{EXCHANGE}.faststream"

    @subscriber.subscriber(queue)
    async def handle(body: dict[str, Any]) -> None:
        counter.hit()

    async with publisher, subscriber:
        await subscriber.start()
        t0 = time.perf_counter()
        for i in range(n):
            await publisher.publish(payload(i), queue)
        result = await _finish(counter, t0, time.perf_counter() - t0)
    conn = await aio_pika.connect(url)
    async with conn:
        await (await conn.channel()).queue_delete(queue)
    return result


CASES: dict[str, Case] = {
    "aio-pika naive": case_pika,
    "cascade-bus awaited publish": case_bus("json", 0),
    "cascade-bus awaited publish (raw)": case_bus("raw", 0),
    "cascade-bus QoS 1": case_bus("json", 1),
    "faststream rabbit": case_faststream,
}


async def latency(url: str, pings: int) -> dict[str, list[float]]:
    """First delivery after subscribe and steady ping-pong, aio-pika vs cascade-bus (µs)."""
    out: dict[str, list[float]] = {"pika": [], "bus": [], "first_pika": [], "first_bus": []}
    pub_conn, sub_conn, exchange, sub_channel = await _pika_pair(url)
    async with (
        cascade_bus.connect(url, exchange=EXCHANGE) as pub,
        cascade_bus.connect(url, exchange=EXCHANGE) as sub,
    ):
        got: asyncio.Queue[float] = asyncio.Queue()
        for k in range(5):  # first delivery after a fresh subscription, both sides
            t0 = time.perf_counter()
            queue = await sub_channel.declare_queue(exclusive=True, auto_delete=True)
            await queue.bind(EXCHANGE, f"first.pika.{k}")
            await queue.consume(lambda m: got.put_nowait(time.perf_counter()), no_ack=True)
            await exchange.publish(aio_pika.Message(b"{}"), routing_key=f"first.pika.{k}")
            out["first_pika"].append((await asyncio.wait_for(got.get(), 10) - t0) * 1e6)
            t0 = time.perf_counter()
            await sub.subscribe(f"first/bus/{k}", lambda e: got.put_nowait(time.perf_counter()))
            await pub.publish(f"first/bus/{k}", {})
            out["first_bus"].append((await asyncio.wait_for(got.get(), 10) - t0) * 1e6)
        queue = await sub_channel.declare_queue(exclusive=True)
        await queue.bind(EXCHANGE, "ping.pika")
        await queue.consume(lambda m: got.put_nowait(time.perf_counter()), no_ack=True)
        await sub.subscribe("ping/bus", lambda e: got.put_nowait(time.perf_counter()))
        plain = aio_pika.Message(b'{"p": 1}')
        for _ in range(pings):
            t0 = time.perf_counter()
            await exchange.publish(plain, routing_key="ping.pika")
            out["pika"].append((await asyncio.wait_for(got.get(), 10) - t0) * 1e6)
            t0 = time.perf_counter()
            await pub.publish("ping/bus", {"p": 1})
            out["bus"].append((await asyncio.wait_for(got.get(), 10) - t0) * 1e6)
    await pub_conn.close()
    await sub_conn.close()
    return out


async def retained_replay(url: str, sizes: list[int]) -> list[tuple[int, float, float]]:
    """``subscribe()`` time against the retained log's length, without and with snapshots.

    1,000 retained topics rewritten until the log holds each size; median of 5 subscribes to a
    pattern with no retained value (ms). "without" disables snapshots (``COMPACT_AFTER``).
    """
    import cascade_bus_amqp._retained as retained

    rows: list[tuple[int, float, float]] = []
    results: dict[bool, list[float]] = {}
    default = retained.COMPACT_AFTER
    for snapshots in (False, True):
        retained.COMPACT_AFTER = default if snapshots else 10**12
        exchange = f"{EXCHANGE}_r{int(snapshots)}"
        times: list[float] = []
        async with cascade_bus.connect(url, exchange=exchange) as bus:
            total = 0
            for size in sizes:
                while total < size:
                    end = min(size, total + 1000)
                    await asyncio.gather(
                        *(
                            bus.publish(f"r/{i % 1000}", payload(i), retain=True)
                            for i in range(total, end)
                        )
                    )
                    total = end
                samples = []
                for k in range(5):
                    t0 = time.perf_counter()
                    sub = await bus.subscribe(f"other/{k}", lambda env: None)
                    samples.append((time.perf_counter() - t0) * 1e3)
                    await sub.unsubscribe()
                times.append(statistics.median(samples))
        results[snapshots] = times
        await _drop(url, exchange)
    retained.COMPACT_AFTER = default
    for i, size in enumerate(sizes):
        rows.append((size, results[False][i], results[True][i]))
    return rows


async def _drop(url: str, exchange: str) -> None:
    conn = await aio_pika.connect(url)
    async with conn:
        channel = await conn.channel()
        for queue in (f"{exchange}.retained", f"{exchange}.retained.head"):
            await channel.queue_delete(queue)
        await channel.exchange_delete(exchange)


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pings", type=int, default=300)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument(
        "--retained-sizes", default="0,1000,10000", help="log lengths for the replay table"
    )
    args = parser.parse_args()
    names = [name for name in args.cases.split(",") if name]
    rates: dict[str, list[float]] = {name: [] for name in names}
    ratios: dict[str, list[float]] = {name: [] for name in names}
    failed: dict[str, str] = {}
    try:
        for r in range(args.rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            round_rates: dict[str, float] = {}
            for name in order:
                if name in failed:
                    continue
                try:
                    run = await CASES[name](args.url, args.messages)
                except ImportError as exc:
                    failed[name] = f"not run: {exc}"
                    continue
                round_rates[name] = run.n / run.wall
                rates[name].append(run.n / run.wall)
            base = round_rates.get("aio-pika naive")
            for name, rate in round_rates.items():
                if base:
                    ratios[name].append(rate / base)
        lat = await latency(args.url, args.pings)
        sizes = [int(size) for size in args.retained_sizes.split(",") if size]
        replays = await retained_replay(args.url, sizes) if sizes else []
    finally:
        await _drop(args.url, EXCHANGE)
    print(f"\n{args.messages} messages x {args.rounds} rounds, {args.url.split('@')[-1]}\n")
    print(f"{'case':36} {'msg/s median':>13} {'min-max':>17} {'x aio-pika':>11}")
    for name in names:
        if name in failed:
            print(f"{name:36} {failed[name]}")
            continue
        values = rates[name]
        spread = f"{min(values):,.0f}-{max(values):,.0f}"
        ratio = statistics.median(ratios[name]) if ratios[name] else float("nan")
        print(f"{name:36} {statistics.median(values):>13,.0f} {spread:>17} {ratio:>10.2f}x")
    print(f"\n{'latency (µs)':36} {'p50':>10} {'p99':>10}")
    for key, label in (
        ("first_pika", "first delivery after subscribe, aio-pika"),
        ("first_bus", "first delivery after subscribe, bus"),
        ("pika", "ping-pong, aio-pika"),
        ("bus", "ping-pong, cascade-bus"),
    ):
        print(f"{label:44} {_pct(lat[key], 0.5):>10,.0f} {_pct(lat[key], 0.99):>10,.0f}")
    added = _pct(lat["bus"], 0.5) - _pct(lat["pika"], 0.5)
    print(f"{'added p50 (bus - aio-pika)':44} {added:>10,.0f}")
    if replays:
        header = f"{'subscribe() ms, whole log':>26} {'with snapshots':>15}"
        print(f"\n{'retained log entries':24} {header}")
        for size, whole, snap in replays:
            print(f"{size:>24,} {whole:>26.1f} {snap:>15.1f}")
    print()
    for name, target in (
        ("cascade-bus awaited publish", 2.0),
        ("faststream rabbit", None),
    ):
        if target is not None and ratios.get(name):
            verdict = "PASS" if min(ratios[name]) >= target else "FAIL"
            print(f"target: {name} >= {target}x aio-pika naive: {verdict}")
    bus, fs = rates.get("cascade-bus awaited publish"), rates.get("faststream rabbit")
    if bus and fs and "faststream rabbit" not in failed:
        per_round = [b / f for b, f in zip(bus, fs, strict=False)]
        verdict = "PASS" if min(per_round) >= 3.0 else "FAIL"
        print(f"target: cascade-bus awaited publish >= 3x faststream rabbit: {verdict} "
              f"(median {statistics.median(per_round):.2f}x)")  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main())
