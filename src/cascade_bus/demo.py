"""A simulated Cascade workflow, a controller and a watcher talking over one bus URL.

Run it with ``python -m cascade_bus.demo`` (``--url``, ``--runs``, ``--tasks``, ``--seconds``,
``--seed``). Three independent `Connector` clients share the broker, exactly as three processes
would:

- the *engine* runs every workflow run concurrently, one task after another, and publishes each
  state change (pending, running, succeeded or failed, with a timestamp) to
  ``cascade/telemetry/<run>/<task>/<attempt>/events``; a failed attempt is retried once. It
  subscribes to ``cascade/constraints/#`` and does not start a task of a run while that run is
  paused;
- the *controller* sets a retained pause, ``{"paused": true, "reason": ...}``, on
  ``cascade/constraints/<run>`` for one run *before the engine starts* (the engine gets it as a
  retained message), then clears it with an empty retained payload ``{}``;
- the *watcher* subscribes to ``cascade/telemetry/#`` and ``cascade/constraints/#`` and prints a
  line per message, then a summary.

On ``memory://`` no broker is needed; any other installed transport works the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import secrets
import sys
import time
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from ._connector import Connector
from ._errors import BusError
from ._stats import Stats
from ._url import BusURL

__all__ = ["main", "run_demo"]

TELEMETRY = "cascade/telemetry"
CONSTRAINTS = "cascade/constraints"
STATES = ("pending", "running", "succeeded", "failed")
TASK_NAMES = ("extract", "transform", "validate", "load", "report", "notify")
#: Chance that a first attempt fails (it is then retried once, and the retry succeeds).
FAILURE_RATE = 0.25
#: Bound on clearing the retained pause when the demo is interrupted.
CLEANUP_TIMEOUT = 3.0


class Console:
    """Prints timestamped lines relative to the start of the demo."""

    def __init__(self) -> None:
        self.start = time.monotonic()

    def elapsed(self) -> float:
        """Seconds since the demo started."""
        return time.monotonic() - self.start

    def line(self, who: str, text: str) -> None:
        """Print one line: elapsed time, who speaks, what happened."""
        self.print(f"{self.elapsed():6.2f}s  {who:<10} {text}")

    def print(self, text: str) -> None:
        """Print a line; once the reader has gone (``demo | head``), print nothing more."""
        try:
            print(text, flush=True)
        except BrokenPipeError:
            # As the Python docs advise: point stdout at devnull so the exit flush is quiet.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _task_name(index: int) -> str:
    name = TASK_NAMES[index % len(TASK_NAMES)]
    return name if index < len(TASK_NAMES) else f"{name}-{index // len(TASK_NAMES) + 1}"


class Engine:
    """The simulated Cascade engine: runs tasks, publishes telemetry, honours pauses.

    Args:
        connector: Its own connection to the bus.
        console: Where to print what it decides.
        runs: The run ids to execute.
        tasks: Tasks per run.
        unit: Roughly how long one task attempt takes, in seconds.
        seed: Seed for the simulated failures.
    """

    def __init__(
        self,
        connector: Connector,
        console: Console,
        runs: Sequence[str],
        tasks: int,
        unit: float,
        seed: int,
    ) -> None:
        self.connector = connector
        self.console = console
        self.runs = list(runs)
        self.tasks = tasks
        self.unit = unit
        self.seed = seed
        self.published = 0
        #: QoS for telemetry: at least once where the transport offers it.
        self.qos = 0
        self._unpaused = {run: asyncio.Event() for run in self.runs}
        for event in self._unpaused.values():
            event.set()

    async def on_constraint(self, topic: str, payload: dict[str, Any]) -> None:
        """Apply a constraint from ``cascade/constraints/<run>``; ``{}`` lifts it."""
        run = topic.rsplit("/", 1)[-1]
        gate = self._unpaused.get(run)
        if gate is None:
            return  # someone else's run on a shared broker
        if payload.get("paused"):
            gate.clear()
            reason = payload.get("reason", "no reason given")
            self.console.line("engine", f"{run} is paused ({reason}); holding its next task")
        elif not gate.is_set():
            gate.set()
            self.console.line("engine", f"{run} may continue")

    async def start(self) -> None:
        """Subscribe to constraints; retained pauses are in force when this returns."""
        bus = self.connector.bus
        self.qos = min(1, bus.capabilities.max_qos) if bus is not None else 0
        await self.connector.subscribe(f"{CONSTRAINTS}/#", self.on_constraint)

    async def _emit(self, run: str, task: str, attempt: int, state: str) -> None:
        event = {"run": run, "task": task, "attempt": attempt, "state": state, "time": _now()}
        before = self.connector.publish_failures
        await self.connector.publish(
            f"{TELEMETRY}/{run}/{task}/{attempt}/events", event, qos=self.qos
        )
        if self.connector.publish_failures == before:
            self.published += 1

    async def execute(self, run: str) -> None:
        """Run the tasks of one run in order, retrying a failed attempt once."""
        # One generator per run, so the simulated failures do not depend on scheduling.
        rng = random.Random(self.seed * 1000 + self.runs.index(run))
        for index in range(self.tasks):
            task = _task_name(index)
            attempt = 1
            while True:
                await self._emit(run, task, attempt, "pending")
                await self._unpaused[run].wait()
                await self._emit(run, task, attempt, "running")
                await asyncio.sleep(self.unit * rng.uniform(0.5, 1.0))
                if attempt == 1 and rng.random() < FAILURE_RATE:
                    await self._emit(run, task, attempt, "failed")
                    attempt += 1
                    continue
                await self._emit(run, task, attempt, "succeeded")
                break

    async def run_all(self) -> None:
        """Execute every run concurrently."""
        async with asyncio.TaskGroup() as group:
            for run in self.runs:
                group.create_task(self.execute(run), name=f"demo-engine[{run}]")


class Watcher:
    """Prints a line for every telemetry event and constraint change, and counts them.

    Args:
        console: Where to print.
        runs: The runs of this demo; messages about other runs (another demo sharing the
            broker) are counted in `foreign` and not shown.
    """

    def __init__(self, console: Console, runs: Sequence[str]) -> None:
        self.console = console
        self.runs = frozenset(runs)
        self.foreign = 0
        self.states: Counter[str] = Counter()
        self.events = 0
        self.pauses = 0
        self.resumes = 0

    async def on_telemetry(self, topic: str, payload: dict[str, Any]) -> None:
        """Print one telemetry event: run, task, attempt, state and when it happened."""
        # cascade/telemetry/<run>/<task>/<attempt>/events
        parts = topic.split("/")
        if len(parts) != 6:
            self.console.line("watcher", f"{topic}: {payload}")
            return
        _, _, run, task, attempt, _ = parts
        if run not in self.runs:
            self.foreign += 1
            return
        state = str(payload.get("state", "?"))
        self.events += 1
        self.states[state] += 1
        stamp = str(payload.get("time", ""))[11:23]
        self.console.line(
            "telemetry", f"{run}  {task:<10} attempt {attempt}  {state:<9}  at {stamp}"
        )

    async def on_constraint(self, topic: str, payload: dict[str, Any]) -> None:
        """Print a pause (retained constraint set) or a resume (constraint cleared)."""
        run = topic.rsplit("/", 1)[-1]
        if run not in self.runs:
            self.foreign += 1
            return
        if payload.get("paused"):
            self.pauses += 1
            reason = payload.get("reason", "no reason given")
            self.console.line("PAUSE", f"{run}  (retained on {topic}: {reason})")
        else:
            self.resumes += 1
            self.console.line("RESUME", f"{run}  (retained constraint on {topic} cleared)")

    async def wait_for(self, count: int, timeout: float) -> bool:
        """Wait until ``count`` telemetry events arrived; False if ``timeout`` passed first."""
        deadline = time.monotonic() + timeout
        while self.events < count:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.01)
        return True


def _stats_line(name: str, stats: Stats | None) -> str:
    if stats is None:
        return f"  {name:<10} (not connected)"
    dropped = ", ".join(f"{k} {v}" for k, v in sorted(stats.dropped.items())) or "0"
    return (
        f"  {name:<10} published {stats.published}, delivered {stats.delivered}, "
        f"dropped {dropped}, reconnects {stats.reconnects}"
    )


def _stop_if_cancelled() -> None:
    """Re-raise a Ctrl-C that a client swallowed (3.11 ``wait_for`` race; still counted)."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def _clear_pause(controller: Connector, topic: str) -> None:
    """Remove the demo's retained pause, so no watcher later sees a phantom paused run."""
    try:
        async with asyncio.timeout(CLEANUP_TIMEOUT):
            await controller.publish(topic, {}, retain=True)
            if controller.bus is not None:
                await controller.bus.flush(timeout=CLEANUP_TIMEOUT)
    except (TimeoutError, BusError) as exc:
        print(f"demo: could not clear the retained pause on {topic}: {exc}", file=sys.stderr)


async def run_demo(url: str, runs: int, tasks: int, seconds: float, seed: int) -> int:
    """Run the whole demo against ``url`` and print the summary.

    Args:
        url: The bus URL, e.g. ``memory://demo`` or ``mqtt://127.0.0.1:1883``.
        runs: How many workflow runs to simulate.
        tasks: Tasks per run.
        seconds: About how long the demo should take.
        seed: Seed for the simulated task failures.

    Returns:
        The process exit status: 0 when the watcher saw every event.

    Raises:
        BusError: the URL is invalid or the broker cannot be reached.
    """
    console = Console()
    token = secrets.token_hex(2)  # unique run ids: runs never collide on a shared broker
    run_ids = [f"run-{token}-{i}" for i in range(1, runs + 1)]
    paused_run = run_ids[-1]
    # Each task attempt takes about one unit; the paused run starts two units late.
    unit = seconds / (tasks + 3)

    # No presence: a demo stopped at any moment must leave no engine status behind either.
    watcher_conn = Connector(url, presence=False)
    controller = Connector(url, presence=False)
    engine_conn = Connector(url, presence=False)
    watcher = Watcher(console, run_ids)
    engine = Engine(engine_conn, console, run_ids, tasks, unit, seed)
    console.line("demo", f"{runs} runs x {tasks} tasks on {BusURL(url).redacted()}")
    pause_topic = f"{CONSTRAINTS}/{paused_run}"
    pause_set = False  # the retained pause is on the broker: clear it on every way out
    try:
        await watcher_conn.connect()
        await watcher_conn.subscribe(f"{TELEMETRY}/#", watcher.on_telemetry)
        await watcher_conn.subscribe(f"{CONSTRAINTS}/#", watcher.on_constraint)
        _stop_if_cancelled()

        await controller.connect()
        pause_set = True  # set before the publish: an interrupt may land while it is sent
        await controller.publish(
            pause_topic,
            {"paused": True, "reason": "operator hold for a maintenance window"},
            retain=True,
        )

        await engine_conn.connect()
        await engine.start()  # the retained pause is already in force here
        _stop_if_cancelled()

        async def release() -> None:
            nonlocal pause_set
            await asyncio.sleep(2 * unit)
            console.line("controller", f"lifting the pause on {paused_run}")
            await controller.publish(pause_topic, {}, retain=True)
            pause_set = controller.publish_failures > 0

        async with asyncio.TaskGroup() as group:
            group.create_task(engine.run_all(), name="demo-engine")
            group.create_task(release(), name="demo-controller")

        complete = await watcher.wait_for(engine.published, timeout=max(2.0, seconds))
        engine_stats = engine_conn.bus.stats() if engine_conn.bus else None
        watcher_stats = watcher_conn.bus.stats() if watcher_conn.bus else None
        controller_stats = controller.bus.stats() if controller.bus else None
    finally:
        if pause_set:  # interrupted (Ctrl-C) or failed before the release
            await _clear_pause(controller, pause_topic)
        await engine_conn.disconnect()
        await controller.disconnect()
        await watcher_conn.disconnect()

    by_state = ", ".join(f"{state} {watcher.states[state]}" for state in STATES)
    console.print(
        f"\nsummary: {runs} runs, {runs * tasks} tasks, {watcher.events} telemetry events "
        f"seen of {engine.published} published, in {console.elapsed():.1f}s"
    )
    console.print(f"  events by state: {by_state}")
    console.print(f"  constraints: {watcher.pauses} pause(s), {watcher.resumes} resume(s)")
    if watcher.foreign:
        console.print(f"  other traffic on the broker: {watcher.foreign} message(s), not shown")
    console.print("  bus stats:")
    console.print(_stats_line("engine", engine_stats))
    console.print(_stats_line("controller", controller_stats))
    console.print(_stats_line("watcher", watcher_stats))
    failures = engine_conn.publish_failures + controller.publish_failures
    if failures or not complete:
        console.print(f"  INCOMPLETE: {failures} failed publish(es); some events were not seen")
        return 1
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m cascade_bus.demo",
        description="A simulated Cascade workflow publishing telemetry to a watcher, "
        "paused and resumed by a controller through a retained constraint.",
    )
    parser.add_argument("--url", default="memory://demo", help="bus URL (default: %(default)s)")
    parser.add_argument("--runs", type=int, default=3, help="workflow runs (default: %(default)s)")
    parser.add_argument("--tasks", type=int, default=4, help="tasks per run (default: %(default)s)")
    parser.add_argument(
        "--seconds", type=float, default=3.0, help="about how long to run (default: %(default)s)"
    )
    parser.add_argument(
        "--seed", type=int, default=4, help="seed for simulated failures (default: %(default)s)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line, run the demo and return the exit status.

    Args:
        argv: Arguments without the program name (default: ``sys.argv[1:]``).

    Returns:
        0 on success, 1 when events went missing, 2 for bad arguments or an unusable URL,
        130 when interrupted.
    """
    parser = _parser()
    args = parser.parse_args(argv)
    if args.runs < 1 or args.tasks < 1 or not 0 < args.seconds <= 3600:
        parser.error("--runs and --tasks must be at least 1, --seconds between 0 and 3600")
    try:
        return asyncio.run(run_demo(args.url, args.runs, args.tasks, args.seconds, args.seed))
    except BusError as exc:
        print(f"demo: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("demo: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
