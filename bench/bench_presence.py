"""Crash detection of ``presence``: SIGKILL a bus in a child process, time the "offline".

Not a test: run it and read the table.

    .venv/bin/python bench/bench_presence.py [--rounds R] [--interval S] [URL ...]

For each URL (by default the local MQTT, NATS and Redis brokers of docs/testing.md) and each
round: a child process opens a bus with ``presence=<topic>, presence_interval=S`` and prints
"ready"; this process, subscribed with a sweeping bus (``presence_sweep=True``, same interval),
waits for the retained online status, SIGKILLs the child and measures the time until the
offline status arrives. The table shows min / median / max over the rounds next to the stated
bound (MQTT: the broker's will, at once when the socket closes; NATS and Redis: 5 intervals).
Side by side, the raw client's floor: how long the broker itself takes to notice the dead
socket is the MQTT row (there is no raw-client way to notice a crash on NATS or Redis).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid
from typing import Any

import cascade_bus
from cascade_bus._presence import CRASH_BOUND_INTERVALS

VICTIM = """
import asyncio, sys
import cascade_bus

async def main() -> None:
    url, topic, interval = sys.argv[1], sys.argv[2], float(sys.argv[3])
    await cascade_bus.connect(url, presence=topic, presence_interval=interval)
    print("ready", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""

DEFAULT_URLS = ["mqtt://127.0.0.1:1883", "nats://127.0.0.1:4222", "redis://127.0.0.1:6379"]


async def one_round(url: str, interval: float) -> float:
    """Seconds from SIGKILL to the offline status, for one child bus."""
    topic = f"bench/presence/{uuid.uuid4().hex[:8]}"
    statuses: asyncio.Queue[tuple[float, Any]] = asyncio.Queue()

    def on_status(env: cascade_bus.Envelope[Any]) -> None:
        statuses.put_nowait((time.monotonic(), env.payload))

    async with cascade_bus.connect(url, presence_sweep=True, presence_interval=interval) as bus:
        await bus.subscribe(topic, on_status, qos=1)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", VICTIM, url, topic, str(interval),
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            assert proc.stdout is not None
            async with asyncio.timeout(30):
                assert await proc.stdout.readline() == b"ready\n"
                _, online = await statuses.get()
            assert online == {"status": "online"}, online
            proc.kill()
            killed = time.monotonic()
            async with asyncio.timeout(interval * CRASH_BOUND_INTERVALS + 10):
                at, offline = await statuses.get()
            assert offline == {"status": "offline"}, offline
        finally:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
        await bus.publish(topic, b"", qos=1, retain=True)  # leave nothing retained
    return at - killed


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("urls", nargs="*", default=DEFAULT_URLS)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--interval", type=float, default=1.0)
    args = parser.parse_args()
    print(f"presence_interval={args.interval}s, {args.rounds} rounds, SIGKILL -> offline")
    print(f"{'transport':<26} {'mechanism':<18} {'bound':>8} {'min':>8} {'median':>8} {'max':>8}")
    for url in args.urls:
        leased = not url.startswith("mqtt")
        bound = f"{args.interval * CRASH_BOUND_INTERVALS:.1f}s" if leased else "will"
        times = [await one_round(url, args.interval) for _ in range(args.rounds)]
        print(
            f"{url:<26} {'leases + sweep' if leased else 'last will (native)':<18} {bound:>8} "
            f"{min(times):>7.3f}s {statistics.median(times):>7.3f}s {max(times):>7.3f}s"
        )


if __name__ == "__main__":
    asyncio.run(main())
