"""`RetainedRuns` and `retained_storm`: a new subscription racing a stream of retained writes.

`RetainedRuns` checks that a subscription saw each topic's values as one unbroken run.

For retained-race tests: while a publisher rewrites retained topics with 0, 1, ..., ``last``,
a new subscription must see, per topic, the retained value and then every later one, with no
gap and no repeat, ending with ``last``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from cascade_bus import Bus, Envelope

__all__ = ["RetainedRuns", "retained_storm"]


async def retained_storm(
    publisher: Bus, topics: list[str], rounds: int, milestones: list[asyncio.Event], qos: int
) -> None:
    """Write ``{"v": 1}`` .. ``{"v": rounds}`` retained to every topic, round by round.

    Sets ``milestones`` evenly along the way (for subscribers to start at) and yields after
    each round, so that subscribes interleave with the storm step by step.
    """
    for v in range(1, rounds + 1):
        for topic in topics:
            await publisher.publish(topic, {"v": v}, retain=True, qos=qos)
        if v % (rounds // len(milestones)) == 0:
            milestones[v * len(milestones) // rounds - 1].set()
        await asyncio.sleep(0)


class RetainedRuns:
    """A subscription handler recording ``payload["v"]`` per topic.

    Args:
        name: Names the subscription in problem reports.
        last: The last value the publisher writes to every topic.
    """

    def __init__(self, name: str, last: int) -> None:
        self.name = name
        self.last = last
        self.by_topic: dict[str, list[int]] = {}
        self.changed = asyncio.Event()

    def __call__(self, env: Envelope[Any]) -> None:
        """Record one envelope (the subscription handler)."""
        self.by_topic.setdefault(env.topic, []).append(env.payload["v"])
        self.changed.set()

    def complete(self, topics: list[str]) -> bool:
        """Tell whether every topic has reached the last value."""
        return all(self.by_topic.get(t, [0])[-1] == self.last for t in topics)

    def problems(self, topics: list[str]) -> list[str]:
        """Describe every topic whose values are not one unbroken run up to the last value."""
        out = []
        for topic in topics:
            values = self.by_topic.get(topic, [])
            if not values:
                out.append(f"{self.name}: nothing on {topic}")
                continue
            if values != list(range(values[0], self.last + 1)):
                out.append(f"{self.name} on {topic}: {values[:3]}...{values[-3:]} has gaps/repeats")
        return out
