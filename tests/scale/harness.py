"""Run worker processes (``worker.py``) and collect their records; shared by tests and bench.

Every wait is bounded and event-driven: a worker is up when it printed ``ready``; work is done
when the records it published arrived at the collector's subscription.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from cascade_bus import Envelope

WORKER = Path(__file__).with_name("worker.py")
#: Longest a worker may take to start, connect and subscribe (interpreter start on a busy box;
#: the worker itself bounds connect and subscribe at 30 s each).
READY_TIMEOUT = 45.0


class Worker:
    """One ``worker.py`` process: its name, process and stderr log."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process, log: Path) -> None:
        self.name = name
        self.proc = proc
        self.log = log

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None

    def stderr(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    async def wait_ready(self) -> None:
        """Wait (bounded) for the ``ready`` line; fail with the worker's stderr otherwise."""
        assert self.proc.stdout is not None
        try:
            async with asyncio.timeout(READY_TIMEOUT):
                line = await self.proc.stdout.readline()
        except TimeoutError:
            raise AssertionError(
                f"worker {self.name} not ready after {READY_TIMEOUT}s:\n{self.stderr()}"
            ) from None
        if line.strip() != b"ready":
            await self.proc.wait()
            raise AssertionError(
                f"worker {self.name} exited ({self.proc.returncode}) before ready:\n{self.stderr()}"
            )

    def signal(self, sig: int) -> None:
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    async def kill(self) -> None:
        """SIGKILL (a crash: no clean disconnect, nothing flushed) and reap it."""
        self.signal(signal.SIGKILL)
        await self.proc.wait()

    async def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, wait for the exit (bounded), SIGKILL if it does not come; the exit code."""
        self.signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(timeout):
                return await self.proc.wait()
        except TimeoutError:
            await self.kill()
            raise AssertionError(
                f"worker {self.name} ignored SIGTERM for {timeout}s:\n{self.stderr()}"
            ) from None


class Pool:
    """Starts workers and guarantees they are gone afterwards (``aclose`` kills leftovers)."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.workers: list[Worker] = []

    async def start(
        self,
        url: str | Callable[[str], str],
        pattern: str,
        queue: str,
        qos: int,
        result_topic: str,
        names: Iterable[str],
        *extra: str,
        result_url: str | None = None,
    ) -> list[Worker]:
        """Start one worker per name (concurrently) and wait until every one is ready.

        ``url`` may be a function of the worker's name (e.g. a per-worker MQTT client_id);
        ``result_url`` is where the workers publish their records (default: ``url``).
        """
        if result_url is not None:
            extra = ("--result-url", result_url, *extra)
        started = []
        for name in names:
            log = self.logdir / f"worker-{name}.log"
            worker_url = url(name) if callable(url) else url
            with log.open("wb") as err:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable,
                    str(WORKER),
                    worker_url,
                    pattern,
                    queue,
                    str(qos),
                    result_topic,
                    "--name",
                    name,
                    *extra,
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=err,
                    env={**os.environ, "PYTHONUNBUFFERED": "1"},
                )
            worker = Worker(name, proc, log)
            self.workers.append(worker)
            started.append(worker)
        await asyncio.gather(*(w.wait_ready() for w in started))
        return started

    async def aclose(self) -> None:
        """Kill whatever still runs and reap every process (also closes their pipes)."""
        for worker in self.workers:
            worker.signal(signal.SIGKILL)
        for worker in self.workers:
            with contextlib.suppress(ProcessLookupError):
                await worker.proc.wait()
            transport = getattr(worker.proc, "_transport", None)
            if transport is not None:
                transport.close()


class Results:
    """The collector: a handler for RESULT_TOPIC that keeps the workers' records."""

    def __init__(self) -> None:
        self.handled: Counter[int] = Counter()  # seq -> times handled
        self.by_worker: Counter[str] = Counter()  # worker -> messages handled
        self.handlers: dict[int, list[str]] = {}  # seq -> workers that handled it
        self.counts: dict[str, int] = {}  # bench mode: worker -> cumulative count
        self.finals: dict[str, dict[str, Any]] = {}
        self._changed = asyncio.Event()

    def __call__(self, env: Envelope[Any]) -> None:
        record = env.payload
        worker = record["w"]
        if record.get("final"):
            self.finals[worker] = record
        elif "seq" in record:
            seq = record["seq"]
            self.handled[seq] += 1
            self.by_worker[worker] += 1
            self.handlers.setdefault(seq, []).append(worker)
        else:
            self.counts[worker] = max(self.counts.get(worker, 0), record["n"])
        self._changed.set()

    def notify(self) -> None:
        """Wake `wait_for` (something it checks changed outside the records)."""
        self._changed.set()

    @property
    def total(self) -> int:
        """Records of handled messages (duplicates included)."""
        return sum(self.by_worker.values())

    @property
    def counted(self) -> int:
        """Bench mode: messages the workers reported as handled."""
        return sum(self.counts.values())

    async def wait_for(self, done: Callable[[], bool], timeout: float, what: str) -> None:
        """Wait until ``done()`` holds, re-checking on every record; at most ``timeout`` s."""
        try:
            async with asyncio.timeout(timeout):
                while not done():
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            raise AssertionError(
                f"timed out after {timeout}s waiting for {what}: {len(self.handled)} distinct "
                f"handled, {self.total} records, split {dict(self.by_worker)}, "
                f"finals from {sorted(self.finals)}"
            ) from None
