"""Redis: the adapter's own RESP connection against redis-py's asyncio ``Connection``.

Not a test: run it and read the figures (they back "Why its own RESP client" in
docs/transports/redis.md).

    .venv/bin/python bench/bench_redis_connection.py [--messages N] [--repeat R]

On a private redis-server (``requirepass``, started here on a free port and stopped after):

- handshake: TCP connect + AUTH + SELECT 1 + CLIENT SETNAME, median over 200 of each,
  alternating; ``RespConnection.open`` pipelines the three commands (one round trip),
  ``Connection.connect`` awaits each;
- pub/sub receive: N messages of 100 B PUBLISHed by a separate process; this process's CPU per
  message until all arrived, ``RespConnection`` (hiredis reader, a push callback per message)
  against ``Connection.read_response()`` per message (redis-py's hiredis parser);
- pipelined replies: N PINGs written at once, then every reply: resolved in FIFO order by
  ``RespConnection`` against one ``read_response()`` per reply.

Both use hiredis (redis-py picks ``_AsyncHiredisParser`` when it is installed).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from typing import Any

from cascade_bus_redis._resp import RespConnection, pack
from redis.asyncio.connection import Connection

from cascade_bus.testing.brokers import start_redis

PASSWORD = "pw"

PUBLISHER = r"""
import asyncio, sys
import redis.asyncio as aredis

async def main(port: int, channel: str, n: int) -> None:
    r = aredis.Redis(port=port, password="pw", protocol=2)
    body = b"x" * 100
    for start in range(0, n, 1000):
        pipe = r.pipeline(transaction=False)
        for _ in range(min(1000, n - start)):
            pipe.publish(channel, body)
        await pipe.execute()
    await r.aclose()

asyncio.run(main(int(sys.argv[1]), sys.argv[2], int(sys.argv[3])))
"""


async def handshake(port: int, rounds: int = 200) -> tuple[float, float]:
    """Median microseconds to connect and run AUTH + SELECT + CLIENT SETNAME: ours, redis-py."""
    ours: list[float] = []
    theirs: list[float] = []
    for i in range(rounds):
        for which in ("ours", "redis-py") if i % 2 else ("redis-py", "ours"):
            t0 = time.perf_counter()
            if which == "ours":
                conn = RespConnection("bench")
                await conn.open(
                    "127.0.0.1", port, password=PASSWORD, db=1, client_name="bench:commands"
                )
                ours.append(time.perf_counter() - t0)
                conn.abort()
            else:
                rconn = Connection(
                    host="127.0.0.1",
                    port=port,
                    password=PASSWORD,
                    db=1,
                    client_name="bench:commands",
                    protocol=2,
                )
                await rconn.connect()
                theirs.append(time.perf_counter() - t0)
                await rconn.disconnect()
    return statistics.median(ours) * 1e6, statistics.median(theirs) * 1e6


async def pubsub_receive(port: int, which: str, n: int) -> float:
    """CPU microseconds per pub/sub message received."""
    channel = f"bench:{which}:{time.time()}"
    done = asyncio.Event()
    conn: RespConnection | None = None
    rconn: Connection | None = None
    task: asyncio.Task[None] | None = None
    if which == "ours":
        got = 0
        subscribed = asyncio.Event()

        def push(reply: Any) -> None:
            nonlocal got
            if reply[0] == b"message":
                got += 1
                if got == n:
                    done.set()
            elif reply[0] == b"subscribe":
                subscribed.set()

        conn = RespConnection("bench", on_push=push)
        await conn.open("127.0.0.1", port, password=PASSWORD)
        conn.send_raw(pack(b"SUBSCRIBE", channel))
        await subscribed.wait()
    else:
        rconn = Connection(host="127.0.0.1", port=port, password=PASSWORD, protocol=2)
        await rconn.connect()
        await rconn.send_command("SUBSCRIBE", channel)
        await rconn.read_response()

        async def read_all(c: Connection) -> None:
            for _ in range(n):
                await c.read_response()
            done.set()

        task = asyncio.ensure_future(read_all(rconn))
    publisher = await asyncio.create_subprocess_exec(
        sys.executable, "-c", PUBLISHER, str(port), channel, str(n)
    )
    c0 = time.process_time()
    async with asyncio.timeout(120):
        await done.wait()
    cpu = time.process_time() - c0
    await publisher.wait()
    if task is not None:
        await task
    if conn is not None:
        conn.abort()
    if rconn is not None:
        await rconn.disconnect()
    return cpu / n * 1e6


async def replies(port: int, which: str, n: int) -> float:
    """CPU microseconds per reply of N pipelined PINGs."""
    ping = pack(b"PING")
    if which == "ours":
        conn = RespConnection("bench")
        await conn.open("127.0.0.1", port, password=PASSWORD)
        c0 = time.process_time()
        for _ in range(n):
            conn.send(ping, None)
        await conn.call(b"PING")
        cpu = time.process_time() - c0
        conn.abort()
    else:
        rconn = Connection(host="127.0.0.1", port=port, password=PASSWORD, protocol=2)
        await rconn.connect()
        c0 = time.process_time()
        await rconn.send_packed_command(ping * (n + 1), check_health=False)
        for _ in range(n + 1):
            await rconn.read_response()
        cpu = time.process_time() - c0
        await rconn.disconnect()
    return cpu / n * 1e6


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


async def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    broker = start_redis(extra_args=("--requirepass", PASSWORD))
    try:
        ours, theirs = await handshake(broker.port)
        print("handshake (connect + AUTH + SELECT + CLIENT SETNAME), median microseconds:")
        print(f"  RespConnection.open     {ours:7.0f}")
        print(f"  redis-py Connection     {theirs:7.0f}")
        for label, measure in (
            ("pub/sub receive, CPU us per message", pubsub_receive),
            ("pipelined replies, CPU us per reply", replies),
        ):
            results: dict[str, list[float]] = {"ours": [], "redis-py": []}
            for _ in range(args.repeat):
                for which in results:  # alternating
                    results[which].append(await measure(broker.port, which, args.messages))
            print(f"{label}, median (min-max) of {args.repeat}:")
            print(f"  RespConnection          {spread(results['ours'])}")
            print(f"  redis-py read_response  {spread(results['redis-py'])}")
    finally:
        broker.close()


if __name__ == "__main__":
    asyncio.run(main())
