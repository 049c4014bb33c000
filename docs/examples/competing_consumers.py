"""Competing consumers: three workers share one queue group, each job goes to one of them.

On memory:// the workers are buses in one process; on MQTT 5, NATS or Redis each would be its
own process (start the same worker N times) and the broker splits the work.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import cascade_bus

URL = "memory://scaling"


async def main() -> None:
    """Publish 9 jobs to a queue group of 3 workers and show who handled what."""
    handled: Counter[str] = Counter()
    done = asyncio.Event()

    def worker(name: str) -> cascade_bus.Handler[object]:
        def handle(env: cascade_bus.Envelope[object]) -> None:
            handled[name] += 1
            if sum(handled.values()) == 9:
                done.set()

        return handle

    workers = [cascade_bus.connect(URL) for _ in range(3)]
    for i, bus in enumerate(workers):
        await bus.open()
        await bus.subscribe("jobs/resize", worker(f"worker-{i}"), queue="resizers", qos=1)
    async with cascade_bus.connect(URL) as producer:
        for job in range(9):
            await producer.publish("jobs/resize", {"job": job}, qos=1)
        await asyncio.wait_for(done.wait(), timeout=5)
    for bus in workers:
        await bus.close()
    print("jobs per worker:", dict(sorted(handled.items())))


if __name__ == "__main__":
    asyncio.run(main())
