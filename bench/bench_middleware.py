"""The cost of the middleware chain and of OpenTelemetry, per message, in one run.

Not a test: run it and read the table.

    .venv/bin/python bench/bench_middleware.py [--messages N] [--repeat R] [--clock wall|cpu]
        [--before REF]

Each bus case publishes N small dicts (``await bus.publish``) on its own ``memory://`` broker to
one async handler subscription and measures the wall time from the first publish until the
handler ran for the last one (and, with a ``BatchSpanProcessor``, until its queue was exported):
µs per message = publish + deliver + handle. Cases, interleaved R times (the best run is
reported: on a shared machine other processes only ever add time; the interleaving makes drift
hit every case alike; on a shared machine ``--clock cpu`` times the process's CPU time instead
of wall time, which other processes disturb much less):

- ``no middleware``: ``connect(url)``, the default path;
- ``middleware=[]``: ``connect(url, middleware=[])``; must be the very same path (< 2 %);
- ``pass-through Middleware``: one `Middleware` overriding ``publish`` and ``handle`` with a bare
  ``await call_next(env)`` (the chain's own cost);
- ``OTel, API only``: `OpenTelemetryMiddleware` with the API's no-op tracer and meter providers
  (what an instrumented library costs an application that does not trace);
- ``OTel + SDK, 1% sampled, batch``: the SDK's ``TracerProvider`` with
  ``ParentBased(TraceIdRatioBased(0.01))`` and a ``BatchSpanProcessor``, a usual production
  setting;
- ``OTel + SDK, every span, batch``: every span recorded, ``BatchSpanProcessor`` into an exporter
  that drops them (production without sampling: the export itself is not ours to measure);
- ``OTel + SDK, every span, simple+in-memory``: every span recorded, ``SimpleSpanProcessor`` into
  an ``InMemorySpanExporter`` (the test setup).

Every SDK case also records the ``messaging.process.duration`` histogram (``MeterProvider`` with
an ``InMemoryMetricReader``): two spans, W3C propagation and one histogram record per message.

Each SDK case has a **floor**, timed in the same rounds: the same spans (names, kinds,
attributes, parent/child), made current in turn, with ``traceparent`` formatted and parsed by
hand and the same histogram record, straight on the SDK with no bus — the SDK's own cost, which
no instrumentation can avoid. ``over floor`` = (case - ``no middleware``) - floor: what the
middleware, the chain and the bus's header handling add on top of the SDK.

Target (issue #7): OpenTelemetry enabled costs at most 10 µs per message over ``no middleware``.
It applies to every OpenTelemetry row; where the SDK's floor alone is above 10 µs it cannot be
met there, and the row is judged on ``over floor`` instead (said so in the verdict). Exit status
0 when ``middleware=[]`` is the same path, every row meets its target, and (with ``--before``)
the bus is not slower than before middleware existed.

``--before REF`` (default: the commit before middleware was added, found with git) also runs
``no middleware`` with that commit's ``src/`` in a subprocess, so that "disabled costs nothing
measurable" is checked against the bus as it was (at most 2 % slower). ``--before ''`` skips
it.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import itertools
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cascade_bus
from cascade_bus import Envelope, connect

ROOT = Path(__file__).resolve().parent.parent
TOPIC = "bench/sensor-1/temperature"
PAYLOAD: dict[str, Any] = {"seq": 1, "value": 21.5, "unit": "C", "ok": True}
NONE = "no middleware"
EMPTY = "middleware=[]"
API_ONLY = "OTel, API only (no SDK)"
SAME_PATH_LIMIT = 0.02  # "no middleware" vs middleware=[] and vs the bus before
OTEL_TARGET_US = 10.0  # OpenTelemetry enabled, µs per message over "no middleware"

_broker_ids = itertools.count()
# What a run is timed with: wall time (the default), or with --clock cpu the process's CPU time
# (every thread's, so a BatchSpanProcessor's exporting thread counts), which other processes on
# a shared machine disturb much less.
clock: Callable[[], float] = time.perf_counter
clock_name = "wall"

BusFactory = Callable[[str], cascade_bus.Bus]


def fresh_url() -> str:
    """A memory:// broker of its own for each run (brokers live as long as the process)."""
    return f"memory://bench-mw-{os.getpid()}-{next(_broker_ids)}"


def pass_through() -> Any:
    """A middleware overriding both hooks that only continues: the chain's own cost.

    Defined on demand: ``--before`` runs this file against a core without `Middleware`.
    """
    from cascade_bus import Middleware, Next

    class PassThrough(Middleware):
        async def publish(self, env: Envelope[Any], call_next: Next) -> None:
            await call_next(env)

        async def handle(self, env: Envelope[Any], call_next: Next) -> None:
            await call_next(env)

    return PassThrough()


async def one_run(n: int, make_bus: BusFactory, settle: Callable[[], object] = int) -> float:
    """Publish ``n`` messages to one handler; return seconds until the last was handled.

    ``settle`` runs inside the timed part, after the last message (e.g. a span processor's
    ``force_flush``, so that work deferred to another thread is counted too).
    """
    done = asyncio.Event()
    count = 0

    async def handler(_env: Envelope[Any]) -> None:
        nonlocal count
        count += 1
        if count == n:
            done.set()

    async with make_bus(fresh_url()) as bus:
        await bus.subscribe(TOPIC, handler)
        publish = bus.publish
        payload = PAYLOAD
        start = clock()
        for _ in range(n):
            await publish(TOPIC, payload)
        await done.wait()
        settle()
        elapsed = clock() - start
    assert count == n, (count, n)
    return elapsed


# -- the cases -------------------------------------------------------------------------------


@dataclass
class Case:
    """One row: how to time ``n`` messages once, and the times measured."""

    name: str
    run: Callable[[int], Any]  # n -> awaitable seconds, or seconds
    floor: str | None = None  # the name of this case's floor row
    is_floor: bool = False
    note: Callable[[int], str] = lambda n: ""  # after each run: spans lost, say (resets too)
    seconds: list[float] = field(default_factory=list)
    lossy: list[float] = field(default_factory=list)  # runs that lost spans: not comparable
    notes: list[str] = field(default_factory=list)

    def us(self, n: int) -> float:
        """Best µs per message, of the runs that lost nothing if there are any."""
        return min(self.seconds or self.lossy) / n * 1e6

    async def once(self, n: int) -> None:
        result = self.run(n)
        seconds = await result if asyncio.iscoroutine(result) else result
        if text := self.note(n):
            self.notes.append(text)
            self.lossy.append(seconds)
        else:
            self.seconds.append(seconds)


def bus_case(name: str, make_bus: BusFactory) -> Case:
    return Case(name, lambda n: one_run(n, make_bus))


def otel_cases() -> list[Case]:
    """The OpenTelemetry cases and their floors, or none when OpenTelemetry is not installed."""
    try:
        from opentelemetry.metrics import NoOpMeterProvider
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            SimpleSpanProcessor,
            SpanExporter,
            SpanExportResult,
        )
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
        from opentelemetry.trace import NoOpTracerProvider

        from cascade_bus.otel import OpenTelemetryMiddleware
    except ImportError:
        print("OpenTelemetry (api + sdk) not installed: its cases are skipped", file=sys.stderr)
        return []

    class CountingExporter(SpanExporter):
        """Accepts and forgets every span; counts them."""

        def __init__(self) -> None:
            self.count = 0

        def export(self, spans: Any) -> SpanExportResult:
            self.count += len(spans)
            return SpanExportResult.SUCCESS

    class ClearedInMemory(InMemorySpanExporter):
        """The test suite's exporter; counted and cleared after each run to bound memory."""

        @property
        def count(self) -> int:
            return len(self.get_finished_spans())

    # "Queue full, dropping Span." once per lost span: the table's footnote counts them instead.
    logging.getLogger("opentelemetry.sdk").setLevel(logging.ERROR)
    meter_provider = MeterProvider(metric_readers=[InMemoryMetricReader()])

    @dataclass
    class Setup:
        label: str
        provider: TracerProvider
        exporter: CountingExporter | ClearedInMemory
        expect_all: bool  # every span exported (not sampled)

        def settle(self) -> None:
            self.provider.force_flush()

        def note(self, n: int) -> str:
            exported = self.exporter.count
            if isinstance(self.exporter, InMemorySpanExporter):
                self.exporter.clear()
            else:
                self.exporter.count = 0
            if self.expect_all and exported != 2 * n:
                return f"{2 * n - exported:,} of {2 * n:,} not exported"
            return ""

    def setup(
        label: str, batch: bool, in_memory: bool = False, ratio: float | None = None
    ) -> Setup:
        provider = (
            TracerProvider()
            if ratio is None
            else TracerProvider(sampler=ParentBased(TraceIdRatioBased(ratio)))
        )
        exporter: CountingExporter | ClearedInMemory = (
            ClearedInMemory() if in_memory else CountingExporter()
        )
        provider.add_span_processor(
            BatchSpanProcessor(exporter) if batch else SimpleSpanProcessor(exporter)
        )
        return Setup(label, provider, exporter, ratio is None)

    setups = [
        setup("OTel + SDK, 1% sampled, batch", batch=True, ratio=0.01),
        setup("OTel + SDK, every span, batch", batch=True),
        setup("OTel + SDK, every span, simple+in-memory", batch=False, in_memory=True),
    ]

    def traced(tracer_provider: Any, meter: Any) -> BusFactory:
        def make(url: str) -> cascade_bus.Bus:
            otel = OpenTelemetryMiddleware(tracer_provider, meter)
            return otel.bind(connect(url, middleware=[otel]))

        return make

    # The API's own no-op providers: what an instrumented library costs an application that
    # does not trace (the global providers would be proxies to whatever is set).
    cases = [bus_case(API_ONLY, traced(NoOpTracerProvider(), NoOpMeterProvider()))]
    floors = []
    for s in setups:
        floor_name = f"  floor: SDK alone ({s.label.split(', ', 1)[1]})"
        cases.append(
            Case(
                s.label,
                functools.partial(
                    one_run, make_bus=traced(s.provider, meter_provider), settle=s.settle
                ),
                floor=floor_name,
                note=s.note,
            )
        )
        floors.append(
            Case(
                floor_name,
                functools.partial(
                    sdk_floor,
                    tracer_provider=s.provider,
                    meter_provider=meter_provider,
                    settle=s.settle,
                ),
                is_floor=True,
                note=s.note,
            )
        )
    return cases + floors


def sdk_floor(
    n: int, tracer_provider: Any, meter_provider: Any, settle: Callable[[], Any]
) -> float:
    """Seconds for ``n`` times the SDK work one traced message needs, without any bus.

    The spans the middleware makes — ``<topic> publish`` (PRODUCER) and ``<topic> process``
    (CONSUMER, child of the first through a hand-made ``traceparent``) with the same attributes
    — each made current while "its work" runs, plus the ``messaging.process.duration`` record.
    """
    from opentelemetry import context, trace
    from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags

    tracer = tracer_provider.get_tracer("bench-floor")
    histogram = meter_provider.get_meter("bench-floor").create_histogram(
        "messaging.process.duration", unit="s"
    )
    metric_attributes = {"messaging.system": "memory", "messaging.operation.name": "process"}
    publish_base = {
        "messaging.system": "memory",
        "messaging.operation.type": "publish",
        "messaging.operation.name": "publish",
    }
    process_base = {
        "messaging.system": "memory",
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
    }
    publish_name, process_name = f"{TOPIC} publish", f"{TOPIC} process"
    empty = context.Context()
    perf_counter = time.perf_counter
    start = clock()
    for i in range(n):
        message_id = f"{i:032x}"
        producer = tracer.start_span(
            publish_name,
            kind=SpanKind.PRODUCER,
            attributes={
                **publish_base,
                "messaging.destination.name": TOPIC,
                "messaging.message.id": message_id,
            },
        )
        token = context.attach(trace.set_span_in_context(producer))
        sc = producer.get_span_context()
        traceparent = f"00-{sc.trace_id:032x}-{sc.span_id:016x}-{sc.trace_flags:02x}"
        context.detach(token)
        producer.end()

        _, trace_id, span_id, flags = traceparent.split("-")
        remote = SpanContext(
            int(trace_id, 16),
            int(span_id, 16),
            is_remote=True,
            trace_flags=TraceFlags(int(flags, 16)),
        )
        parent = trace.set_span_in_context(NonRecordingSpan(remote), empty)
        consumer = tracer.start_span(
            process_name,
            context=parent,
            kind=SpanKind.CONSUMER,
            attributes={
                **process_base,
                "messaging.destination.name": TOPIC,
                "messaging.message.id": message_id,
            },
        )
        token = context.attach(trace.set_span_in_context(consumer, parent))
        started = perf_counter()
        histogram.record(perf_counter() - started, metric_attributes)
        context.detach(token)
        consumer.end()
    settle()
    return clock() - start


def cases() -> list[Case]:
    return [
        bus_case(NONE, lambda url: connect(url)),
        bus_case(EMPTY, lambda url: connect(url, middleware=[])),
        bus_case("pass-through Middleware", lambda url: connect(url, middleware=[pass_through()])),
        *otel_cases(),
    ]


async def run_cases(all_cases: list[Case], n: int, repeat: int, before: Case | None) -> None:
    """Run every case ``repeat`` times, interleaved (``before`` in a subprocess each round)."""
    for case in all_cases:  # warm-up
        await case.once(max(1_000, n // 10))
        case.seconds.clear()
        case.lossy.clear()
        case.notes.clear()
    for _ in range(repeat):
        for case in all_cases:
            gc.collect()
            await case.once(n)
        if before is not None:
            seconds = run_before(before.name, n)
            if seconds is None:
                before.seconds.clear()
                before = None
            else:
                before.seconds.append(seconds)


# -- the bus before middleware existed -------------------------------------------------------


def default_before() -> str:
    """The parent of the commit that added ``_middleware.py`` (empty when git cannot tell)."""
    try:
        out = subprocess.run(
            [
                "git",
                "log",
                "--diff-filter=A",
                "--format=%H",
                "--",
                "src/cascade_bus/_middleware.py",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        return ""
    return f"{out[-1]}^" if out else ""


def short_ref(ref: str) -> str:
    """``ref`` as a short commit hash (``ref`` itself when git cannot tell)."""
    result = subprocess.run(
        ["git", "rev-parse", "--short=10", ref], cwd=ROOT, capture_output=True, text=True
    )
    return result.stdout.strip() or ref


def run_before(ref: str, n: int) -> float | None:
    """Time ``no middleware`` once with ``ref``'s ``src/`` in a subprocess; seconds or None."""
    with tempfile.TemporaryDirectory(prefix="bench-before-") as tmp:
        archive = subprocess.run(
            ["git", "archive", ref, "src"], cwd=ROOT, capture_output=True, check=False
        )
        if archive.returncode != 0:
            print(f"--before {ref}: {archive.stderr.decode().strip()}", file=sys.stderr)
            return None
        subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
        env = {**os.environ, "PYTHONPATH": str(Path(tmp) / "src")}
        child = subprocess.run(
            [sys.executable, __file__, "--child", "--messages", str(n), "--clock", clock_name],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        if child.returncode != 0:
            print(f"--before {ref} failed:\n{child.stderr}", file=sys.stderr)
            return None
        return float(child.stdout.strip().splitlines()[-1])


async def child_main(n: int) -> None:
    """Subprocess mode for ``--before``: warm up, time the plain bus once, print seconds."""
    plain: BusFactory = lambda url: connect(url)  # noqa: E731
    await one_run(max(1_000, n // 10), plain)
    gc.collect()
    print(await one_run(n, plain))


# -- report ----------------------------------------------------------------------------------


def report(all_cases: list[Case], n: int, before: Case | None) -> bool:
    """Print the table; return whether every target was met."""
    by_name = {case.name: case for case in all_cases}
    base = by_name[NONE].us(n)
    rows: list[tuple[str, str, str, str, str]] = []
    footnotes: list[str] = []
    ok = True

    def verdict(passed: bool) -> str:
        nonlocal ok
        ok &= passed
        return "ok" if passed else "MISSED"

    if before is not None and before.seconds:
        us_before = before.us(n)
        passed = base <= us_before * (1 + SAME_PATH_LIMIT)
        rows.append(
            (
                f"bus before middleware ({short_ref(before.name)})",
                f"{us_before:.2f}",
                f"{us_before - base:+.2f}",
                "",
                f"no middleware ≤ {SAME_PATH_LIMIT:.0%} slower than this: {verdict(passed)}",
            )
        )
    for case in all_cases:
        us = case.us(n)
        if case.is_floor:
            rows.append((case.name, f"{us:.2f}", "", "", "the SDK's own work, no bus"))
            continue
        delta = us - base
        over, target = "", ""
        if case.name == EMPTY:
            passed = abs(delta) / base < SAME_PATH_LIMIT
            target = f"same path, within {SAME_PATH_LIMIT:.0%}: {verdict(passed)}"
        elif case.name == API_ONLY:
            target = f"≤ {OTEL_TARGET_US:g} µs over none: {verdict(delta <= OTEL_TARGET_US)}"
        elif case.floor is not None:
            floor_us = by_name[case.floor].us(n)
            added = delta - floor_us
            over = f"{added:+.2f}"
            if floor_us <= OTEL_TARGET_US:
                target = f"≤ {OTEL_TARGET_US:g} µs over none: {verdict(delta <= OTEL_TARGET_US)}"
            else:
                target = (
                    f"≤ {OTEL_TARGET_US:g} over none: unreachable (floor*); "
                    f"over floor ≤ {OTEL_TARGET_US:g}: {verdict(added <= OTEL_TARGET_US)}"
                )
                if not footnotes:
                    footnotes.append(
                        f"* The SDK's own work alone exceeds the {OTEL_TARGET_US:g} µs target in "
                        "this row: what the instrumentation controls is 'over floor'."
                    )
        rows.append((case.name, f"{us:.2f}", f"{delta:+.2f}", over, target))
    for case in all_cases:
        if case.notes:
            kept = "the best of the others is shown" if case.seconds else "none was lossless"
            footnotes.append(
                f"! {case.name}: {len(case.notes)} of {len(case.notes) + len(case.seconds)} runs "
                f"lost spans (the span processor's queue was full; {kept}): "
                + "; ".join(case.notes)
            )

    print(
        f"python {platform.python_version()} on {platform.machine()} ({os.cpu_count()} CPUs), "
        f"cascade-bus {cascade_bus.__version__}; {n:,} messages to 1 handler on memory://, "
        f"best of {len(by_name[NONE].seconds)} interleaved runs, "
        f"{'CPU time' if clock_name == 'cpu' else 'wall time'}"
    )
    print()
    width = max(len(row[0]) for row in rows)
    print(f"{'case':<{width}} {'µs/msg':>7} {'Δ none':>7} {'over floor':>10}  target")
    print(f"{'-' * width} {'-' * 7} {'-' * 7} {'-' * 10}  {'-' * 40}")
    for name, us_text, delta_text, over, target in rows:
        print(f"{name:<{width}} {us_text:>7} {delta_text:>7} {over:>10}  {target}")
    print()
    print(
        "Δ none: µs/msg more than 'no middleware'. floor: the same spans, attributes, W3C\n"
        "traceparent (by hand) and histogram record straight on the SDK, no bus.\n"
        "over floor = Δ none - floor: what the middleware, chain and bus add on top of the SDK."
    )
    for text in footnotes:
        print(text)
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument("--before", default=None, help="git ref of the bus before (see above)")
    parser.add_argument(
        "--clock", choices=["wall", "cpu"], default="wall", help="what runs are timed with"
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    global clock, clock_name
    clock_name = args.clock
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.child:
        asyncio.run(child_main(args.messages))  # timed with the parent's --clock
        return 0
    all_cases = cases()
    ref = default_before() if args.before is None else args.before
    before = Case(ref, lambda n: None) if ref else None
    asyncio.run(run_cases(all_cases, args.messages, args.repeat, before))
    return 0 if report(all_cases, args.messages, before) else 1


if __name__ == "__main__":
    sys.exit(main())
