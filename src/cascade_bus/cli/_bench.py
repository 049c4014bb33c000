"""``cascade-bus bench``: messages through the broker and back, throughput and round trip.

Two buses on the same URL (a publisher and a subscriber, as two services would be) exchange
``--messages`` messages on a unique topic. Each payload carries its sequence number and the
`time.perf_counter_ns` of its publish, so the subscriber measures every message's round trip
through the broker; duplicates (at-least-once redelivery) are counted, not measured twice.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from cascade_bus import BusURL, Envelope

from ._output import print_full
from ._runtime import open_bus

__all__ = ["BenchResult", "percentile", "run_bench", "show_result"]

#: Let other tasks (the progress display) run after this many publishes.
_YIELD_EVERY = 500


def percentile(values: list[int], fraction: float) -> int:
    """The nearest-rank percentile of sorted ``values`` (0 for none)."""
    if not values:
        return 0
    rank = max(1, math.ceil(fraction * len(values)))
    return values[min(rank, len(values)) - 1]


@dataclass
class BenchResult:
    """What one benchmark run measured."""

    url: str
    messages: int
    qos: int
    payload_bytes: int
    published: int = 0
    received: int = 0
    duplicates: int = 0
    publish_seconds: float = 0.0
    total_seconds: float = 0.0
    latencies_ns: list[int] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)

    @property
    def lost(self) -> int:
        """Messages published but not received before the timeout."""
        return self.published - self.received


async def run_bench(
    url: BusURL,
    *,
    messages: int,
    qos: int,
    size: int,
    rate: float | None,
    timeout: float,
    progress: Callable[[int, int], None] | None = None,
) -> BenchResult:
    """Publish ``messages`` messages through the broker and time each one's return.

    Args:
        url: The bus URL.
        messages: How many messages.
        qos: QoS for publishing and subscribing.
        size: Extra payload padding in bytes.
        rate: Publish at most this many messages per second (None: as fast as possible).
        timeout: Give up waiting for the last messages after this many seconds.
        progress: Called now and then with (published, received).
    """
    topic = f"cascade-bus/bench/{os.urandom(6).hex()}"
    pad = "x" * size
    result = BenchResult(url.redacted(), messages, qos, 0)
    seen = bytearray(messages)
    latencies = result.latencies_ns
    finished = asyncio.Event()

    def on_message(env: Envelope[Any]) -> None:
        now = time.perf_counter_ns()
        payload = env.payload
        if not isinstance(payload, dict):
            return
        seq = payload.get("seq")
        if not isinstance(seq, int) or not 0 <= seq < messages:
            return
        if seen[seq]:
            result.duplicates += 1
            return
        seen[seq] = 1
        latencies.append(now - int(payload.get("t", now)))
        result.received += 1
        if result.received == messages:
            finished.set()

    async def report() -> None:
        while progress is not None:
            progress(result.published, result.received)
            await asyncio.sleep(0.1)

    async with open_bus(url) as receiver, open_bus(url) as sender:
        await receiver.subscribe(topic, on_message, qos=qos)
        sample = {"seq": messages, "t": time.perf_counter_ns(), "pad": pad}
        result.payload_bytes = len(msgspec.json.encode(sample))
        reporter = asyncio.create_task(report(), name="cascade-bus-bench-progress")
        start = time.perf_counter()
        try:
            for seq in range(messages):
                if rate is not None:
                    delay = start + seq / rate - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                payload = {"seq": seq, "t": time.perf_counter_ns(), "pad": pad}
                await sender.publish(topic, payload, qos=qos)
                result.published += 1
                if seq % _YIELD_EVERY == _YIELD_EVERY - 1:
                    await asyncio.sleep(0)
            await sender.flush(timeout)
            result.publish_seconds = time.perf_counter() - start
            try:
                async with asyncio.timeout(timeout):
                    await finished.wait()
            except TimeoutError:
                pass
            result.total_seconds = time.perf_counter() - start
        finally:
            reporter.cancel()
            if progress is not None:
                progress(result.published, result.received)
        stats = receiver.stats()
        result.dropped = dict(stats.dropped)
    latencies.sort()
    return result


def progress_bar(console: Console, messages: int) -> tuple[Progress, Callable[[int, int], None]]:
    """A rich progress display with a bar for published and one for received messages."""
    bar = Progress(
        TextColumn("{task.description:<9}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=not console.is_terminal,
    )
    sent = bar.add_task("published", total=messages)
    got = bar.add_task("received", total=messages)

    def update(published: int, received: int) -> None:
        bar.update(sent, completed=published)
        bar.update(got, completed=received)
        bar.refresh()

    return bar, update


def _ms(ns: int) -> str:
    return f"{ns / 1e6:.3f}"


def show_result(console: Console, result: BenchResult) -> None:
    """Print the results as a table."""
    console.print(Text(f"bench {result.url}, qos {result.qos}"))
    table = Table()
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("messages published", f"{result.published:,}")
    table.add_row("messages received", f"{result.received:,}")
    table.add_row("lost", f"{result.lost:,}")
    table.add_row("duplicates", f"{result.duplicates:,}")
    table.add_row("payload size (bytes)", f"{result.payload_bytes:,}")
    if result.publish_seconds > 0:
        table.add_row("publish rate (msg/s)", f"{result.published / result.publish_seconds:,.0f}")
    if result.total_seconds > 0:
        table.add_row("throughput (msg/s)", f"{result.received / result.total_seconds:,.0f}")
        table.add_row("total time (s)", f"{result.total_seconds:.3f}")
    values = result.latencies_ns
    table.add_row("round trip p50 (ms)", _ms(percentile(values, 0.50)))
    table.add_row("round trip p90 (ms)", _ms(percentile(values, 0.90)))
    table.add_row("round trip p99 (ms)", _ms(percentile(values, 0.99)))
    table.add_row("round trip max (ms)", _ms(values[-1] if values else 0))
    for reason, number in sorted(result.dropped.items()):
        table.add_row(f"dropped: {reason}", f"{number:,}")
    print_full(console, table)
