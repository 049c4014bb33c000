"""Flow control: a bounded queue per subscription, its overflow policy, and max_concurrency."""

import asyncio
import logging
import sys
from typing import Any

import cascade_bus
from cascade_bus import Envelope, Overflow

# The first overflow of a bus logs one warning; show it on stdout for this example.
logging.basicConfig(stream=sys.stdout, format="log: %(message)s")


async def drop_policy(overflow: Overflow) -> None:
    """Nobody reads while 8 messages arrive for a queue of 3: who survives?"""
    async with cascade_bus.connect(f"memory://flow-{overflow}") as bus:
        sub = await bus.subscribe("sensors/#", buffer_size=3, overflow=overflow)
        for reading in range(8):
            await bus.publish("sensors/temp", reading)  # never waits with a drop policy
        kept = [(await sub.get(timeout=1)).payload for _ in range(sub.pending)]
        print(f"{overflow}: kept {kept}, dropped {bus.stats().dropped}")


async def block_policy() -> None:
    """A slow reader holds the publisher back instead: nothing is lost, the queue stays small."""
    async with cascade_bus.connect("memory://flow-block") as bus:
        sub = await bus.subscribe("sensors/#", buffer_size=3, overflow="block")
        most_queued = 0

        async def slow_reader() -> list[int]:
            nonlocal most_queued
            got = []
            async for env in sub:
                most_queued = max(most_queued, sub.pending)
                await asyncio.sleep(0.001)  # slow work
                got.append(env.payload)
                if len(got) == 8:
                    return got
            return got

        reader = asyncio.create_task(slow_reader())
        for reading in range(8):
            await bus.publish("sensors/temp", reading)  # waits while the queue is full
        print(f"block: got {await reader}, at most {most_queued} queued, ", end="")
        print(f"dropped {bus.stats().dropped}")


async def concurrency() -> None:
    """max_concurrency=4: up to four handler calls at once (order is no longer kept)."""
    running = most = 0

    async def lookup(env: Envelope[Any]) -> None:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await asyncio.sleep(0.01)  # e.g. an HTTP call
        running -= 1

    async with cascade_bus.connect("memory://flow-concurrency") as bus:
        await bus.subscribe("jobs/#", lookup, max_concurrency=4)
        for job in range(10):
            await bus.publish("jobs/lookup", job)
    # close() drained the subscription: every handler call finished.
    print(f"max_concurrency=4: {bus.stats().delivered} handled, at most {most} at once")


async def main() -> None:
    """Each policy in turn."""
    await drop_policy("drop_oldest")
    await drop_policy("drop_newest")
    await block_policy()
    await concurrency()


if __name__ == "__main__":
    asyncio.run(main())
