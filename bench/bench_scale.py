"""Scale-out: throughput of 1, 2 and 3 worker processes in one queue group, per transport.

Not a test: run it and read the table.

    .venv/bin/python bench/bench_scale.py [--transports mqtt,redis,nats] [--messages N]
        [--io-messages N] [--qos 1] [--workers 1,2,3] [--repeat R]

Each worker is a separate process (``tests/scale/worker.py --mode bench``) subscribed with the
same ``queue=`` (MQTT 5 shared subscription, Redis Streams consumer group, NATS JetStream queue
consumer at QoS 1 / core queue group at QoS 0). Redis and NATS: the shared servers (URLs below).
MQTT: by default a private Mosquitto with its default in-flight window (20) but no queue limit
(``max_queued_messages 0``) -- with Mosquitto's default limit of 1000, one slow worker fed a
burst loses QoS 1 messages at the broker (docs/scaling.md); ``--mqtt-url`` picks a broker.
This process publishes the messages (gathered batches of 500) and the workers report their
cumulative counts (every 10 ms, when changed); the clock runs from the first publish until the
reported counts add up to all messages. Workers are started (and ready) before the clock.

Two kinds of handler:

- ``none``: the handler does nothing; what is measured is the transport and the bus
  (publish, receive, decode, ack) -- bound by the one publisher and the broker here.
- ``io:1``: the handler awaits ``asyncio.sleep(0.001)`` (a 1 ms database call); one worker
  handles one message at a time (``max_concurrency=1``), so it is latency-bound.

Besides msgs/s and the speedup over one worker, each row shows how busy the machine's CPUs were
(``/proc/stat``, 100% = every core busy) and the CPU used, in cores, by the workers, this
process, the broker and everything else (another benchmark running beside this one shows up
there): that tells whether a row was limited by CPU or by waiting.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import cascade_bus
from cascade_bus.testing.brokers import BrokerProcess, start_mosquitto

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from scale.harness import Pool, Results

TICK = os.sysconf("SC_CLK_TCK")
CPUS = os.cpu_count() or 1
DEFAULT_URLS = {
    "mqtt": "private",
    "redis": "redis://127.0.0.1:6379",
    "nats": "nats://127.0.0.1:4222",
}


def machine_cpu() -> tuple[int, int]:
    """(busy, total) jiffies over all cores since boot."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    total = sum(fields[:8])
    return total - idle, total


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) a process used so far; 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


def broker_pid(url: str) -> int | None:
    """Best effort: the pid of the local broker process serving ``url`` (by name and port)."""
    names = {"mqtt": "mosquitto", "redis": "redis-server", "nats": "nats-server"}
    scheme, _, rest = url.partition("://")
    port = rest.rsplit(":", 1)[-1].split("/")[0].split("?")[0]
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if not argv or names.get(scheme, "?").encode() not in argv[0]:
            continue
        text = b" ".join(argv).decode(errors="replace")
        if port in text or (scheme == "mqtt" and "/etc/mosquitto" in text and port == "1883"):
            return int(proc.name)
    return None


@dataclass
class Row:
    transport: str
    work: str
    workers: int
    rate: float
    publish_rate: float
    machine: float  # fraction of all cores busy
    worker_cores: float
    publisher_cores: float
    broker_cores: float


async def run_once(
    transport: str,
    url: str,
    work: str,
    workers: int,
    messages: int,
    qos: int,
    timeout: float,
    broker: int | None,
) -> Row:
    topic = f"bench/{uuid.uuid4().hex}"
    results = Results()
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as logdir:
        pool = Pool(Path(logdir))
        try:
            async with cascade_bus.connect(url) as collector, cascade_bus.connect(url) as pub:
                await collector.subscribe(f"{topic}/counts", results, qos=1)
                procs = await pool.start(
                    url,
                    f"{topic}/jobs",
                    "bench",
                    qos,
                    f"{topic}/counts",
                    [f"w{i}" for i in range(workers)],
                    "--mode",
                    "bench",
                    "--work",
                    work,
                )
                pids = [w.proc.pid for w in procs]
                payload = {"sensor": "t1", "value": 21.5, "pad": "x" * 48}
                cpu0 = [process_cpu(p) for p in pids]
                broker0 = process_cpu(broker) if broker else 0.0
                busy0, total0 = machine_cpu()
                own0 = time.process_time()
                start = time.perf_counter()
                for first in range(0, messages, 500):
                    batch = range(first, min(messages, first + 500))
                    await asyncio.gather(
                        *(
                            pub.publish(f"{topic}/jobs", {"seq": n, **payload}, qos=qos)
                            for n in batch
                        )
                    )
                published = time.perf_counter() - start
                await results.wait_for(
                    lambda: results.counted >= messages, timeout, "every message handled"
                )
                elapsed = time.perf_counter() - start
                own = time.process_time() - own0
                busy1, total1 = machine_cpu()
                cpu1 = [process_cpu(p) for p in pids]
                broker1 = process_cpu(broker) if broker else 0.0
                for w in procs:
                    await w.stop()
        finally:
            await pool.aclose()
    return Row(
        transport,
        work,
        workers,
        messages / elapsed,
        messages / published,
        (busy1 - busy0) / max(1, total1 - total0),
        sum(b - a for a, b in zip(cpu0, cpu1, strict=True)) / elapsed,
        own / elapsed,
        (broker1 - broker0) / elapsed,
    )


def fmt_rate(rate: float) -> str:
    return f"{rate / 1000:.1f}k/s" if rate >= 1000 else f"{rate:.0f}/s"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--transports", default="mqtt,redis,nats")
    for name, url in DEFAULT_URLS.items():
        parser.add_argument(f"--{name}-url", default=url)
    parser.add_argument("--messages", type=int, default=20_000, help="for the no-work handler")
    parser.add_argument("--io-messages", type=int, default=3_000, help="for the io:1 handler")
    parser.add_argument("--qos", type=int, default=1, choices=(0, 1))
    parser.add_argument("--workers", default="1,2,3")
    parser.add_argument("--works", default="none,io:1")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=120.0, help="per run, seconds")
    args = parser.parse_args()
    counts = [int(n) for n in args.workers.split(",")]
    load = os.getloadavg()
    print(
        f"scale-out: queue group of 1..{max(counts)} worker processes, QoS {args.qos}, "
        f"{os.cpu_count()} CPUs, load average {load[0]:.2f} at start; median of {args.repeat}"
    )
    print(
        f"{args.messages:,} messages per run with the no-op handler, {args.io_messages:,} with "
        "io:1 (await asyncio.sleep(0.001) per message)\n"
    )
    header = (
        f"{'transport':<9} | {'handler':<7} | {'workers':>7} | {'handled':>9} | "
        f"{'speedup':>7} | {'publish':>9} | {'CPU busy':>8} | {'workers':>7} | {'pub':>5} | "
        f"{'broker':>6} | {'other':>5}"
    )
    print(header)
    print("-" * len(header))
    brokers: list[BrokerProcess] = []
    try:
        for transport in args.transports.split(","):
            url = getattr(args, f"{transport}_url")
            if url == "private":
                # Mosquitto's defaults drop QoS 1 messages for a member more than 1,020 behind
                # (max_inflight_messages 20 + max_queued_messages 1000): lift the queue limit.
                brokers.append(start_mosquitto(extra_config="max_inflight_messages 20\n"))
                url = brokers[-1].url
                pid = brokers[-1].pid
            else:
                pid = broker_pid(url)
            if transport == "nats" and "consumer_inactive" not in url:
                # Drop the group's JetStream consumer soon after a run (default: after 1 h).
                url += ("&" if "?" in url else "?") + "consumer_inactive=10"
            await bench_transport(transport, url, args, counts, pid)
    finally:
        for broker in brokers:
            broker.close()
    print(
        "\nhandled = end-to-end msgs/s (first publish until the workers had them all); publish = "
        "the publisher's own rate;\nCPU busy = all cores (100% = all busy); workers / pub / broker"
        " = CPU cores used by the worker processes / this\nprocess (publisher + collector) / the "
        "broker; other = the rest of the machine's busy cores (other processes)."
    )


async def bench_transport(
    transport: str, url: str, args: argparse.Namespace, counts: list[int], broker: int | None
) -> None:
    """Print the rows of one transport: every handler kind, every worker count."""
    for work in args.works.split(","):
        messages = args.messages if work == "none" else args.io_messages
        base = None
        for n in counts:
            rows = [
                await run_once(transport, url, work, n, messages, args.qos, args.timeout, broker)
                for _ in range(args.repeat)
            ]
            row = sorted(rows, key=lambda r: r.rate)[len(rows) // 2]
            used = row.worker_cores + row.publisher_cores + row.broker_cores
            rate = statistics.median(r.rate for r in rows)
            base = base or rate
            print(
                f"{transport:<9} | {work:<7} | {n:>7} | {fmt_rate(rate):>9} | "
                f"{rate / base:>6.2f}x | {fmt_rate(row.publish_rate):>9} | "
                f"{row.machine:>7.0%} | {row.worker_cores:>7.2f} | "
                f"{row.publisher_cores:>5.2f} | {row.broker_cores:>6.2f} | "
                f"{max(0.0, row.machine * CPUS - used):>5.2f}",
                flush=True,
            )


if __name__ == "__main__":
    asyncio.run(main())
