"""``cascade-bus watch``: a live table of Cascade runs and tasks, and a log of everything else.

Cascade publishes one message per task state change on
``cascade/telemetry/<run>/<task>/<attempt>/events`` (payload ``{"run", "task", "attempt",
"state", "time"}``) and pauses a run with a retained ``{"paused": true, "reason": ...}`` on
``cascade/constraints/<run>``, cleared by an empty retained message. `WatchView` folds those
into per-run and per-task rows; any other message goes to a scrolling log.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from cascade_bus import BusURL, Envelope

from ._engines import Engines
from ._output import RETAINED_MARK, echo_error, print_full, render_payload
from ._runtime import open_bus

__all__ = ["WatchView", "watch"]

#: States of a task attempt that mean "not finished yet".
ACTIVE = ("pending", "running")
STATE_ORDER = ("running", "pending", "succeeded", "failed")
STATE_STYLE = {
    "pending": "dim",
    "running": "yellow",
    "succeeded": "green",
    "failed": "red",
    "paused": "bold magenta",
}
#: Rates are messages per second over this trailing window.
RATE_WINDOW = 10.0
#: How often the live display is redrawn, in seconds.
REFRESH = 0.25


def _rate(arrivals: deque[float], first: float, now: float) -> float:
    while arrivals and arrivals[0] < now - RATE_WINDOW:
        arrivals.popleft()
    span = min(RATE_WINDOW, max(1.0, now - first))
    return len(arrivals) / span


@dataclass
class TaskRow:
    """The latest known state of one task of a run."""

    run: str
    task: str
    order: int
    attempt: str = ""
    state: str = ""
    at: str = ""
    events: int = 0
    updated: float = 0.0


@dataclass
class RunRow:
    """One workflow run: its tasks, its event rate and its constraint."""

    run: str
    first: float
    events: int = 0
    failed: int = 0
    arrivals: deque[float] = field(default_factory=deque)
    tasks: dict[str, TaskRow] = field(default_factory=dict)
    latest: TaskRow | None = None
    paused: str | None = None
    resumed: bool = False

    def status(self) -> str:
        """``paused``, ``running`` (a task pending or running), ``succeeded``, ``failed``."""
        if self.paused is not None:
            return "paused"
        states = {t.state for t in self.tasks.values()}
        if states & set(ACTIVE):
            return "running"
        if states == {"succeeded"}:
            return "succeeded"
        if "failed" in states:
            return "failed"
        return "waiting" if not self.tasks else "-"

    def task_summary(self) -> str:
        """E.g. ``2 succeeded, 1 running``: tasks counted by their latest state."""
        counts = Counter(t.state for t in self.tasks.values())
        order = [s for s in STATE_ORDER if s in counts] + sorted(set(counts) - set(STATE_ORDER))
        return ", ".join(f"{counts[s]} {s}" for s in order) or "-"


class WatchView:
    """What the watch has seen, folded into runs, tasks and a log; rendered as rich tables.

    Args:
        pattern: The subscription pattern (for the header).
        where: The redacted bus URL (for the header).
        log_size: How many log lines the live display keeps.
        clock: Monotonic time source (tests may replace it).
    """

    def __init__(
        self,
        pattern: str,
        where: str,
        *,
        log_size: int = 10,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.pattern = pattern
        self.where = where
        self.clock = clock
        self.started = clock()
        self.messages = 0
        self.arrivals: deque[float] = deque()
        self.runs: dict[str, RunRow] = {}
        self.log: deque[str] = deque(maxlen=log_size)
        self.logged = 0
        self._tasks_seen = 0
        self.engines = Engines(clock)

    # -- folding messages ------------------------------------------------------------------------

    def add(self, env: Envelope[Any]) -> str | None:
        """Take one message; return its log line when it is not Cascade telemetry."""
        now = self.clock()
        self.messages += 1
        self.arrivals.append(now)
        levels = env.topic.split("/")
        payload = env.payload
        if self.engines.add(levels, payload, env.retained):
            return None
        if len(levels) == 6 and levels[:2] == ["cascade", "telemetry"] and levels[5] == "events":
            if isinstance(payload, dict):
                self._telemetry(levels[2], levels[3], levels[4], payload, now)
                return None
        elif (
            len(levels) == 3
            and levels[:2] == ["cascade", "constraints"]
            and (isinstance(payload, dict) or payload in (b"", None, ""))
        ):
            self._constraint(
                levels[2], payload if isinstance(payload, dict) else {}, now, env.retained
            )
            return None
        line = f"{env.topic}{RETAINED_MARK if env.retained else ' '}{render_payload(payload)}"
        self.log.append(line)
        self.logged += 1
        return line

    def _run(self, run: str, now: float) -> RunRow:
        row = self.runs.get(run)
        if row is None:
            row = self.runs[run] = RunRow(run, first=now)
        return row

    def _telemetry(
        self, run: str, task: str, attempt: str, payload: dict[str, Any], now: float
    ) -> None:
        row = self._run(run, now)
        row.events += 1
        row.arrivals.append(now)
        entry = row.tasks.get(task)
        if entry is None:
            self._tasks_seen += 1
            entry = row.tasks[task] = TaskRow(run, task, order=self._tasks_seen)
        state = str(payload.get("state", "?"))
        entry.attempt = str(payload.get("attempt", attempt))
        entry.state = state
        stamp = str(payload.get("time", ""))
        entry.at = stamp[11:23] if len(stamp) >= 19 and stamp[10] == "T" else stamp
        entry.events += 1
        entry.updated = now
        row.latest = entry
        if state == "failed":
            row.failed += 1

    def _constraint(
        self, run: str, payload: dict[str, Any], now: float, retained: bool = False
    ) -> None:
        row = self._run(run, now)
        if payload.get("paused"):
            # A retained pause may be older than this watch: say so (a stale one is a phantom).
            row.paused = str(payload.get("reason") or "no reason given")
            row.paused += " (retained)" if retained else ""
            row.resumed = False
        elif row.paused is not None:
            row.paused = None
            row.resumed = True

    # -- rendering -------------------------------------------------------------------------------

    def rate(self) -> float:
        """Messages per second over the trailing window."""
        return _rate(self.arrivals, self.started, self.clock())

    def header(self) -> Text:
        """One line: what is watched, how much arrived, how fast."""
        elapsed = self.clock() - self.started
        return Text.assemble(
            ("watching ", "dim"),
            (self.pattern, "bold"),
            (" on ", "dim"),
            (self.where, "bold"),
            (
                f"  {self.messages} message(s), {self.rate():.1f}/s, "
                f"{len(self.runs)} run(s), {elapsed:.1f}s",
                "dim",
            ),
        )

    def runs_table(self) -> Table:
        """One row per run: status, tasks by state, latest change, events, rate, constraint."""
        now = self.clock()
        table = Table(title="Cascade runs", title_justify="left", expand=False)
        table.add_column("run", no_wrap=True)
        table.add_column("status", no_wrap=True)
        table.add_column("tasks")
        table.add_column("latest")
        table.add_column("events", justify="right")
        table.add_column("failed", justify="right")
        table.add_column("rate/s", justify="right")
        table.add_column("constraint")
        for name in sorted(self.runs):
            row = self.runs[name]
            status = row.status()
            latest = row.latest
            latest_text = (
                Text(f"{latest.task} #{latest.attempt} ").append(
                    latest.state, STATE_STYLE.get(latest.state, "")
                )
                if latest is not None
                else Text("-")
            )
            if row.paused is not None:
                constraint = Text(f"paused: {row.paused}", STATE_STYLE["paused"])
            else:
                constraint = Text("resumed" if row.resumed else "", "green")
            table.add_row(
                name,
                Text(status, STATE_STYLE.get(status, "")),
                row.task_summary(),
                latest_text,
                str(row.events),
                str(row.failed),
                f"{_rate(row.arrivals, row.first, now):.1f}",
                constraint,
            )
        return table

    def tasks_table(self, limit: int | None = None) -> Table:
        """One row per task (the most recently updated ``limit`` ones when given)."""
        rows = [t for r in self.runs.values() for t in r.tasks.values()]
        hidden = 0
        if limit is not None and len(rows) > limit:
            hidden = len(rows) - limit
            rows = sorted(rows, key=lambda t: t.updated)[-limit:]
        rows.sort(key=lambda t: (t.run, t.order))
        table = Table(title="Tasks", title_justify="left", expand=False)
        table.add_column("run", no_wrap=True)
        table.add_column("task", no_wrap=True)
        table.add_column("attempt", justify="right")
        table.add_column("state", no_wrap=True)
        table.add_column("at", no_wrap=True)
        table.add_column("events", justify="right")
        for task in rows:
            table.add_row(
                task.run,
                task.task,
                task.attempt,
                Text(task.state, STATE_STYLE.get(task.state, "")),
                task.at,
                str(task.events),
            )
        if hidden:
            table.caption = f"{hidden} older task(s) not shown"
        return table

    def render(self, *, task_limit: int | None = None, with_log: bool = True) -> RenderableType:
        """The whole view: header, runs, tasks and (live only) the latest log lines."""
        return Group(*self.parts(task_limit=task_limit, with_log=with_log))

    def parts(
        self, *, task_limit: int | None = None, with_log: bool = True
    ) -> list[RenderableType]:
        """The pieces of `render`, to print one by one."""
        parts: list[RenderableType] = [self.header(), *self.engines.parts()]
        if self.runs:
            parts.append(self.runs_table())
            if any(run.tasks for run in self.runs.values()):
                parts.append(self.tasks_table(task_limit))
        else:
            parts.append(Text("no Cascade telemetry yet", "dim"))
        if with_log and self.log:
            log = Table(title="Other messages", title_justify="left", show_header=False)
            log.add_column("message", overflow="fold")
            for line in self.log:
                log.add_row(line)
            if self.logged > len(self.log):
                log.caption = f"latest {len(self.log)} of {self.logged}"
            parts.append(log)
        return parts


async def watch(
    url: BusURL,
    pattern: str,
    *,
    console: Console,
    once: bool,
    duration: float | None,
    count: int | None,
    quiet: bool,
) -> int:
    """Subscribe to ``pattern`` and show the view until the duration, count or Ctrl-C ends it.

    With ``once`` (or when stdout is not a terminal) there is no live display: other messages
    are printed as ``topic payload`` lines as they arrive and the tables once at the end. With
    ``once`` and neither ``duration`` nor ``count``, the end is right after the retained
    messages (a snapshot of the current state).

    Returns:
        The exit status (0).
    """
    view = WatchView(pattern, url.redacted())
    plain = once or not console.is_terminal
    snapshot = once and duration is None and count is None
    loop = asyncio.get_running_loop()
    deadline = None if duration is None else loop.time() + duration

    def done() -> bool:
        return count is not None and view.messages >= count

    # presence_sweep: with NATS or Redis, engines that crashed while none ran turn offline.
    async with open_bus(url, presence_sweep=True) as bus, bus.subscribe(pattern) as sub:
        if snapshot:
            while sub.pending and not done():
                line = view.add(await sub.get(timeout=5.0))
                if line is not None:
                    console.print(line, markup=False, soft_wrap=True)
            print_full(console, *view.parts(with_log=False))
            return 0
        if plain and not quiet:
            echo_error(f"watching {pattern!r} on {url.redacted()}; Ctrl-C to stop")
        live: Live | None = None
        if not plain:
            height = max(5, console.size.height - 12)
            live = Live(view.render(task_limit=height), console=console, auto_refresh=False)
        try:
            with live if live is not None else contextlib.nullcontext():
                drawn = loop.time()
                while not done():
                    now = loop.time()
                    if deadline is not None and now >= deadline:
                        break
                    wait = None if deadline is None else deadline - now
                    if live is not None:
                        wait = REFRESH if wait is None else min(wait, REFRESH)
                    try:
                        env = await sub.get(timeout=wait)
                    except TimeoutError:
                        env = None
                    if env is not None:
                        line = view.add(env)
                        if plain and line is not None:
                            console.print(line, markup=False, soft_wrap=True)
                    if live is not None and loop.time() - drawn >= REFRESH:
                        live.update(
                            view.render(task_limit=max(5, console.size.height - 12)),
                            refresh=True,
                        )
                        drawn = loop.time()
                if live is not None:
                    live.update(view.render(task_limit=max(5, console.size.height - 12)))
                    live.refresh()
        finally:
            if plain:  # also on Ctrl-C: the state reached so far
                print_full(console, *view.parts(with_log=False))
    return 0
