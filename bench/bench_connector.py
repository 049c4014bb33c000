"""The Cascade engine's workload in one process: LocalBus-style vs `Connector` vs `Bus`.

Not a test: run it and read the table.

    .venv/bin/python bench/bench_connector.py [--messages N] [--rounds R]

The engine publishes small telemetry dicts (``await connector.publish(topic, {...})`` in a
loop) and N subscribers each ``subscribe("cascade/telemetry/+/+/+/events", async cb(topic,
payload))``. Rate = messages x subscribers / wall time from the first publish until the last
callback ran. Cases, each with 1 and 8 subscribers:

- ``localbus``: what upstream Cascade's in-process ``LocalBusConnector``
  (doucx/Cascade, packages/cascade-connector-local) does per message, written out here: one
  ``asyncio.Lock`` per publish, an exact-topic dict lookup plus a scan of the wildcard patterns
  (split-based matcher), ``await queue.put((topic, payload))`` into one ``asyncio.Queue`` per
  matching subscription, and one listener task per subscription doing ``topic, payload =
  await queue.get(); await callback(topic, payload)``. No envelope and no copy: every
  subscriber gets the publisher's dict.
- ``connector``: ``cascade_bus.Connector("memory://…")``, the facade Cascade calls (each
  subscriber gets its own copy, FIFO, isolated callbacks, counters).
- ``bus``: the `Bus` API on ``memory://`` (``await bus.publish``; handler subscriptions).

Rounds alternate the cases (A/B/C, then B/C/A, ...) so that drift on a shared machine hits
each alike; the table shows the median of the rounds and the ratio to ``localbus``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import platform
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import cascade_bus

TOPIC = "cascade/telemetry/run/task/1/events"
PATTERN = "cascade/telemetry/+/+/+/events"
Callback = Callable[[str, Any], Awaitable[None]]


def telemetry(seq: int) -> dict[str, Any]:
    """One small task-state event, as the engine builds a fresh one per publish."""
    return {"run_id": "run-1", "task_id": "task-1", "state": "RUNNING", "seq": seq}


class LocalBusStyle:
    """The per-message work of upstream's LocalBusConnector (see the module docstring)."""

    def __init__(self) -> None:
        self.exact: dict[str, list[asyncio.Queue[tuple[str, Any]]]] = {}
        self.wildcard: dict[str, list[asyncio.Queue[tuple[str, Any]]]] = {}
        self.retained: dict[str, Any] = {}
        self.lock = asyncio.Lock()
        self.listeners: list[asyncio.Task[None]] = []

    async def publish(self, topic: str, payload: Any, qos: int = 0, retain: bool = False) -> None:
        async with self.lock:
            if retain:
                if payload in ({}, ""):
                    self.retained.pop(topic, None)
                else:
                    self.retained[topic] = payload
            for queue in self.exact.get(topic, ()):
                await queue.put((topic, payload))
            for pattern, queues in self.wildcard.items():
                if self.matches(pattern, topic):
                    for queue in queues:
                        await queue.put((topic, payload))

    async def subscribe(self, topic: str, callback: Callback) -> None:
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        async with self.lock:
            table = self.wildcard if "+" in topic or "#" in topic else self.exact
            table.setdefault(topic, []).append(queue)
            for name, payload in self.retained.items():
                if self.matches(topic, name):
                    await callback(name, payload)
        self.listeners.append(asyncio.create_task(self.listen(queue, callback)))

    async def listen(self, queue: asyncio.Queue[tuple[str, Any]], callback: Callback) -> None:
        while True:
            topic, payload = await queue.get()
            try:
                await callback(topic, payload)
            except Exception:  # isolated, as upstream logs and goes on
                pass
            finally:
                queue.task_done()

    async def disconnect(self) -> None:
        for task in self.listeners:
            task.cancel()
        await asyncio.gather(*self.listeners, return_exceptions=True)

    @staticmethod
    def matches(pattern: str, topic: str) -> bool:
        if pattern in ("#", topic):
            return True
        levels = topic.split("/")
        parts = pattern.split("/")
        for i, part in enumerate(parts):
            if part == "#":
                return True
            if i >= len(levels):
                return False
            if part != "+" and part != levels[i]:
                return False
        return len(parts) == len(levels)


class Countdown:
    """Counts callbacks; `done` is set when the last expected one ran."""

    def __init__(self, expected: int) -> None:
        self.left = expected
        self.done = asyncio.Event()

    def callback(self) -> Callback:
        async def callback(_topic: str, _payload: Any) -> None:
            self.left -= 1
            if not self.left:
                self.done.set()

        return callback


async def run_localbus(n: int, subscribers: int) -> float:
    bus = LocalBusStyle()
    cd = Countdown(n * subscribers)
    for _ in range(subscribers):
        await bus.subscribe(PATTERN, cd.callback())
    start = time.perf_counter()
    for i in range(n):
        await bus.publish(TOPIC, telemetry(i))
    await cd.done.wait()
    elapsed = time.perf_counter() - start
    await bus.disconnect()
    return n * subscribers / elapsed


async def run_connector(n: int, subscribers: int) -> float:
    connector = cascade_bus.Connector(f"memory://bench-{uuid.uuid4().hex}")
    await connector.connect()
    cd = Countdown(n * subscribers)
    for _ in range(subscribers):
        await connector.subscribe(PATTERN, cd.callback())
    start = time.perf_counter()
    for i in range(n):
        await connector.publish(TOPIC, telemetry(i))
    await cd.done.wait()
    elapsed = time.perf_counter() - start
    await connector.disconnect()
    assert connector.publish_failures == 0
    return n * subscribers / elapsed


async def run_bus(n: int, subscribers: int) -> float:
    cd = Countdown(n * subscribers)

    async def handler(_env: cascade_bus.Envelope[Any]) -> None:  # counts, like the callback
        cd.left -= 1
        if not cd.left:
            cd.done.set()

    async with cascade_bus.connect(f"memory://bench-{uuid.uuid4().hex}") as bus:
        for _ in range(subscribers):
            await bus.subscribe(PATTERN, handler)
        start = time.perf_counter()
        for i in range(n):
            await bus.publish(TOPIC, telemetry(i))
        await cd.done.wait()
        elapsed = time.perf_counter() - start
    return n * subscribers / elapsed


CASES: dict[str, Callable[[int, int], Awaitable[float]]] = {
    "localbus": run_localbus,
    "connector": run_connector,
    "bus": run_bus,
}


async def bench(messages: int, rounds: int) -> dict[tuple[str, int], list[float]]:
    results: dict[tuple[str, int], list[float]] = {}
    names = list(CASES)
    for subscribers in (1, 8):
        n = max(1, messages // subscribers)
        for name in names:  # warm-up
            await CASES[name](max(1, n // 10), subscribers)
        for r in range(rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                gc.collect()
                rate = await asyncio.wait_for(CASES[name](n, subscribers), timeout=120)
                results.setdefault((name, subscribers), []).append(rate)
    return results


def print_table(results: dict[tuple[str, int], list[float]], rounds: int) -> None:
    print(
        f"# Python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} CPUs, "
        f"cascade-bus {cascade_bus.__version__}, median of {rounds} alternated rounds"
    )
    print()
    print("| subscribers | localbus | connector | ratio | bus | ratio |")
    print("|---|---:|---:|---:|---:|---:|")
    for subscribers in (1, 8):
        base = statistics.median(results[("localbus", subscribers)])
        conn = statistics.median(results[("connector", subscribers)])
        bus = statistics.median(results[("bus", subscribers)])
        print(
            f"| {subscribers} | {base / 1e3:,.0f}k/s | {conn / 1e3:,.0f}k/s | "
            f"{conn / base:.2f}x | {bus / 1e3:,.0f}k/s | {bus / base:.2f}x |"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000, help="deliveries per run")
    parser.add_argument("--rounds", type=int, default=5, help="alternated rounds (median)")
    args = parser.parse_args(argv)
    results = asyncio.run(bench(args.messages, args.rounds))
    print_table(results, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
