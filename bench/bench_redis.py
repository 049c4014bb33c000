"""Redis: cascade-bus against bare redis-py on the same server, interleaved in rounds, in one run.

Not a test: run it and read the table.

    .venv/bin/python bench/bench_redis.py [--url redis://127.0.0.1:6379] [--messages N]
        [--rounds R] [--pings P] [--routes K] [--cases a,b,...]

Every case moves the same N messages (the round-trip-bound awaited loop: N/4) from one publisher
to one subscriber, each on its own connection(s) in this process, and its clock runs from the
first publish until the subscriber has *received and decoded* all N (the count is checked
exactly; a case that gets fewer times out and the run fails). The body is the same JSON payload
(~100 B) for every redis-py case and for ``cascade-bus ... (raw)``; the default ``json`` format
wraps it in the CloudEvents envelope (the "body" column says how big each case's bodies are on
the wire).

Every bus of the run gets a key ``prefix`` of its own (removed at the end) with K leased stream
routes of other subscriptions in it (``--routes``, none matching the bench's topics): the
publish script reads the prefix's routes, so a shared server's leftovers (a test suite's durable
queue groups live for ``stream_ttl``) would otherwise change the bus's cost from run to run.

The cases run in R rounds; each round runs every case once, in an order that rotates from round
to round, so that a burst of load from other jobs on the (shared, 2-core) machine hits all cases
alike. Per case the table gives the median and the min-max over the rounds of:

- end-to-end rate (messages/s) and the publisher loop's own rate;
- client CPU per message (``time.process_time`` of this process, publisher + subscriber);
- server CPU per message (``used_cpu_user + used_cpu_sys`` of the Redis server, from ``INFO``)
  and the command time Redis accounted per message (``INFO commandstats``, the main commands
  listed with their ``usec_per_call``).

The ratios against redis-py are computed per round (each case against the baseline measured in
the same round) and then summarised the same way. CPU per message is the steadier figure on a
loaded machine; the rates are what the targets are stated in.

- ``redis-py awaited PUBLISH``: ``await r.publish(channel, body)`` per message; the subscriber
  iterates ``PubSub.listen()`` and decodes each body (msgspec).
- ``redis-py pipelined PUBLISH``: the same PUBLISHes in ``pipeline(transaction=False)`` batches
  of 1,000.
- ``cascade-bus awaited publish``: the naive loop ``await bus.publish(topic, payload)`` (QoS 0),
  default JSON envelope and ``format=raw``; the subscriber is a bus handler.
- ``redis-py streams XADD+XREADGROUP``: pipelined XADD (batches of 1,000), consumer XREADGROUP
  (COUNT 500) + XACK per batch.
- ``cascade-bus QoS 1 (streams)``: ``bus.publish(..., qos=1)`` gathered in batches of 1,000 (each
  returns when Redis replied), a QoS 1 subscription (stream, XACK after the handler).

Other libraries, each optional (if its import fails, its row says why and the rest runs); both
get the awaited loop's message count, as they publish one awaited message at a time:

- ``faststream pub/sub``: FastStream's ``RedisBroker`` as its users write it, without the app
  runner: one broker publishes (``await broker.publish(payload, channel=...)``, one by one),
  another has a ``@broker.subscriber(channel)`` handler taking the decoded ``dict`` and counts;
  ``async with broker:`` + ``await broker.start()``. Both brokers get ``logger=None``: by default
  FastStream logs two INFO lines per message, which no other case does. Its body is the payload
  inside FastStream's own binary frame with headers (correlation id, content type).
- ``broadcaster pub/sub``: ``Broadcast("redis://...")``, ``await broadcast.publish(channel,
  body)`` one by one (the same bytes as redis-py's) and ``async with broadcast.subscribe(channel)``
  on another ``Broadcast``, decoding each event's message. broadcaster 0.3.1 with redis-py 8.1
  delivers nothing to the first subscription of a ``Broadcast``: its listener task starts
  ``PubSub.listen()`` before redis-py has recorded the SUBSCRIBE, so ``listen()`` returns at once
  and the task waits for the next ``subscribe``. The run checks that first (and prints what it
  found); while that holds the case subscribes a second, unused channel right after the first,
  which restarts the listener.

Latency: P ping-pongs of one message per round and side, alternating ping by ping (so that load
from other jobs hits both sides alike), publish -> subscriber callback; p50/p99 in
microseconds, bare redis-py (``publish`` + ``PubSub.listen``) against cascade-bus (``publish``
+ handler); "added p50" is the per-round difference.

A target line says PASS only if every round met it.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib
import importlib.metadata
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import redis
import redis.asyncio as aredis

import cascade_bus
from cascade_bus import Envelope

#: Options of every bus in the run: its own key ``prefix`` (set in `main`), so that the stream
#: routes the publish script reads are only the ones this run registers (``--routes``).
BUS_OPTIONS: dict[str, Any] = {}

#: Commands whose server time the table breaks down (INFO commandstats names).
SERVER_COMMANDS = ("evalsha", "publish", "xadd", "xreadgroup", "xack")


def payload(i: int) -> dict[str, Any]:
    return {"sensor": "t1", "value": 21.5, "seq": i, "pad": "x" * 48}


@dataclass
class Run:
    """What one case measured in one round."""

    n: int
    wall: float  # first publish -> subscriber had all n
    publish_wall: float  # first publish -> publisher loop done
    cpu: float  # process CPU seconds over `wall`


@dataclass
class Server:
    """Redis's own accounting, read before and after a case."""

    cpu: float
    stats: dict[str, tuple[int, int]]  # command -> (calls, usec)


@dataclass
class Sample:
    """One case in one round, client and server side."""

    run: Run
    server_cpu: float
    server_usec: dict[str, tuple[int, int]] = field(default_factory=dict)


Case = Callable[[str, int], Awaitable[Run]]


async def _await_done(done: asyncio.Event, timeout: float = 120.0) -> None:
    async with asyncio.timeout(timeout):
        await done.wait()


class _Clock:
    """Wall and process-CPU time from the first publish."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.c0 = time.process_time()
        self.t_pub = 0.0

    def published(self) -> None:
        self.t_pub = time.perf_counter() - self.t0

    def done(self, n: int) -> Run:
        return Run(n, time.perf_counter() - self.t0, self.t_pub, time.process_time() - self.c0)


# -- throughput cases ---------------------------------------------------------------------------


async def raw_case(url: str, n: int, *, batch: int) -> Run:
    channel = f"bench/{uuid.uuid4().hex}"
    sub_client = aredis.Redis.from_url(url, protocol=2)
    pubsub = sub_client.pubsub()
    await pubsub.subscribe(channel)
    done = asyncio.Event()
    got = 0

    async def listen() -> None:
        nonlocal got
        async for message in pubsub.listen():
            if message["type"] == "message":
                msgspec.json.decode(message["data"])
                got += 1
                if got == n:
                    done.set()
                    return

    task = asyncio.create_task(listen())
    client = aredis.Redis.from_url(url, protocol=2)
    await client.ping()
    encode = msgspec.json.encode
    clock = _Clock()
    if batch <= 1:
        for i in range(n):
            await client.publish(channel, encode(payload(i)))
    else:
        for start in range(0, n, batch):
            pipe = client.pipeline(transaction=False)
            for i in range(start, min(n, start + batch)):
                pipe.publish(channel, encode(payload(i)))
            await pipe.execute()
    clock.published()
    await _await_done(done)
    run = clock.done(n)
    await task
    assert got == n, (got, n)
    await pubsub.aclose()  # type: ignore[no-untyped-call]
    await sub_client.aclose()
    await client.aclose()
    return run


async def raw_awaited(url: str, n: int) -> Run:
    return await raw_case(url, n, batch=1)


async def raw_pipelined(url: str, n: int) -> Run:
    return await raw_case(url, n, batch=1000)


async def bus_case(url: str, n: int, *, qos: int = 0, fmt: str = "json") -> Run:
    topic = f"bench/{uuid.uuid4().hex}"
    done = asyncio.Event()
    got = 0

    def handler(env: Envelope[Any]) -> None:
        nonlocal got
        got += 1
        if got == n:
            done.set()

    async with (
        cascade_bus.connect(url, format=fmt, **BUS_OPTIONS) as subscriber,
        cascade_bus.connect(url, format=fmt, **BUS_OPTIONS) as publisher,
    ):
        await subscriber.subscribe(topic, handler, qos=qos)
        clock = _Clock()
        if qos == 0:
            for i in range(n):
                await publisher.publish(topic, payload(i))
        else:
            for start in range(0, n, 1000):
                await asyncio.gather(
                    *(
                        publisher.publish(topic, payload(i), qos=1)
                        for i in range(start, min(n, start + 1000))
                    )
                )
        clock.published()
        await _await_done(done)
        run = clock.done(n)
        dropped = sum(publisher.stats().dropped.values())
    assert got == n, (got, n)
    assert not dropped, dropped
    return run


async def bus_awaited(url: str, n: int) -> Run:
    return await bus_case(url, n)


async def bus_awaited_raw(url: str, n: int) -> Run:
    return await bus_case(url, n, fmt="raw")


async def bus_qos1(url: str, n: int) -> Run:
    return await bus_case(url, n, qos=1)


async def raw_streams(url: str, n: int) -> Run:
    key = f"bench:{uuid.uuid4().hex}"
    producer = aredis.Redis.from_url(url, protocol=2)
    consumer = aredis.Redis.from_url(url, protocol=2)
    await consumer.xgroup_create(key, "g", id="0", mkstream=True)
    done = asyncio.Event()
    got = 0

    async def consume() -> None:
        nonlocal got
        while got < n:
            reply: Any = await consumer.xreadgroup("g", "c", {key: ">"}, count=500, block=5000)
            if not reply:
                continue
            entries = reply[0][1]
            for _, fields in entries:
                msgspec.json.decode(fields[b"d"])
            got += len(entries)
            await consumer.xack(key, "g", *(entry_id for entry_id, _ in entries))
        done.set()

    task = asyncio.create_task(consume())
    await producer.ping()
    encode = msgspec.json.encode
    clock = _Clock()
    for start in range(0, n, 1000):
        pipe = producer.pipeline(transaction=False)
        for i in range(start, min(n, start + 1000)):
            pipe.xadd(key, {"t": "bench", "d": encode(payload(i))})
        await pipe.execute()
    clock.published()
    await _await_done(done)
    run = clock.done(n)
    await task
    assert got == n, (got, n)
    await producer.delete(key)
    await producer.aclose()
    await consumer.aclose()
    return run


# -- other libraries (optional) -----------------------------------------------------------------

#: Why an optional library has no row (name -> reason), filled by `check_libraries`.
ABSENT: dict[str, str] = {}

#: broadcaster: True while its first subscription needs a second one to start delivering.
BROADCASTER_RESTART = {"needed": False}


def check_libraries() -> dict[str, str]:
    """Import each optional library; name -> version for those that import."""
    found: dict[str, str] = {}
    for name, module, requirement in (
        ("faststream", "faststream.redis", "faststream[redis]"),
        ("broadcaster", "broadcaster", "broadcaster"),
    ):
        try:
            importlib.import_module(module)
        except Exception as exc:  # ImportError, or a broken install
            ABSENT[name] = (
                f"not importable ({type(exc).__name__}: {exc}; pip install '{requirement}')"
            )
            continue
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "?"
    return found


async def faststream_case(url: str, n: int) -> Run:
    from faststream.redis import RedisBroker

    channel = f"bench/{uuid.uuid4().hex}"
    done = asyncio.Event()
    got = 0
    # logger=None (FastStream's way to turn its per-message INFO lines off) is typed LoggerProto.
    consumer = RedisBroker(url, logger=None)  # type: ignore[arg-type]
    producer = RedisBroker(url, logger=None)  # type: ignore[arg-type]

    @consumer.subscriber(channel)
    async def handle(msg: dict[str, Any]) -> None:
        nonlocal got
        got += 1
        if got == n:
            done.set()

    async with consumer, producer:
        await consumer.start()
        clock = _Clock()
        for i in range(n):
            await producer.publish(payload(i), channel=channel)
        clock.published()
        await _await_done(done)
        run = clock.done(n)
    assert got == n, (got, n)
    return run


async def broadcaster_case(url: str, n: int) -> Run:
    from broadcaster import Broadcast

    channel = f"bench/{uuid.uuid4().hex}"
    done = asyncio.Event()
    got = 0
    async with (
        Broadcast(url) as consumer,
        Broadcast(url) as producer,
        consumer.subscribe(channel) as subscriber,
    ):
        if BROADCASTER_RESTART["needed"]:
            async with consumer.subscribe(f"{channel}/restart"):
                pass

        async def listen() -> None:
            nonlocal got
            while True:  # ``async for event in subscriber`` is typed as not iterable
                event = await subscriber.get()
                msgspec.json.decode(event.message)
                got += 1
                if got == n:
                    done.set()
                    return

        task = asyncio.create_task(listen())
        encode = msgspec.json.encode
        clock = _Clock()
        for i in range(n):
            await producer.publish(channel, encode(payload(i)))
        clock.published()
        await _await_done(done)
        run = clock.done(n)
        await task
    assert got == n, (got, n)
    return run


async def broadcaster_first_subscription(url: str) -> str | None:
    """Publish once to a `Broadcast`'s first subscription; why nothing arrived, or None."""
    from broadcaster import Broadcast

    channel = f"bench/{uuid.uuid4().hex}"
    async with (
        Broadcast(url) as consumer,
        Broadcast(url) as producer,
        consumer.subscribe(channel) as subscriber,
    ):
        await producer.publish(channel, b"{}")
        try:
            async with asyncio.timeout(2):
                await subscriber.get()
        except TimeoutError:
            return (
                "its first subscription got nothing in 2 s (listener task waiting for the "
                "next subscribe)"
            )
    return None


# -- what each case puts on the wire ----------------------------------------------------------


async def body_sizes(url: str) -> dict[str, int]:
    """The body length one publish of ``payload(0)`` puts on the channel, per format."""
    sizes = {"redis-py": len(msgspec.json.encode(payload(0)))}
    for fmt in ("json", "raw"):
        topic = f"bench/{uuid.uuid4().hex}"
        client = aredis.Redis.from_url(url, protocol=2)
        pubsub = client.pubsub()
        await pubsub.subscribe(topic)
        async with cascade_bus.connect(url, format=fmt, **BUS_OPTIONS) as bus:
            await bus.publish(topic, payload(0))
            async with asyncio.timeout(10):
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None and message["type"] == "message":
                        sizes[fmt] = len(message["data"])
                        break
        await pubsub.aclose()  # type: ignore[no-untyped-call]
        await client.aclose()
    if "faststream" not in ABSENT:
        sizes["faststream"] = await faststream_body_size(url)
    return sizes


async def faststream_body_size(url: str) -> int:
    """The body length FastStream's ``publish(payload(0))`` puts on the channel."""
    from faststream.redis import RedisBroker

    channel = f"bench/{uuid.uuid4().hex}"
    client = aredis.Redis.from_url(url, protocol=2)
    pubsub = client.pubsub()
    await pubsub.subscribe(channel)
    async with RedisBroker(url, logger=None) as broker:  # type: ignore[arg-type]
        await broker.publish(payload(0), channel=channel)
    size = 0
    async with asyncio.timeout(10):
        while not size:
            message = await pubsub.get_message(timeout=1.0)
            if message is not None and message["type"] == "message":
                size = len(message["data"])
    await pubsub.aclose()  # type: ignore[no-untyped-call]
    await client.aclose()
    return size


# -- server accounting ----------------------------------------------------------------------------


async def add_routes(control: aredis.Redis, prefix: str, count: int) -> None:
    """Lease ``count`` stream routes no bench topic matches (half exact, half wildcard), as
    QoS 1 and queue subscriptions of other applications in the same ``prefix`` would be."""
    expiry = int(time.time() * 1000) + 3_600_000
    for i in range(count):
        pattern = f"other/{i:04d}/events" if i % 2 else f"other/{i:04d}/+/jobs"
        await control.hset(f"{prefix}routes", f"{prefix}q:w/{pattern}", f"{expiry} {pattern}")


async def remove_keys(control: aredis.Redis, prefix: str) -> None:
    async for key in control.scan_iter(match=f"{prefix}*", count=1000):
        await control.delete(key)


async def server_state(control: aredis.Redis) -> Server:
    cpu: Any = await control.info("cpu")
    stats: Any = await control.info("commandstats")
    out: dict[str, tuple[int, int]] = {}
    for key, value in stats.items():
        name = key.removeprefix("cmdstat_")
        if name in SERVER_COMMANDS:
            out[name] = (int(value["calls"]), int(value["usec"]))
    return Server(float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]), out)


async def measure(control: aredis.Redis, case: Case, url: str, n: int) -> Sample:
    gc.collect()
    before = await server_state(control)
    run = await case(url, n)
    after = await server_state(control)
    usec = {}
    for name, (calls, spent) in after.stats.items():
        calls0, spent0 = before.stats.get(name, (0, 0))
        if calls - calls0 > 0:
            usec[name] = (calls - calls0, spent - spent0)
    return Sample(run, after.cpu - before.cpu, usec)


# -- latency ------------------------------------------------------------------------------------


async def latency(url: str, pings: int) -> tuple[list[float], list[float]]:
    """``pings`` ping-pongs each through bare redis-py and through the bus, alternating one by
    one (so that load from other jobs hits both sides alike); microseconds."""
    channel = f"bench/{uuid.uuid4().hex}"
    client = aredis.Redis.from_url(url, protocol=2)
    sub_client = aredis.Redis.from_url(url, protocol=2)
    pubsub = sub_client.pubsub()
    await pubsub.subscribe(channel)
    arrived: asyncio.Future[float] | None = None

    def land() -> None:
        if arrived is not None and not arrived.done():
            arrived.set_result(time.perf_counter())

    async def listen() -> None:
        async for message in pubsub.listen():
            if message["type"] == "message":
                msgspec.json.decode(message["data"])
                land()

    def handler(env: Envelope[Any]) -> None:
        land()

    task = asyncio.create_task(listen())
    raw: list[float] = []
    bus: list[float] = []
    encode = msgspec.json.encode
    loop = asyncio.get_running_loop()
    topic = f"bench/{uuid.uuid4().hex}"
    async with (
        cascade_bus.connect(url, **BUS_OPTIONS) as subscriber,
        cascade_bus.connect(url, **BUS_OPTIONS) as publisher,
    ):
        await subscriber.subscribe(topic, handler)
        for i in range(pings + 50):
            for side in (raw, bus) if i % 2 else (bus, raw):
                arrived = loop.create_future()
                t0 = time.perf_counter()
                if side is raw:
                    await client.publish(channel, encode(payload(i)))
                else:
                    await publisher.publish(topic, payload(i))
                async with asyncio.timeout(10):
                    t1 = await arrived
                if i >= 50:
                    side.append((t1 - t0) * 1e6)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await pubsub.aclose()  # type: ignore[no-untyped-call]
    await sub_client.aclose()
    await client.aclose()
    return raw, bus


# -- report ---------------------------------------------------------------------------------------


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def spread(values: list[float], fmt: Callable[[float], str]) -> str:
    """``median (min-max)``."""
    return f"{fmt(statistics.median(values))} ({fmt(min(values))}-{fmt(max(values))})"


def k(rate: float) -> str:
    return f"{rate / 1000:.1f}k"


def us(seconds: float) -> str:
    return f"{seconds * 1e6:.1f}"


def x(ratio: float) -> str:
    return f"{ratio:.2f}"


AWAITED = "redis-py awaited PUBLISH"
PIPELINED = "redis-py pipelined PUBLISH"
BUS_JSON = "cascade-bus awaited publish (json)"
BUS_RAW = "cascade-bus awaited publish (raw)"
FASTSTREAM = "faststream pub/sub"
BROADCASTER = "broadcaster pub/sub"
CASES: dict[str, tuple[Case, str]] = {
    AWAITED: (raw_awaited, "redis-py"),
    PIPELINED: (raw_pipelined, "redis-py"),
    BUS_JSON: (bus_awaited, "json"),
    BUS_RAW: (bus_awaited_raw, "raw"),
    "redis-py streams XADD+XREADGROUP": (raw_streams, "redis-py"),
    "cascade-bus QoS 1 (streams)": (bus_qos1, "json"),
    FASTSTREAM: (faststream_case, "faststream"),
    BROADCASTER: (broadcaster_case, "redis-py"),
}
SHORT = {
    AWAITED: "awaited",
    PIPELINED: "pipelined",
    BUS_JSON: "bus-json",
    BUS_RAW: "bus-raw",
    "redis-py streams XADD+XREADGROUP": "streams",
    "cascade-bus QoS 1 (streams)": "bus-qos1",
    FASTSTREAM: "faststream",
    BROADCASTER: "broadcaster",
}
#: Cases of other libraries: optional (name in `ABSENT` -> no row), the awaited loop's count.
LIBRARIES = {FASTSTREAM: "faststream", BROADCASTER: "broadcaster"}


async def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--url", default="redis://127.0.0.1:6379")
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--pings", type=int, default=1_000)
    parser.add_argument(
        "--routes",
        type=int,
        default=0,
        help="stream routes of other subscriptions in the bus's prefix (none match)",
    )
    parser.add_argument(
        "--cases",
        default=",".join(SHORT.values()),
        help=f"comma-separated subset of: {', '.join(SHORT.values())} (empty: latency only)",
    )
    args = parser.parse_args()
    n, url = args.messages, args.url
    wanted = set(args.cases.split(","))
    versions = check_libraries()
    names = [
        name for name in CASES if SHORT[name] in wanted and LIBRARIES.get(name, "") not in ABSENT
    ]
    slow_n = max(1000, n // 4)  # the round-trip-bound loops get fewer messages
    counts = {name: slow_n if name == AWAITED or name in LIBRARIES else n for name in names}

    control = aredis.Redis.from_url(url, protocol=2)
    prefix = f"bench{uuid.uuid4().hex[:12]}:"
    BUS_OPTIONS["prefix"] = prefix
    await add_routes(control, prefix, args.routes)
    try:
        await run(args, control, names, counts, slow_n, versions)
    finally:
        await remove_keys(control, prefix)
        await control.aclose()


async def run(
    args: argparse.Namespace,
    control: aredis.Redis,
    names: list[str],
    counts: dict[str, int],
    slow_n: int,
    versions: dict[str, str],
) -> None:
    n, url, rounds = args.messages, args.url, args.rounds
    notes = []
    if BROADCASTER in names:
        why = await broadcaster_first_subscription(url)
        BROADCASTER_RESTART["needed"] = why is not None
        if why:
            notes.append(
                f"broadcaster {versions['broadcaster']}: {why}; its row subscribes a second "
                "channel right after the first, which restarts the listener"
            )
        else:
            notes.append(f"broadcaster {versions['broadcaster']}: first subscription delivers")
    sizes = await body_sizes(url)
    for name in names:  # warm-up: imports, script load, connection set-up
        await CASES[name][0](url, max(200, counts[name] // 10))
    samples: dict[str, list[Sample]] = {name: [] for name in names}
    raw_lat: list[list[float]] = []
    bus_lat: list[list[float]] = []
    for r in range(rounds):
        shift = r % max(1, len(names))
        order = names[shift:] + names[:shift]
        for name in order:
            samples[name].append(await measure(control, CASES[name][0], url, counts[name]))
        if args.pings:
            a, b = await latency(url, args.pings)
            raw_lat.append(a)
            bus_lat.append(b)

    import cascade_bus_redis

    print(f"\nRedis {url}; adapter from {cascade_bus_redis.__file__}")
    print(f"bus key prefix {BUS_OPTIONS['prefix']!r} with {args.routes} other stream route(s)")
    slow = ", ".join(SHORT[name] for name in names if counts[name] != n) or "none"
    print(
        f"{n:,} messages per case (the awaited loops, here {slow}: {slow_n:,}), "
        f"{rounds} rounds interleaved; median (min-max) over the rounds"
    )
    others = [f"{lib} {versions[lib]}" for lib in LIBRARIES.values() if lib in versions]
    if others:
        print(f"other libraries: {', '.join(others)} (redis-py {redis.__version__})")
    for note in notes:
        print(note)
    print("end-to-end = first publish until the subscriber had all; CPU per message\n")
    width = max((len(name) for name in names), default=40) + 1
    head = (
        f"{'case':<{width}}|{'body B':>7} | {'end-to-end msg/s':>22} | {'publish loop msg/s':>22}"
        f" | {'client CPU us/msg':>20} | {'server CPU us/msg':>20}"
    )
    print(head)
    print("-" * len(head))
    for name in names:
        runs = samples[name]
        print(
            f"{name:<{width}}|{sizes[CASES[name][1]]:>7} | "
            f"{spread([s.run.n / s.run.wall for s in runs], k):>22} | "
            f"{spread([s.run.n / s.run.publish_wall for s in runs], k):>22} | "
            f"{spread([s.run.cpu / s.run.n for s in runs], us):>20} | "
            f"{spread([s.server_cpu / s.run.n for s in runs], us):>20}"
        )
    for name, lib in LIBRARIES.items():
        if lib in ABSENT and SHORT[name] in args.cases.split(","):
            print(f"{name:<{width}}| absent: {lib} {ABSENT[lib]}")

    print("\nserver command time per message (INFO commandstats; usec_per_call in brackets):")
    for name in names:
        parts = []
        for cmd in SERVER_COMMANDS:
            calls = [s.server_usec.get(cmd, (0, 0)) for s in samples[name]]
            total_calls = sum(c for c, _ in calls)
            if not total_calls:
                continue
            per_msg = statistics.median(
                u / s.run.n for (_, u), s in zip(calls, samples[name], strict=True)
            )
            per_call = sum(u for _, u in calls) / total_calls
            calls_per_msg = total_calls / sum(s.run.n for s in samples[name])
            parts.append(f"{cmd} {per_msg:.2f} ({per_call:.2f} x {calls_per_msg:.3g}/msg)")
        print(f"  {name:<{width}} {'; '.join(parts)}")

    def ratios(case: str, base: str, metric: Callable[[Sample], float]) -> list[float]:
        return [metric(a) / metric(b) for a, b in zip(samples[case], samples[base], strict=True)]

    def rate(s: Sample) -> float:
        return s.run.n / s.run.wall

    def cpu(s: Sample) -> float:
        return s.run.cpu / s.run.n

    print("\nper-round ratios, median (min-max):")
    checks: list[tuple[str, bool]] = []
    for bus in (BUS_JSON, BUS_RAW):
        if bus not in samples:
            continue
        if PIPELINED in samples:
            rr = ratios(bus, PIPELINED, rate)
            cr = ratios(bus, PIPELINED, cpu)
            print(
                f"  {bus} / pipelined redis-py: rate {spread(rr, x)}x, "
                f"client CPU per message {spread(cr, x)}x"
            )
            checks.append((f">= 0.9x pipelined redis-py ({bus}): {spread(rr, x)}x", min(rr) >= 0.9))
        if AWAITED in samples:
            ar = ratios(bus, AWAITED, rate)
            print(f"  {bus} / awaited redis-py: rate {spread(ar, x)}x")
            checks.append((f">= 4x the awaited loop ({bus}): {spread(ar, x)}x", min(ar) >= 4))
    for lib in LIBRARIES:
        if lib not in samples:
            continue
        if PIPELINED in samples:
            rr = ratios(lib, PIPELINED, rate)
            cr = ratios(lib, PIPELINED, cpu)
            print(
                f"  {lib} / pipelined redis-py: rate {spread(rr, x)}x, "
                f"client CPU per message {spread(cr, x)}x"
            )
        if AWAITED in samples:
            ar = ratios(lib, AWAITED, rate)
            cr = ratios(lib, AWAITED, cpu)
            print(
                f"  {lib} / awaited redis-py: rate {spread(ar, x)}x, "
                f"client CPU per message {spread(cr, x)}x"
            )
        for bus in (BUS_JSON, BUS_RAW):
            if bus in samples:
                br = ratios(bus, lib, rate)
                print(f"  {bus} / {lib}: rate {spread(br, x)}x")
    if raw_lat:
        print("\nlatency (publish -> handler), microseconds, median (min-max) over the rounds:")
        for label, runs_lat in (
            ("redis-py publish + PubSub.listen", raw_lat),
            ("cascade-bus publish + handler", bus_lat),
        ):
            p50 = spread([pct(s, 0.5) for s in runs_lat], "{:.0f}".format)
            p99 = spread([pct(s, 0.99) for s in runs_lat], "{:.0f}".format)
            print(f"  {label:<33} p50 {p50}  p99 {p99}")
        added = [pct(b, 0.5) - pct(a, 0.5) for a, b in zip(raw_lat, bus_lat, strict=True)]
        print(f"  added p50: {spread(added, '{:+.0f}'.format)} us")
        checks.append(
            (f"<= 30 us added p50: {spread(added, '{:+.0f}'.format)} us", max(added) <= 30)
        )
    print("\ntargets (PASS only if every round met it):")
    for text, ok in checks:
        print(f"  {'PASS' if ok else 'FAIL'}  {text}")


if __name__ == "__main__":
    asyncio.run(main())
