"""Queue groups: subscriptions sharing a queue name split the messages between them."""

import asyncio
from collections import Counter

import cascade_bus
from cascade_bus import Envelope


async def main() -> None:
    """Two workers in the queue group "resizers" share six jobs; a logger sees all six."""
    async with cascade_bus.connect("memory://jobs") as bus:
        done: Counter[str] = Counter()
        logged: list[int] = []
        finished = asyncio.Event()

        def check() -> None:
            if sum(done.values()) == 6 and len(logged) == 6:
                finished.set()

        def worker(name: str) -> cascade_bus.Handler[dict[str, int]]:
            async def handle(env: Envelope[dict[str, int]]) -> None:
                done[name] += 1
                check()

            return handle

        def log(env: Envelope[dict[str, int]]) -> None:  # handlers may be plain functions
            logged.append(env.payload["n"])
            check()

        await bus.subscribe("jobs/resize", worker("worker-a"), queue="resizers")
        await bus.subscribe("jobs/resize", worker("worker-b"), queue="resizers")
        # A plain subscription on the same topic still sees every message.
        await bus.subscribe("jobs/#", log)

        for n in range(6):
            await bus.publish("jobs/resize", {"n": n})
        await asyncio.wait_for(finished.wait(), timeout=1.0)
        print("jobs per worker:", dict(sorted(done.items())), "total", sum(done.values()))
        print("logger saw:", logged)


if __name__ == "__main__":
    asyncio.run(main())
