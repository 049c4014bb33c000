"""The Cascade engine's workload in one process: LocalBus-style vs `Connector` vs `Bus`.

Not a test: run it and read the table.

    .venv/bin/python bench/bench_connector.py [--messages N] [--rounds R] [--upstream PATH]

The engine publishes small telemetry dicts (``await connector.publish(topic, {...})`` in a
loop) and N subscribers each ``subscribe("cascade/telemetry/+/+/+/events", async cb(topic,
payload))``. Rate = messages x subscribers / wall time from the first publish until the last
callback ran. Cases, each with 1 and 8 subscribers:

- ``localbus``: upstream Cascade's in-process ``LocalBusConnector`` (doucx/Cascade,
  packages/cascade-connector-local), copied line for line: per publish the class-wide
  ``asyncio.Lock`` looked up through ``_get_lock()`` (which checks it is bound to the running
  loop), an exact-topic dict lookup plus a scan of the wildcard patterns (split-based
  matcher), ``await queue.put((topic, payload))`` into one ``asyncio.Queue`` per matching
  subscription; one listener task per subscription doing ``while self._is_connected: topic,
  payload = await queue.get(); await callback(topic, payload)``. No envelope and no copy:
  every subscriber gets the publisher's dict. ``--upstream PATH`` (a checkout of
  doucx/Cascade, not part of this repository) also runs the real one, as the ``upstream``
  case, so the copy can be checked against it.
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
import importlib
import os
import platform
import statistics
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, ClassVar

import cascade_bus

TOPIC = "cascade/telemetry/run/task/1/events"
PATTERN = "cascade/telemetry/+/+/+/events"
Callback = Callable[[str, Any], Awaitable[None]]
Queue = asyncio.Queue[tuple[str, Any]]


def telemetry(seq: int) -> dict[str, Any]:
    """One small task-state event, as the engine builds a fresh one per publish."""
    return {"run_id": "run-1", "task_id": "task-1", "state": "RUNNING", "seq": seq}


class LocalBusStyle:
    """Upstream's LocalBusConnector (doucx/Cascade, cascade-connector-local), line for line.

    Broker state is class-level and shared by every instance, as upstream's is; the lock is
    looked up per publish through `_get_lock` (bound to the running loop), and each listener
    checks ``_is_connected`` per message. `run_localbus` resets the state, as upstream's tests
    do. ``--upstream PATH`` runs the real one beside it, to check this copy.
    """

    _exact_subscriptions: ClassVar[dict[str, list[Queue]]] = defaultdict(list)
    _wildcard_subscriptions: ClassVar[dict[str, list[Queue]]] = defaultdict(list)
    _retained_messages: ClassVar[dict[str, Any]] = {}
    _lock: ClassVar[asyncio.Lock | None] = None

    def __init__(self) -> None:
        self._is_connected = True
        self._listener_tasks: list[asyncio.Task[None]] = []

    @classmethod
    def _get_lock(cls) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        try:
            if cls._lock is None or cls._lock._get_loop() != loop:  # type: ignore[attr-defined]
                cls._lock = asyncio.Lock()
        except RuntimeError:
            cls._lock = asyncio.Lock()
        return cls._lock

    @classmethod
    def _reset_broker_state(cls) -> None:
        cls._exact_subscriptions.clear()
        cls._wildcard_subscriptions.clear()
        cls._retained_messages.clear()
        cls._lock = None

    async def connect(self) -> None:
        self._is_connected = True

    async def disconnect(self) -> None:
        self._is_connected = False
        for task in self._listener_tasks:
            task.cancel()
        if self._listener_tasks:
            await asyncio.gather(*self._listener_tasks, return_exceptions=True)
        self._listener_tasks.clear()

    async def publish(self, topic: str, payload: Any, qos: int = 0, retain: bool = False) -> None:
        if not self._is_connected:
            return
        async with self._get_lock():
            if retain:
                if payload == {} or payload == "":
                    self._retained_messages.pop(topic, None)
                else:
                    self._retained_messages[topic] = payload
            if topic in self._exact_subscriptions:
                for q in self._exact_subscriptions[topic]:
                    await q.put((topic, payload))
            for sub_topic, queues in self._wildcard_subscriptions.items():
                if self._topic_matches(sub_topic, topic):
                    for q in queues:
                        await q.put((topic, payload))

    async def subscribe(self, topic: str, callback: Callback) -> None:
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        is_wildcard = "+" in topic or "#" in topic
        async with self._get_lock():
            if is_wildcard:
                self._wildcard_subscriptions[topic].append(queue)
            else:
                self._exact_subscriptions[topic].append(queue)
            for retained_topic, payload in self._retained_messages.items():
                if self._topic_matches(topic, retained_topic):
                    try:  # noqa: SIM105  (as upstream, which logs it with bus.error)
                        await callback(retained_topic, payload)
                    except Exception:
                        pass
        self._listener_tasks.append(asyncio.create_task(self._listener_loop(queue, callback)))

    async def _listener_loop(
        self, queue: asyncio.Queue[tuple[str, Any]], callback: Callback
    ) -> None:
        try:
            while self._is_connected:
                topic, payload = await queue.get()
                try:
                    await callback(topic, payload)
                except Exception:  # upstream logs it (bus.error) and goes on
                    pass
                finally:
                    queue.task_done()
        except asyncio.CancelledError:
            pass

    @staticmethod
    def _topic_matches(subscription: str, topic: str) -> bool:
        if subscription == "#":
            return True
        if subscription == topic:
            return True
        sub_parts = subscription.split("/")
        topic_parts = topic.split("/")
        for i, sub_part in enumerate(sub_parts):
            if sub_part == "#":
                return True
            if i >= len(topic_parts):
                return False
            topic_part = topic_parts[i]
            if sub_part == "+":
                continue
            if sub_part != topic_part:
                return False
        return len(sub_parts) == len(topic_parts)


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


async def run_localbus(n: int, subscribers: int, cls: Any = LocalBusStyle) -> float:
    cls._reset_broker_state()
    bus = cls()
    await bus.connect()
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


def add_upstream(checkout: str) -> None:
    """Add the real LocalBusConnector from a doucx/Cascade checkout as the ``upstream`` case."""
    packages = sorted(Path(checkout).glob("packages/*/src"))
    if not packages:
        raise SystemExit(f"--upstream {checkout}: no packages/*/src (not a doucx/Cascade checkout)")
    sys.path[:0] = [str(p) for p in packages]
    module = importlib.import_module("cascade.connectors.local.bus")

    async def run_upstream(n: int, subscribers: int) -> float:
        return await run_localbus(n, subscribers, module.LocalBusConnector)

    CASES["upstream"] = run_upstream


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
    upstream = any(name == "upstream" for name, _ in results)
    extra = " upstream LocalBusConnector | ratio |" if upstream else ""
    print(f"| subscribers | localbus | connector | ratio | bus | ratio |{extra}")
    print("|---|---:|---:|---:|---:|---:|" + ("---:|---:|" if upstream else ""))
    for subscribers in (1, 8):
        base = statistics.median(results[("localbus", subscribers)])
        conn = statistics.median(results[("connector", subscribers)])
        bus = statistics.median(results[("bus", subscribers)])
        row = (
            f"| {subscribers} | {base / 1e3:,.0f}k/s | {conn / 1e3:,.0f}k/s | "
            f"{conn / base:.2f}x | {bus / 1e3:,.0f}k/s | {bus / base:.2f}x |"
        )
        if upstream:
            real = statistics.median(results[("upstream", subscribers)])
            # the connector against the real one, and the copy against the real one
            row += f" {real / 1e3:,.0f}k/s | {conn / real:.2f}x (copy {base / real:.2f}x) |"
        print(row)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000, help="deliveries per run")
    parser.add_argument("--rounds", type=int, default=5, help="alternated rounds (median)")
    parser.add_argument(
        "--upstream",
        metavar="PATH",
        help="a doucx/Cascade checkout: also run its real LocalBusConnector (checks the copy)",
    )
    args = parser.parse_args(argv)
    if args.upstream:
        add_upstream(args.upstream)
    results = asyncio.run(bench(args.messages, args.rounds))
    print_table(results, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
