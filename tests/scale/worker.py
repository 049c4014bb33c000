"""A competing-consumer worker process for the scale-out tests and benchmark.

    python tests/scale/worker.py URL PATTERN QUEUE QOS RESULT_TOPIC [--name N] [--mode M] ...

It connects a bus to URL (transport options go in the URL query, e.g.
``redis://127.0.0.1:6379?claim_idle=2`` or ``mqtt://h:1883?client_id=w1&clean_start=false``),
subscribes to PATTERN with ``queue=QUEUE`` at QoS QOS, prints ``ready`` on stdout once
``subscribe()`` returned, and then:

- ``--mode test`` (default): for every message (payload ``{"seq": n}``) publishes the record
  ``{"w": name, "seq": n}`` to RESULT_TOPIC at QoS 1 and awaits it *inside the handler*, so the
  record is at the broker before the handler returns (and before the bus acks the message: every
  network transport acks QoS 1 after the handler).
- ``--mode bench``: counts messages and publishes ``{"w": name, "n": count}`` (cumulative) to
  RESULT_TOPIC whenever the count changed, at most every ``--report-every`` seconds.

``--work io:MS`` awaits ``asyncio.sleep(MS / 1000)`` per message (an I/O-bound handler, e.g. a
database call); ``--work cpu:MS`` burns MS milliseconds of CPU per message.

On SIGTERM (or when stdin reaches EOF: the parent went away) it closes the subscribing bus
(the handler in flight finishes), publishes ``{"w": name, "final": true, "stats": {...}}``
(that bus's ``stats()``) at QoS 1 to RESULT_TOPIC and exits 0. SIGKILL just kills it (the
crash case of the tests).

Records go out on a second bus (``--result-url``, default URL): the measurement channel then
never waits behind the subscription's connection (a full subscription pauses reading it, which
would hold back the PUBACKs a QoS 1 record waits for: bugs.md S2), and it can use another broker
than the one under test (the MQTT tests use a private Mosquitto without queue limits for it).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
from typing import Any

import cascade_bus
from cascade_bus import Envelope


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("pattern")
    parser.add_argument("queue")
    parser.add_argument("qos", type=int, choices=(0, 1))
    parser.add_argument("result_topic")
    parser.add_argument("--name", default=f"w{os.getpid()}")
    parser.add_argument("--result-url", default=None, help="bus for the records (default URL)")
    parser.add_argument("--mode", choices=("test", "bench"), default="test")
    parser.add_argument("--work", default="none", help="none, io:MS or cpu:MS per message")
    parser.add_argument("--max-concurrency", type=int, default=1)
    parser.add_argument("--buffer-size", type=int, default=None, help="subscription queue")
    parser.add_argument("--report-every", type=float, default=0.01)
    parser.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        help="connect/subscribe bound (s); a busy box is slow",
    )
    return parser.parse_args(argv)


def _work(spec: str) -> tuple[str, float]:
    if spec == "none":
        return "none", 0.0
    kind, _, ms = spec.partition(":")
    if kind not in ("io", "cpu") or not ms:
        raise SystemExit(f"--work {spec!r}: use none, io:MS or cpu:MS")
    return kind, float(ms) / 1000


def _watch_stdin(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    """Stop when stdin reaches EOF, so a worker never outlives a parent that died."""
    fd = sys.stdin.fileno()

    def readable() -> None:
        try:
            data = os.read(fd, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            loop.remove_reader(fd)
            stop.set()

    loop.add_reader(fd, readable)


async def run(args: argparse.Namespace) -> None:
    """Connect, subscribe in the queue group, work until SIGTERM, report the final stats."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    if not sys.stdin.isatty():
        _watch_stdin(loop, stop)
    name: str = args.name
    result_topic: str = args.result_topic
    kind, seconds = _work(args.work)
    count = 0

    bounds = {"connect_timeout": args.timeout, "subscribe_timeout": args.timeout}
    source = f"scale-worker/{name}"
    async with (
        cascade_bus.connect(args.url, source=source, **bounds) as bus,
        cascade_bus.connect(args.result_url or args.url, source=source, **bounds) as out,
    ):

        async def handle(env: Envelope[Any]) -> None:
            nonlocal count
            if kind == "io":
                await asyncio.sleep(seconds)
            elif kind == "cpu":
                end = time.perf_counter() + seconds
                while time.perf_counter() < end:
                    pass
            count += 1
            if args.mode == "test":
                seq = env.payload["seq"]
                await out.publish(result_topic, {"w": name, "seq": seq}, qos=1)

        await bus.subscribe(
            args.pattern,
            handle,
            queue=args.queue,
            qos=args.qos,
            max_concurrency=args.max_concurrency,
            buffer_size=args.buffer_size,
        )
        print("ready", flush=True)
        reporter = None
        if args.mode == "bench":
            reporter = asyncio.create_task(_report(out, name, result_topic, args, lambda: count))
        await stop.wait()
        if reporter is not None:
            reporter.cancel()
            await asyncio.gather(reporter, return_exceptions=True)
            await out.publish(result_topic, {"w": name, "n": count}, qos=1)
        # A graceful stop, as a service does on SIGTERM: close() lets the handler in flight
        # finish (unsubscribe() would cancel it and count its message as dropped even though
        # its record may already be out), then the counters are final.
        await bus.close()
        stats = bus.stats()
        final = {
            "w": name,
            "final": True,
            "handled": count,
            "stats": {
                "published": stats.published,
                "delivered": stats.delivered,
                "dropped": dict(stats.dropped),
                "duplicates": stats.duplicates,
                "reconnects": stats.reconnects,
            },
        }
        await out.publish(result_topic, final, qos=1)
        await out.flush()


async def _report(
    bus: cascade_bus.Bus, name: str, topic: str, args: argparse.Namespace, count: Any
) -> None:
    """Bench mode: publish the cumulative count whenever it changed (batched by time)."""
    last = -1
    while True:
        await asyncio.sleep(args.report_every)
        now = count()
        if now != last:
            last = now
            await bus.publish(topic, {"w": name, "n": now}, qos=1)


def main(argv: list[str] | None = None) -> None:
    """Entry point: ``python worker.py URL PATTERN QUEUE QOS RESULT_TOPIC [options]``."""
    asyncio.run(run(_parse(argv)))


if __name__ == "__main__":
    main()
