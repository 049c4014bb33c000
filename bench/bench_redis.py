"""Redis: cascade-bus against bare redis-py (and broadcaster) on the same server, in one run.

Not a test: run it and read the table.

    .venv/bin/python bench/bench_redis.py [--url redis://127.0.0.1:6379] [--messages N]
        [--repeat R] [--pings P]

Throughput (messages/s, median of R runs; each case has one publisher and one subscriber on their
own connections in this process; the clock runs from the first publish until the subscriber has
all N messages; "publish" is the rate at which the publisher's loop got through them):

- ``redis-py awaited``: ``await r.publish(channel, json)`` per message; the subscriber iterates
  ``PubSub.listen()`` and decodes each body.
- ``redis-py pipelined``: the same PUBLISHes in ``pipeline(transaction=False)`` batches of 1,000.
- ``cascade-bus awaited``: the naive loop ``await bus.publish(topic, payload)`` (QoS 0, default
  JSON envelope; and ``format=raw``); the subscriber is a bus handler.
- ``redis-py streams``: pipelined XADD (batches of 1,000), consumer XREADGROUP (COUNT 500) +
  XACK per batch.
- ``cascade-bus QoS 1``: ``bus.publish(..., qos=1)`` in gathered batches of 1,000 (each publish
  returns when Redis replied), a QoS 1 subscription (stream, XACK after the handler).

broadcaster 0.3.1 was tried (its Redis backend wraps redis-py's PubSub) and delivered nothing with
redis-py 8.1 in a minimal publish/subscribe script, so it has no row; FastStream was not tried.

Latency: P ping-pongs of one message, publish -> subscriber callback, p50/p99 in microseconds,
bare redis-py (``publish`` + ``PubSub.listen``) against cascade-bus (``publish`` + handler).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import redis.asyncio as aredis

import cascade_bus
from cascade_bus import Envelope

Case = Callable[[str, int], Awaitable[tuple[float, float]]]


def payload(i: int) -> dict[str, Any]:
    return {"sensor": "t1", "value": 21.5, "seq": i, "pad": "x" * 48}


async def _await_done(done: asyncio.Event, timeout: float = 120.0) -> None:
    async with asyncio.timeout(timeout):
        await done.wait()


async def _raw_subscriber(url: str, channel: str, n: int) -> tuple[asyncio.Task[None], Any]:
    client = aredis.Redis.from_url(url, protocol=2)
    pubsub = client.pubsub()
    await pubsub.subscribe(channel)
    done = asyncio.Event()

    async def listen() -> None:
        got = 0
        async for message in pubsub.listen():
            if message["type"] == "message":
                msgspec.json.decode(message["data"])
                got += 1
                if got == n:
                    done.set()
                    return

    task = asyncio.create_task(listen())
    return task, (client, pubsub, done)


async def raw_case(url: str, n: int, *, batch: int) -> tuple[float, float]:
    channel = f"bench/{uuid.uuid4().hex}"
    task, (client_sub, pubsub, done) = await _raw_subscriber(url, channel, n)
    client = aredis.Redis.from_url(url, protocol=2)
    encode = msgspec.json.encode
    t0 = time.perf_counter()
    if batch <= 1:
        for i in range(n):
            await client.publish(channel, encode(payload(i)))
    else:
        for start in range(0, n, batch):
            pipe = client.pipeline(transaction=False)
            for i in range(start, min(n, start + batch)):
                pipe.publish(channel, encode(payload(i)))
            await pipe.execute()
    t_pub = time.perf_counter() - t0
    await _await_done(done)
    t_all = time.perf_counter() - t0
    await task
    await pubsub.aclose()
    await client_sub.aclose()
    await client.aclose()
    return n / t_all, n / t_pub


async def raw_awaited(url: str, n: int) -> tuple[float, float]:
    return await raw_case(url, n, batch=1)


async def raw_pipelined(url: str, n: int) -> tuple[float, float]:
    return await raw_case(url, n, batch=1000)


async def bus_case(url: str, n: int, *, qos: int = 0, fmt: str = "json") -> tuple[float, float]:
    topic = f"bench/{uuid.uuid4().hex}"
    done = asyncio.Event()
    got = 0

    def handler(env: Envelope[Any]) -> None:
        nonlocal got
        got += 1
        if got == n:
            done.set()

    async with (
        cascade_bus.connect(url, format=fmt) as subscriber,
        cascade_bus.connect(url, format=fmt) as publisher,
    ):
        await subscriber.subscribe(topic, handler, qos=qos)
        t0 = time.perf_counter()
        if qos == 0:
            for i in range(n):
                await publisher.publish(topic, payload(i))
        else:
            for start in range(0, n, 1000):
                await asyncio.gather(
                    *(
                        publisher.publish(topic, payload(i), qos=1)
                        for i in range(start, min(n, start + 1000))
                    )
                )
        t_pub = time.perf_counter() - t0
        await _await_done(done)
        t_all = time.perf_counter() - t0
    return n / t_all, n / t_pub


async def bus_awaited(url: str, n: int) -> tuple[float, float]:
    return await bus_case(url, n)


async def bus_awaited_raw(url: str, n: int) -> tuple[float, float]:
    return await bus_case(url, n, fmt="raw")


async def bus_qos1(url: str, n: int) -> tuple[float, float]:
    return await bus_case(url, n, qos=1)


async def raw_streams(url: str, n: int) -> tuple[float, float]:
    key = f"bench:{uuid.uuid4().hex}"
    producer = aredis.Redis.from_url(url, protocol=2)
    consumer = aredis.Redis.from_url(url, protocol=2)
    await consumer.xgroup_create(key, "g", id="0", mkstream=True)
    done = asyncio.Event()

    async def consume() -> None:
        got = 0
        while got < n:
            reply: Any = await consumer.xreadgroup("g", "c", {key: ">"}, count=500, block=5000)
            if not reply:
                continue
            entries = reply[0][1]
            for _, fields in entries:
                msgspec.json.decode(fields[b"d"])
            got += len(entries)
            await consumer.xack(key, "g", *(entry_id for entry_id, _ in entries))
        done.set()

    task = asyncio.create_task(consume())
    encode = msgspec.json.encode
    t0 = time.perf_counter()
    for start in range(0, n, 1000):
        pipe = producer.pipeline(transaction=False)
        for i in range(start, min(n, start + 1000)):
            pipe.xadd(key, {"t": "bench", "d": encode(payload(i))})
        await pipe.execute()
    t_pub = time.perf_counter() - t0
    await _await_done(done)
    t_all = time.perf_counter() - t0
    await task
    await producer.delete(key)
    await producer.aclose()
    await consumer.aclose()
    return n / t_all, n / t_pub


# -- latency ------------------------------------------------------------------------------------


async def raw_latency(url: str, pings: int) -> list[float]:
    channel = f"bench/{uuid.uuid4().hex}"
    client = aredis.Redis.from_url(url, protocol=2)
    sub_client = aredis.Redis.from_url(url, protocol=2)
    pubsub = sub_client.pubsub()
    await pubsub.subscribe(channel)
    arrived: asyncio.Future[float] | None = None

    async def listen() -> None:
        async for message in pubsub.listen():
            if message["type"] == "message":
                msgspec.json.decode(message["data"])
                if arrived is not None and not arrived.done():
                    arrived.set_result(time.perf_counter())

    task = asyncio.create_task(listen())
    samples: list[float] = []
    encode = msgspec.json.encode
    loop = asyncio.get_running_loop()
    for i in range(pings + 50):
        arrived = loop.create_future()
        t0 = time.perf_counter()
        await client.publish(channel, encode(payload(i)))
        t1 = await arrived
        if i >= 50:
            samples.append((t1 - t0) * 1e6)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await pubsub.aclose()  # type: ignore[no-untyped-call]
    await sub_client.aclose()
    await client.aclose()
    return samples


async def bus_latency(url: str, pings: int) -> list[float]:
    topic = f"bench/{uuid.uuid4().hex}"
    arrived: asyncio.Future[float] | None = None

    def handler(env: Envelope[Any]) -> None:
        if arrived is not None and not arrived.done():
            arrived.set_result(time.perf_counter())

    samples: list[float] = []
    loop = asyncio.get_running_loop()
    async with cascade_bus.connect(url) as subscriber, cascade_bus.connect(url) as publisher:
        await subscriber.subscribe(topic, handler)
        for i in range(pings + 50):
            arrived = loop.create_future()
            t0 = time.perf_counter()
            await publisher.publish(topic, payload(i))
            t1 = await arrived
            if i >= 50:
                samples.append((t1 - t0) * 1e6)
    return samples


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def fmt_rate(rate: float) -> str:
    return f"{rate / 1000:,.1f}k/s"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--url", default="redis://127.0.0.1:6379")
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--pings", type=int, default=2_000)
    args = parser.parse_args()
    n, url = args.messages, args.url
    slow_n = max(1000, n // 4)  # the round-trip-bound loops get fewer messages
    cases: list[tuple[str, Case, int]] = [
        ("redis-py awaited PUBLISH", raw_awaited, slow_n),
        ("redis-py pipelined PUBLISH", raw_pipelined, n),
        ("cascade-bus awaited publish (json)", bus_awaited, n),
        ("cascade-bus awaited publish (raw)", bus_awaited_raw, n),
        ("redis-py streams XADD+XREADGROUP", raw_streams, n),
        ("cascade-bus QoS 1 (streams)", bus_qos1, n),
    ]
    results: dict[str, tuple[float, float]] = {}
    for name, case, count in cases:
        await case(url, max(100, count // 10))  # warm-up
        runs = [await case(url, count) for _ in range(args.repeat)]
        results[name] = (
            statistics.median(r[0] for r in runs),
            statistics.median(r[1] for r in runs),
        )
    raw_lat = await raw_latency(url, args.pings)
    bus_lat = await bus_latency(url, args.pings)

    awaited = results["redis-py awaited PUBLISH"][0]
    pipelined = results["redis-py pipelined PUBLISH"][0]
    bus = results["cascade-bus awaited publish (json)"][0]
    width = max(len(name) for name in results) + 2
    print(f"\nRedis {url}, {n:,} messages of ~100 B (round-trip-bound loops: {slow_n:,}),")
    print(f"median of {args.repeat}; end-to-end = first publish until the subscriber had all\n")
    print(f"{'case':<{width}}| {'end-to-end':>11} | {'publish':>11} | vs awaited | vs pipelined")
    print("-" * width + "+-------------+-------------+------------+-------------")
    for name, (e2e, pub) in results.items():
        print(
            f"{name:<{width}}| {fmt_rate(e2e):>11} | {fmt_rate(pub):>11} | "
            f"{e2e / awaited:>9.2f}x | {e2e / pipelined:>11.2f}x"
        )
    added = pct(bus_lat, 0.5) - pct(raw_lat, 0.5)
    print("\nlatency (publish -> handler), microseconds:")
    for label, samples in (
        ("redis-py publish + PubSub.listen", raw_lat),
        ("cascade-bus publish + handler", bus_lat),
    ):
        print(f"  {label:<33} p50 {pct(samples, 0.5):7.0f}  p99 {pct(samples, 0.99):7.0f}")
    print("\ntargets:")
    checks = [
        (f">= 0.9x pipelined redis-py: {bus / pipelined:.2f}x", bus >= 0.9 * pipelined),
        (f">= 4x the awaited loop: {bus / awaited:.2f}x", bus >= 4 * awaited),
        (f"<= 30 us added p50: {added:+.0f} us", added <= 30),
    ]
    for text, ok in checks:
        print(f"  {'PASS' if ok else 'FAIL'}  {text}")


if __name__ == "__main__":
    asyncio.run(main())
