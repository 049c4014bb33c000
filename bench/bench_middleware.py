"""The cost of the middleware chain and of OpenTelemetry, per message, in one run.

Not a test: run it and read the table.

    .venv/bin/python bench/bench_middleware.py [--messages N] [--repeat R] [--before REF]

Each case publishes N small dicts (``await bus.publish``) on its own ``memory://`` broker to one
async handler subscription and measures the wall time from the first publish until the handler
ran for the last one: µs per message = publish + deliver + handle. Cases, interleaved R times
(the best run is reported: on a shared machine other processes only ever add time; the
interleaving makes drift hit every case alike):

- ``no middleware``: ``connect(url)``, the default path;
- ``middleware=[]``: ``connect(url, middleware=[])``; must be the very same path (< 2 %);
- ``pass-through Middleware``: one `Middleware` overriding ``publish`` and ``handle`` with a bare
  ``await call_next(env)`` (the chain's own cost);
- ``OpenTelemetry, API only``: `OpenTelemetryMiddleware` with the API's no-op tracer and meter
  providers (what an instrumented library costs an application that does not trace);
- ``OpenTelemetry + SDK, 1% sampled``: the SDK's ``TracerProvider`` with
  ``ParentBased(TraceIdRatioBased(0.01))``, the usual production setting;
- ``OpenTelemetry + SDK, every span``: every span recorded and ended through a
  ``SimpleSpanProcessor`` into an exporter that drops them; two spans, W3C propagation and one
  histogram record (``MeterProvider`` with an ``InMemoryMetricReader``) per message.

Target for the SDK cases: at most 10 µs per message more than ``no middleware``. A last row
times the SDK work one traced message needs (2 spans, inject, extract, 1 histogram record)
without any bus: the floor the ``every span`` case cannot go below.

``--before REF`` (default: the commit before middleware was added, found with git) also runs
``no middleware`` with that commit's ``src/`` in a subprocess, so that "disabled costs nothing
measurable" is checked against the bus as it was (at most 2 % slower). ``--before ''`` skips
it.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
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
API_ONLY = "OpenTelemetry, API only (no SDK)"
SDK_SAMPLED = "OpenTelemetry + SDK, 1% sampled"
SDK_ALL = "OpenTelemetry + SDK, every span"
SAME_PATH_LIMIT = 0.02  # "no middleware" vs middleware=[] and vs the bus before
OTEL_TARGET_US = 10.0  # OpenTelemetry enabled, µs per message over "no middleware"

_broker_ids = itertools.count()


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


async def one_run(n: int, make_bus: Callable[[str], cascade_bus.Bus]) -> float:
    """Publish ``n`` messages to one handler; return seconds until the last was handled."""
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
        start = time.perf_counter()
        for _ in range(n):
            await publish(TOPIC, payload)
        await done.wait()
        elapsed = time.perf_counter() - start
    assert count == n, (count, n)
    return elapsed


BusFactory = Callable[[str], cascade_bus.Bus]


@dataclass
class Case:
    name: str
    make_bus: BusFactory
    seconds: list[float] = field(default_factory=list)

    def us(self, n: int) -> float:
        return min(self.seconds) / n * 1e6


def otel_factories() -> list[tuple[str, BusFactory]]:
    """The OpenTelemetry cases, or none when OpenTelemetry is not installed."""
    try:
        from opentelemetry.metrics import NoOpMeterProvider
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
        from opentelemetry.trace import NoOpTracerProvider

        from cascade_bus.otel import OpenTelemetryMiddleware
    except ImportError:
        print("OpenTelemetry (api + sdk) not installed: its cases are skipped", file=sys.stderr)
        return []

    meter_provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    every = TracerProvider()
    every.add_span_processor(SimpleSpanProcessor(drop_exporter()))
    sampled = TracerProvider(sampler=ParentBased(TraceIdRatioBased(0.01)))
    sampled.add_span_processor(SimpleSpanProcessor(drop_exporter()))

    def factory(tracer_provider: Any, meter: Any) -> BusFactory:
        def make(url: str) -> cascade_bus.Bus:
            otel = OpenTelemetryMiddleware(tracer_provider, meter)
            return otel.bind(connect(url, middleware=[otel]))

        return make

    return [
        # The API's own no-op providers: what an instrumented library costs an application
        # that does not trace (the global providers would be proxies to whatever is set).
        (API_ONLY, factory(NoOpTracerProvider(), NoOpMeterProvider())),
        (SDK_SAMPLED, factory(sampled, meter_provider)),
        (SDK_ALL, factory(every, meter_provider)),
    ]


def drop_exporter() -> Any:
    """A span exporter that accepts and forgets every span."""
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    class DropExporter(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    return DropExporter()


def sdk_floor(n: int) -> float | None:
    """Seconds for ``n`` times the SDK work one traced message needs, without any bus.

    Two spans with the same attributes (start, make current, end), one inject, one extract and
    one histogram record: the part of ``OpenTelemetry + SDK`` that the middleware cannot avoid.
    """
    try:
        from opentelemetry import context, propagate, trace
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.trace import SpanKind
    except ImportError:
        return None
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(drop_exporter()))
    tracer = provider.get_tracer("bench")
    histogram = (
        MeterProvider(metric_readers=[InMemoryMetricReader()])
        .get_meter("bench")
        .create_histogram("messaging.process.duration", unit="s")
    )
    metric_attributes = {"messaging.system": "memory", "messaging.operation.name": "process"}
    base = {"messaging.system": "memory", "messaging.destination.name": TOPIC}
    start = time.perf_counter()
    for i in range(n):
        attributes = {**base, "messaging.message.id": str(i), "messaging.operation.type": "x"}
        producer = tracer.start_span("p", kind=SpanKind.PRODUCER, attributes=attributes)
        token = context.attach(trace.set_span_in_context(producer))
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        context.detach(token)
        producer.end()
        parent = propagate.extract(carrier)
        consumer = tracer.start_span(
            "c", context=parent, kind=SpanKind.CONSUMER, attributes=attributes
        )
        token = context.attach(trace.set_span_in_context(consumer, parent))
        histogram.record(0.0001, metric_attributes)
        context.detach(token)
        consumer.end()
    return time.perf_counter() - start


def cases() -> list[Case]:
    factories: list[tuple[str, BusFactory]] = [
        ("no middleware", lambda url: connect(url)),
        ("middleware=[]", lambda url: connect(url, middleware=[])),
        ("pass-through Middleware", lambda url: connect(url, middleware=[pass_through()])),
        *otel_factories(),
    ]
    return [Case(name, factory) for name, factory in factories]


async def run_cases(all_cases: list[Case], n: int, repeat: int, before: Case | None) -> None:
    """Run every case ``repeat`` times, interleaved (``before`` in a subprocess each round)."""
    for case in all_cases:  # warm-up
        await one_run(max(1_000, n // 10), case.make_bus)
    for _ in range(repeat):
        for case in all_cases:
            gc.collect()
            case.seconds.append(await one_run(n, case.make_bus))
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
            [sys.executable, __file__, "--child", "--messages", str(n)],
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


def report(all_cases: list[Case], n: int, before: Case | None, floor_us: float | None) -> bool:
    """Print the table; return whether every target was met."""
    base = all_cases[0].us(n)
    rows: list[tuple[str, str, str, str]] = []
    ok = True

    def row(name: str, us: float, target: str = "", passed: bool | None = None) -> None:
        nonlocal ok
        verdict = ""
        if passed is not None:
            ok &= passed
            verdict = "ok" if passed else "MISSED"
        rows.append((name, f"{us:.2f}", f"{us - base:+.2f}", f"{target}  {verdict}".strip()))

    if before is not None and before.seconds:
        us_before = before.us(n)
        row(
            f"bus before middleware ({short_ref(before.name)})",
            us_before,
            f"no middleware at most {SAME_PATH_LIMIT:.0%} slower than this",
            base <= us_before * (1 + SAME_PATH_LIMIT),
        )
    for case in all_cases:
        us = case.us(n)
        if case.name == "middleware=[]":
            row(
                case.name,
                us,
                f"same path: within {SAME_PATH_LIMIT:.0%} of no middleware",
                abs(us - base) / base < SAME_PATH_LIMIT,
            )
        elif case.name in (SDK_ALL, SDK_SAMPLED):
            row(
                case.name,
                us,
                f"<= {OTEL_TARGET_US:g} µs over no middleware",
                us - base <= OTEL_TARGET_US,
            )
        else:
            row(case.name, us)
    print(
        f"python {platform.python_version()} on {platform.machine()} ({os.cpu_count()} CPUs), "
        f"cascade-bus {cascade_bus.__version__}; {n:,} messages to 1 handler on memory://, "
        f"best of {len(all_cases[0].seconds)} interleaved runs"
    )
    print()
    print(f"{'case':<42} {'µs/msg':>7} {'Δ none':>7}  target")
    print(f"{'-' * 42} {'-' * 7} {'-' * 7}  {'-' * 50}")
    for name, us_text, delta, target in rows:
        print(f"{name:<42} {us_text:>7} {delta:>7}  {target}")
    if floor_us is not None:
        print(
            f"{'SDK work alone, no bus (2 spans, inject,':<42} {floor_us:>7.2f} {'':>7}  "
            "what OpenTelemetry + SDK cannot go below"
        )
        print("  extract, 1 histogram record)")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument("--before", default=None, help="git ref of the bus before (see above)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        asyncio.run(child_main(args.messages))
        return 0
    all_cases = cases()
    ref = default_before() if args.before is None else args.before
    before = Case(ref, lambda url: connect(url)) if ref else None
    asyncio.run(run_cases(all_cases, args.messages, args.repeat, before))
    floor = sdk_floor(args.messages)
    floor_us = None if floor is None else floor / args.messages * 1e6
    return 0 if report(all_cases, args.messages, before, floor_us) else 1


if __name__ == "__main__":
    sys.exit(main())
