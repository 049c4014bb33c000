"""Flow control, concurrency, retries, dead letters, middleware and the loss ledger.

Every count is exact: a message either reached a handler (``delivered``), went to a dead-letter
topic (``dead_lettered``), or is counted in ``stats().dropped`` under its reason. Waits are
event-driven and bounded (no sleeping for time to pass); the MQTT cases use private brokers
that the test stops itself.
"""

from __future__ import annotations

import asyncio
import collections
import tracemalloc
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
import pytest

import cascade_bus
from cascade_bus import (
    Bus,
    ConnectionLost,
    DecodeError,
    DropReason,
    Envelope,
    Middleware,
    Next,
    PayloadTooLarge,
)

WAIT = 5.0  # bound for anything that should happen promptly
# Loop iterations that let every runnable task take a few steps (memory:// is synchronous).
SETTLE = 20


def mem() -> str:
    """A private in-process broker for one test."""
    return f"memory://flow-{uuid.uuid4().hex}"


def new_topic(name: str = "t") -> str:
    return f"flow/{uuid.uuid4().hex[:12]}/{name}"


async def settle() -> None:
    """Let the other tasks run until they block (memory:// never waits on I/O)."""
    for _ in range(SETTLE):
        await asyncio.sleep(0)


async def until(condition: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    """Wait (bounded) until ``condition()`` holds, yielding to the loop in between."""
    try:
        async with asyncio.timeout(timeout):
            # Counters and exporters have no event to wait on: poll them, bounded.
            while not condition():  # noqa: ASYNC110
                await asyncio.sleep(0.001)
    except TimeoutError:
        raise AssertionError(f"waited {timeout}s for {what}") from None


class Gate:
    """A handler that records payloads, can be held closed, and tells when it holds one."""

    def __init__(self, *, closed: bool = True) -> None:
        self.open = asyncio.Event()
        if not closed:
            self.open.set()
        self.holding = asyncio.Event()
        self.payloads: list[Any] = []

    async def __call__(self, env: Envelope[Any]) -> None:
        self.holding.set()
        await self.open.wait()
        self.payloads.append(env.payload)


class Errors:
    """An ``on_error`` hook that keeps what it was given."""

    def __init__(self) -> None:
        self.seen: list[tuple[Exception, str]] = []

    def __call__(self, error: Exception, topic: str, env: Envelope[Any] | None) -> None:
        self.seen.append((error, topic))

    @property
    def types(self) -> list[str]:
        return [type(error).__name__ for error, _ in self.seen]


@pytest.fixture
async def bus() -> AsyncIterator[Bus]:
    async with cascade_bus.connect(mem()) as opened:
        yield opened


def ledger_balances(stats: cascade_bus.Stats, published: int) -> bool:
    """Every published message is accounted for exactly once."""
    return stats.delivered + stats.dead_lettered + stats.dropped_total == published


# -- overflow policies -------------------------------------------------------------------------


async def test_block_holds_the_publisher_back_and_drops_nothing(bus: Bus) -> None:
    gate = Gate()
    t = new_topic()
    sub = await bus.subscribe(t, gate, buffer_size=4, overflow="block")

    async def produce() -> None:
        for i in range(20):
            await bus.publish(t, i)

    producer = asyncio.create_task(produce())
    await settle()
    # The handler holds message 0; the queue filled up to buffer_size and the publisher waits.
    assert gate.holding.is_set()
    assert not producer.done()
    assert sub.pending <= 4
    assert bus.stats().published <= 4
    assert bus.stats().dropped == {}

    gate.open.set()
    async with asyncio.timeout(WAIT):
        await producer
    await until(lambda: len(gate.payloads) == 20, "all 20 handled")
    assert gate.payloads == list(range(20))
    stats = bus.stats()
    assert (stats.published, stats.delivered, stats.dropped) == (20, 20, {})


async def test_block_drops_nothing_with_concurrent_publishers(bus: Bus) -> None:
    gate = Gate()
    t = new_topic()
    await bus.subscribe(t, gate, buffer_size=4, overflow="block")

    async def produce(p: int) -> None:
        for i in range(10):
            await bus.publish(t, [p, i])

    producers = [asyncio.create_task(produce(p)) for p in range(3)]
    await settle()
    gate.open.set()
    async with asyncio.timeout(WAIT):
        await asyncio.gather(*producers)
    await until(lambda: ledger_balances(bus.stats(), 30), "every message accounted for")
    assert bus.stats().dropped == {}
    assert len(gate.payloads) == 30


@pytest.mark.parametrize(
    ("overflow", "survivors"),
    [("drop_oldest", [6, 7, 8, 9]), ("drop_newest", [0, 1, 2, 3])],
)
@pytest.mark.parametrize("mode", ["handler", "iterator"])
async def test_drop_policies_keep_the_right_messages_and_count_the_rest(
    bus: Bus, overflow: Any, survivors: list[int], mode: str
) -> None:
    t = new_topic()
    if mode == "handler":
        gate = Gate()
        sub = await bus.subscribe(t, gate, buffer_size=4, overflow=overflow)
        await bus.publish(t, "first")
        async with asyncio.timeout(WAIT):
            await gate.holding.wait()  # the handler holds "first": the queue is empty
        published = 1
    else:
        sub = await bus.subscribe(t, buffer_size=4, overflow=overflow)
        published = 0

    async with asyncio.timeout(WAIT):  # never held back: these complete without the consumer
        for i in range(10):
            await bus.publish(t, i)
    published += 10
    assert sub.pending == 4
    assert bus.stats().dropped == {"overflow": 6}

    if mode == "handler":
        gate.open.set()
        await until(lambda: len(gate.payloads) == 5, "the survivors handled")
        assert gate.payloads == ["first", *survivors]
    else:
        got = [(await sub.get(timeout=WAIT)).payload for _ in range(4)]
        assert got == survivors
    stats = bus.stats()
    assert stats.dropped == {"overflow": 6}
    assert stats.delivered == published - 6
    assert ledger_balances(stats, published)


async def test_bad_policy_values_are_refused(bus: Bus) -> None:
    t = new_topic()
    with pytest.raises(ValueError, match="overflow="):
        bus.subscribe(t, print, overflow="drop_all")  # type: ignore[call-overload]
    with pytest.raises(ValueError, match="max_concurrency"):
        bus.subscribe(t, print, max_concurrency=0)
    with pytest.raises(ValueError, match="need a handler"):
        bus.subscribe(t, dead_letter="dlq")


# -- concurrency -------------------------------------------------------------------------------


@pytest.mark.parametrize("limit", [2, 3, 5])
async def test_max_concurrency_runs_exactly_that_many_handlers_at_once(
    bus: Bus, limit: int
) -> None:
    active = peak = 0
    full = asyncio.Event()
    release = asyncio.Event()
    handled: list[int] = []

    async def handler(env: Envelope[Any]) -> None:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        if active == limit:
            full.set()
        await release.wait()
        active -= 1
        handled.append(env.payload)

    t = new_topic()
    await bus.subscribe(t, handler, max_concurrency=limit)
    for i in range(12):
        await bus.publish(t, i)
    async with asyncio.timeout(WAIT):
        await full.wait()
    await settle()
    assert (active, peak) == (limit, limit)  # and no more start while they are all busy
    release.set()
    await until(lambda: len(handled) == 12, "12 handled")
    assert peak == limit
    assert sorted(handled) == list(range(12))
    assert bus.stats().delivered == 12


async def test_max_concurrency_one_keeps_fifo_order(bus: Bus) -> None:
    active = peak = 0
    handled: list[int] = []

    async def handler(env: Envelope[Any]) -> None:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        for _ in range(env.payload % 4):  # uneven work: later ones would overtake if parallel
            await asyncio.sleep(0)
        handled.append(env.payload)
        active -= 1

    t = new_topic()
    await bus.subscribe(t, handler, max_concurrency=1)
    for i in range(50):
        await bus.publish(t, i)
    await until(lambda: len(handled) == 50, "50 handled")
    assert handled == list(range(50))
    assert peak == 1


# -- retries and dead letters --------------------------------------------------------------------


async def test_retries_then_success_is_delivered_not_dropped() -> None:
    errors = Errors()
    attempts: list[Any] = []
    handled: list[Any] = []

    async def flaky(env: Envelope[Any]) -> None:
        attempts.append(env.payload)
        if env.payload == "a" and attempts.count("a") < 3:
            raise RuntimeError("not yet")
        handled.append(env.payload)

    async with cascade_bus.connect(mem(), on_error=errors) as bus:
        t = new_topic()
        await bus.subscribe(t, flaky, retries=2, retry_delay=0)
        await bus.publish(t, "a")
        await bus.publish(t, "b")
        await until(lambda: len(handled) == 2, "both handled")
        assert attempts == ["a", "a", "a", "b"]  # "b" waits for "a"'s retries (FIFO)
        assert handled == ["a", "b"]
        stats = bus.stats()
    assert (stats.delivered, stats.dropped, stats.dead_lettered) == (2, {}, 0)
    assert errors.seen == []  # a retry that succeeds is not an error


async def test_exhausted_retries_go_to_the_dead_letter_topic_with_the_error() -> None:
    errors = Errors()
    calls: list[str] = []

    async def failing(env: Envelope[Any]) -> None:
        calls.append(env.id)
        raise ValueError(f"cannot handle order {env.payload['order']}")

    async with cascade_bus.connect(mem(), on_error=errors) as bus:
        t, dlq = new_topic("orders"), new_topic("dead")
        dead = await bus.subscribe(dlq)
        await bus.subscribe(t, failing, retries=2, retry_delay=0, dead_letter=dlq)
        await bus.publish(t, {"order": 7}, headers={"tenant": "acme"}, type="com.example.order")
        env = await dead.get(timeout=WAIT)
        stats = bus.stats()

    assert env.topic == dlq
    assert env.payload == {"order": 7}
    assert env.type == "com.example.order"
    assert env.headers["tenant"] == "acme"  # the original headers travel along
    assert env.headers["x-death-topic"] == t
    assert env.headers["x-death-id"] == calls[0]
    assert env.headers["x-death-error-type"] == "ValueError"
    assert env.headers["x-death-error"] == "cannot handle order 7"
    assert env.headers["x-death-attempts"] == "3"
    assert len(calls) == 3
    assert len(set(calls)) == 1
    assert stats.dead_lettered == 1
    assert DropReason.HANDLER_ERROR not in stats.dropped
    assert stats.dropped == {}
    assert stats.published == 2  # the order and its dead letter
    assert stats.delivered == 1  # the dead letter, to its iterator
    assert errors.types == ["ValueError"]  # reported once, not per attempt


async def test_exhausted_retries_without_dead_letter_count_handler_error() -> None:
    errors = Errors()
    calls = 0

    def failing(env: Envelope[Any]) -> None:  # a plain function handler
        nonlocal calls
        calls += 1
        raise KeyError("missing")

    async with cascade_bus.connect(mem(), on_error=errors) as bus:
        t = new_topic()
        await bus.subscribe(t, failing, retries=3, retry_delay=0)
        await bus.publish(t, 1)
        await until(lambda: bus.stats().dropped_total == 1, "the failure counted")
        stats = bus.stats()
    assert calls == 4
    assert stats.dropped == {"handler_error": 1}
    assert (stats.delivered, stats.dead_lettered) == (0, 0)
    assert errors.types == ["KeyError"]


async def test_a_dead_letter_that_cannot_be_published_counts_as_handler_error() -> None:
    errors = Errors()

    class RefuseDeadLetters(Middleware):
        async def publish(self, env: Envelope[Any], call_next: Next) -> None:
            if "x-death-id" in env.headers:
                raise PermissionError("no dead letters here")
            await call_next(env)

    async def failing(env: Envelope[Any]) -> None:
        raise RuntimeError("boom")

    async with cascade_bus.connect(mem(), on_error=errors, middleware=[RefuseDeadLetters()]) as bus:
        t = new_topic()
        await bus.subscribe(t, failing, dead_letter=new_topic("dead"))
        await bus.publish(t, 1)
        await until(lambda: bus.stats().dropped_total == 1, "the failure counted")
        stats = bus.stats()
    assert stats.dropped == {"handler_error": 1}
    assert stats.dead_lettered == 0
    assert errors.types == ["PermissionError", "RuntimeError"]


# -- middleware --------------------------------------------------------------------------------


class Tag(Middleware):
    """Logs entry and exit of both hooks under a name."""

    def __init__(self, name: str, log: list[str]) -> None:
        self.name = name
        self.log = log

    async def publish(self, env: Envelope[Any], call_next: Next) -> None:
        self.log.append(f"{self.name}>publish")
        await call_next(env)
        self.log.append(f"{self.name}<publish")

    async def handle(self, env: Envelope[Any], call_next: Next) -> None:
        self.log.append(f"{self.name}>handle")
        await call_next(env)
        self.log.append(f"{self.name}<handle")


async def test_middleware_order_bus_outside_subscription_inside() -> None:
    log: list[str] = []
    done = asyncio.Event()

    async def handler(env: Envelope[Any]) -> None:
        log.append("handler")
        done.set()

    async with cascade_bus.connect(mem(), middleware=[Tag("A", log), Tag("B", log)]) as bus:
        t = new_topic()
        await bus.subscribe(t, handler, middleware=[Tag("C", log), Tag("D", log)])
        await bus.publish(t, 1)
        publish_log = list(log)
        log.clear()
        async with asyncio.timeout(WAIT):
            await done.wait()
        await settle()
    assert publish_log == ["A>publish", "B>publish", "B<publish", "A<publish"]
    assert log == [
        "A>handle",
        "B>handle",
        "C>handle",
        "D>handle",
        "handler",
        "D<handle",
        "C<handle",
        "B<handle",
        "A<handle",
    ]


async def test_handle_middleware_that_raises_is_a_handler_error_and_the_subscription_goes_on() -> (
    None
):
    errors = Errors()

    class Reject(Middleware):
        async def handle(self, env: Envelope[Any], call_next: Next) -> None:
            if env.payload == "bad":
                raise LookupError("rejected by middleware")
            await call_next(env)

    gate = Gate(closed=False)
    async with cascade_bus.connect(mem(), on_error=errors) as bus:
        t = new_topic()
        sub = await bus.subscribe(t, gate, middleware=[Reject()])
        for payload in ("bad", "good", "bad", "also good"):
            await bus.publish(t, payload)
        await until(lambda: len(gate.payloads) == 2, "the good ones handled")
        assert not sub.closed
        stats = bus.stats()
    assert gate.payloads == ["good", "also good"]
    assert stats.dropped == {"handler_error": 2}
    assert stats.delivered == 2
    assert errors.types == ["LookupError", "LookupError"]


async def test_publish_middleware_adds_a_header_the_subscriber_sees() -> None:
    class Stamp(Middleware):
        async def publish(self, env: Envelope[Any], call_next: Next) -> None:
            headers = {**env.headers, "x-stamp": "stamped"}
            await call_next(msgspec.structs.replace(env, headers=headers))

    url = mem()
    async with (
        cascade_bus.connect(url, middleware=[Stamp()]) as publisher,
        cascade_bus.connect(url) as subscriber,
    ):
        t = new_topic()
        async with subscriber.subscribe(t) as sub:
            await publisher.publish(t, 1, headers={"mine": "yes"})
            env = await sub.get(timeout=WAIT)
    assert env.headers == {"mine": "yes", "x-stamp": "stamped"}


async def test_publish_middleware_can_reroute_and_its_errors_reach_the_publisher(
    bus: Bus,
) -> None:
    class Reroute(Middleware):
        def __init__(self, to: str) -> None:
            self.to = to

        async def publish(self, env: Envelope[Any], call_next: Next) -> None:
            if env.payload == "refuse":
                raise PermissionError("refused by middleware")
            await call_next(msgspec.structs.replace(env, topic=self.to))

    url = mem()
    t, elsewhere = new_topic("a"), new_topic("b")
    async with (
        cascade_bus.connect(url, middleware=[Reroute(elsewhere)]) as publisher,
        cascade_bus.connect(url) as subscriber,
    ):
        async with subscriber.subscribe(elsewhere) as sub:
            await publisher.publish(t, "hello")
            env = await sub.get(timeout=WAIT)
            with pytest.raises(PermissionError, match="refused by middleware"):
                await publisher.publish(t, "refuse")
        assert publisher.stats().published == 1
    assert (env.topic, env.payload) == (elsewhere, "hello")


@pytest.mark.parametrize("fmt", ["json", "msgpack", "raw"])
async def test_a_pass_through_publish_middleware_changes_nothing_subscribers_see(fmt: str) -> None:
    class PassThrough(Middleware):
        async def publish(self, env: Envelope[Any], call_next: Next) -> None:
            await call_next(env)

    def seen(env: Envelope[Any]) -> tuple[Any, ...]:
        return (env.topic, env.type, env.payload, env.content_type, env.headers,
                env.correlation_id, env.reply_to)  # fmt: skip

    cases: list[tuple[Any, dict[str, Any]]] = [
        ({"a": [1, 2], "b": {"c": None}}, {}),
        (b"\x00\xffbytes", {}),
        ("text", {"headers": {"h": "v"}, "type": "custom.type"}),
        ([1.5, True], {"correlation_id": "c-1", "reply_to": "some/inbox"}),
    ]
    url = mem()
    t = new_topic()
    got: dict[str, list[tuple[Any, ...]]] = {}
    for name, middleware in (("plain", []), ("wrapped", [PassThrough()])):
        async with (
            cascade_bus.connect(url, format=fmt, middleware=middleware) as publisher,
            cascade_bus.connect(url, format=fmt) as subscriber,
            subscriber.subscribe(t) as sub,
        ):
            for payload, options in cases:
                await publisher.publish(t, payload, **options)
            got[name] = [seen(await sub.get(timeout=WAIT)) for _ in cases]
            with pytest.raises(PayloadTooLarge):
                await publisher.publish(t, "x" * 2_000_000)
    assert got["wrapped"] == got["plain"]


async def test_middleware_must_be_middleware_instances() -> None:
    with pytest.raises(TypeError, match="Middleware instances"):
        cascade_bus.connect(mem(), middleware=[print])
    async with cascade_bus.connect(mem()) as bus:
        with pytest.raises(TypeError, match="Middleware instances"):
            bus.subscribe(new_topic(), print, middleware=[object()])  # type: ignore[list-item]


# -- the loss ledger: one test per reason ------------------------------------------------------


class Reading(msgspec.Struct):
    sensor: str
    celsius: float


async def test_ledger_decode_error() -> None:
    errors = Errors()
    got: list[Reading] = []
    async with cascade_bus.connect(mem(), on_error=errors) as bus:
        t = new_topic()
        await bus.subscribe(t, lambda env: got.append(env.payload), type=Reading)
        await bus.transport.publish(t, b"\xff\x00 foreign garbage")  # not from a bus at all
        await bus.transport.publish(t, b'{"sensor": 1}')  # foreign JSON of the wrong shape
        await bus.publish(t, {"sensor": "a", "celsius": "hot"})  # an envelope, wrong payload
        await bus.publish(t, {"sensor": "a", "celsius": 20.5})
        await until(lambda: len(got) == 1, "the good reading")
        await settle()
        stats = bus.stats()
    assert got == [Reading("a", 20.5)]
    assert stats.dropped == {"decode_error": 3}
    assert stats.delivered == 1
    assert errors.types == ["DecodeError"] * 3
    assert all(isinstance(error, DecodeError) for error, _ in errors.seen)


async def test_ledger_handler_error() -> None:
    errors = Errors()

    def handler(env: Envelope[Any]) -> None:
        if env.payload % 3 == 0:
            raise ZeroDivisionError(env.payload)

    async with cascade_bus.connect(mem(), on_error=errors) as bus:
        t = new_topic()
        await bus.subscribe(t, handler)
        for i in range(10):
            await bus.publish(t, i)
        await until(lambda: ledger_balances(bus.stats(), 10), "all 10 accounted for")
        stats = bus.stats()
    assert stats.dropped == {"handler_error": 4}  # 0, 3, 6, 9
    assert stats.delivered == 6
    assert len(errors.seen) == 4


async def test_ledger_overflow(bus: Bus) -> None:
    t = new_topic()
    sub = await bus.subscribe(t, buffer_size=10, overflow="drop_newest")
    for i in range(25):
        await bus.publish(t, i)
    assert bus.stats().dropped == {"overflow": 15}
    assert [(await sub.get(timeout=WAIT)).payload for _ in range(10)] == list(range(10))
    assert ledger_balances(bus.stats(), 25)


async def test_ledger_payload_too_large() -> None:
    async with cascade_bus.connect(mem(), max_payload=256) as bus:
        t = new_topic()
        sub = await bus.subscribe(t)
        await bus.publish(t, "small")
        for _ in range(2):
            with pytest.raises(PayloadTooLarge) as raised:
                await bus.publish(t, "x" * 1000)
        assert raised.value.limit == 256
        assert (await sub.get(timeout=WAIT)).payload == "small"
        stats = bus.stats()
    assert stats.dropped == {"payload_too_large": 2}
    assert stats.published == 1


@pytest.mark.parametrize("reason", ["unsubscribed", "closed"])
async def test_ledger_queued_messages_when_a_subscription_ends(reason: str) -> None:
    bus = await cascade_bus.connect(mem())
    try:
        t = new_topic()
        sub = await bus.subscribe(t)  # an iterator nobody reads: everything stays queued
        for i in range(7):
            await bus.publish(t, i)
        assert sub.pending == 7
        if reason == "unsubscribed":
            await sub.unsubscribe()
            await bus.publish(t, "after")  # nobody subscribed any more: not a loss of the sub
        else:
            await bus.close()
        assert sub.closed
    finally:
        await bus.close()
    stats = bus.stats()
    assert stats.dropped == {reason: 7}
    assert stats.buffered == 0


@pytest.mark.parametrize("reason", ["unsubscribed", "closed"])
async def test_ledger_counts_the_message_in_the_handler_when_a_subscription_ends(
    reason: str,
) -> None:
    gate = Gate()  # never opened
    bus = await cascade_bus.connect(mem(), close_timeout=0.2)
    try:
        t = new_topic()
        sub = await bus.subscribe(t, gate)
        for i in range(5):
            await bus.publish(t, i)
        async with asyncio.timeout(WAIT):
            await gate.holding.wait()
        if reason == "unsubscribed":
            await sub.unsubscribe()
    finally:
        await bus.close()
    stats = bus.stats()
    assert ledger_balances(stats, 5), stats
    assert stats.dropped == {reason: 5}


async def test_ledger_no_subscriber_on_memory(bus: Bus) -> None:
    await bus.publish(new_topic(), 1, qos=1)
    assert bus.stats().dropped == {"no_subscriber": 1}


# -- the loss ledger on MQTT: losses only a network transport has ------------------------------


def mqtt_transport(bus: Bus) -> Any:
    from cascade_bus_mqtt import MqttTransport

    assert isinstance(bus.transport, MqttTransport)
    return bus.transport


FAST_RECONNECT: dict[str, Any] = {"reconnect_min": 0.02, "reconnect_max": 0.2}


@pytest.mark.mqtt
@pytest.mark.fault
async def test_ledger_offline_overflow_on_mqtt(private_mosquitto: Any) -> None:
    broker = private_mosquitto()
    got: list[Any] = []
    async with cascade_bus.connect(broker.url, offline_buffer=10, **FAST_RECONNECT) as bus:
        t = new_topic()
        await bus.subscribe(f"{t}/#", lambda env: got.append(env.payload))
        await broker.astop()
        async with asyncio.timeout(WAIT):
            await mqtt_transport(bus).wait_disconnected()
            for i in range(50):
                await bus.publish(f"{t}/q0", i)  # QoS 0: never raises, counted
        stats = bus.stats()
        assert stats.dropped == {"offline_overflow": 40}
        assert stats.buffered == 10
        await broker.astart()
        async with asyncio.timeout(WAIT):
            await mqtt_transport(bus).wait_connected(reconnects=1)
        await until(lambda: len(got) == 10, "the 10 buffered messages")
        stats = bus.stats()
    assert got == list(range(10))
    assert stats.published == 50  # accepted by the bus; the losses are counted separately
    assert stats.dropped == {"offline_overflow": 40}
    assert stats.delivered + stats.dropped_total == 50


@pytest.mark.mqtt
@pytest.mark.fault
async def test_ledger_disconnected_when_closing_with_an_offline_buffer(
    private_mosquitto: Any,
) -> None:
    broker = private_mosquitto()
    bus = await cascade_bus.connect(
        broker.url, offline_buffer=100, close_timeout=0.3, **FAST_RECONNECT
    )
    try:
        await broker.astop()
        async with asyncio.timeout(WAIT):
            await mqtt_transport(bus).wait_disconnected()
        for i in range(6):
            await bus.publish(new_topic(), i)
        assert bus.stats().buffered == 6
    finally:
        await bus.close()  # the broker never came back: the buffer is lost, and counted
    stats = bus.stats()
    assert stats.dropped == {"disconnected": 6}
    assert stats.buffered == 0


@pytest.mark.mqtt
@pytest.mark.fault
async def test_ledger_disconnected_without_reconnect(private_mosquitto: Any) -> None:
    broker = private_mosquitto()
    async with cascade_bus.connect(broker.url, reconnect=False, close_timeout=0.3) as bus:
        await broker.astop()
        async with asyncio.timeout(WAIT):
            await mqtt_transport(bus).wait_disconnected()
        with pytest.raises(ConnectionLost):
            await bus.publish(new_topic(), 1)
        stats = bus.stats()
    assert stats.dropped == {"disconnected": 1}


@pytest.mark.mqtt
async def test_ledger_no_subscriber_on_mqtt5(mqtt_url: str) -> None:
    async with cascade_bus.connect(mqtt_url) as bus:
        await bus.publish(new_topic(), 1, qos=1)
        stats = bus.stats()
    assert stats.dropped == {"no_subscriber": 1}


@pytest.mark.mqtt
async def test_block_on_mqtt_holds_back_instead_of_dropping(
    mqtt_url: str, unique_topic: str
) -> None:
    gate = Gate()
    count = 600  # far past the subscription's hard cap (2 x 10 + 64): only holding back helps
    async with (
        cascade_bus.connect(mqtt_url) as subscriber,
        cascade_bus.connect(mqtt_url) as publisher,
    ):
        sub = await subscriber.subscribe(
            unique_topic, gate, buffer_size=10, overflow="block", qos=1
        )
        for i in range(count):
            await publisher.publish(unique_topic, i, qos=1)
        await publisher.flush(5.0)
        held = sub.pending
        gate.open.set()
        await until(lambda: ledger_balances(subscriber.stats(), count), "all accounted for")
        stats = subscriber.stats()
    assert held <= 74  # the rest waited in the socket and at the broker, not in our memory
    assert stats.dropped == {}
    assert gate.payloads == list(range(count))


# -- soak: a handler 10x slower than the publisher ---------------------------------------------

SOAK_MESSAGES = 20_000
SOAK_BUFFER = 100
HANDLER_STEPS = 10  # loop iterations per handled message; the publisher takes one per publish
MEMORY_GROWTH_LIMIT = 1024 * 1024


class SoakResult(msgspec.Struct):
    stats: cascade_bus.Stats
    handled: int  # measured messages handled
    in_order: bool  # every handled message came after the one before (FIFO)
    tail: list[int]  # the last SOAK_BUFFER handled
    peak_pending: int  # largest sub.pending seen by the publisher and the handler
    growth: int  # tracemalloc peak over the baseline, bytes


async def soak(overflow: Any, buffer_size: int = SOAK_BUFFER) -> SoakResult:
    """Publish SOAK_MESSAGES to a 10x slower handler, measuring queue length and memory.

    The bookkeeping is O(1) (a count, the last value, a bounded tail) so that the memory
    measured is the bus's own.
    """
    handled = 0
    last = -1
    in_order = True
    tail: collections.deque[int] = collections.deque(maxlen=SOAK_BUFFER)
    peak_pending = 0

    async with cascade_bus.connect(mem()) as bus:
        t = new_topic()
        sub: cascade_bus.Subscription[Any]

        async def slow(env: Envelope[int]) -> None:
            nonlocal handled, last, in_order, peak_pending
            peak_pending = max(peak_pending, sub.pending)
            for _ in range(HANDLER_STEPS):
                await asyncio.sleep(0)
            if env.payload >= 0:
                handled += 1
                in_order = in_order and env.payload > last
                last = env.payload
                tail.append(env.payload)

        sub = await bus.subscribe(t, slow, buffer_size=buffer_size, overflow=overflow)
        warmup = 1_000
        for _ in range(warmup):  # reach a steady state before measuring memory
            await bus.publish(t, -1)
            await asyncio.sleep(0)
        tracemalloc.start()
        try:
            baseline, _ = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            for i in range(SOAK_MESSAGES):
                await bus.publish(t, i)
                peak_pending = max(peak_pending, sub.pending)
                await asyncio.sleep(0)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        await until(
            lambda: ledger_balances(bus.stats(), warmup + SOAK_MESSAGES),
            "every message handled or dropped",
            timeout=15,
        )
    return SoakResult(bus.stats(), handled, in_order, list(tail), peak_pending, peak - baseline)


@pytest.mark.timeout(60)
async def test_soak_block_keeps_the_queue_bounded_and_memory_flat() -> None:
    result = await soak("block")
    assert result.handled == SOAK_MESSAGES
    assert result.in_order
    assert result.peak_pending <= SOAK_BUFFER
    assert result.growth < MEMORY_GROWTH_LIMIT, f"memory grew by {result.growth / 1e6:.2f} MB"
    stats = result.stats
    assert stats.dropped == {}
    assert stats.delivered == stats.published == 1_000 + SOAK_MESSAGES


@pytest.mark.timeout(60)
async def test_soak_drop_oldest_counts_exactly() -> None:
    result = await soak("drop_oldest")
    stats = result.stats
    assert stats.published == 1_000 + SOAK_MESSAGES
    assert stats.delivered + stats.dropped["overflow"] == stats.published
    assert set(stats.dropped) == {"overflow"}
    assert stats.dropped["overflow"] > SOAK_MESSAGES // 2  # the handler is 10x slower
    assert result.in_order  # FIFO among the survivors
    # drop_oldest keeps the newest: the last buffer-full all arrive.
    assert result.tail == list(range(SOAK_MESSAGES - SOAK_BUFFER, SOAK_MESSAGES))
    assert result.peak_pending <= SOAK_BUFFER
    assert result.growth < MEMORY_GROWTH_LIMIT, f"memory grew by {result.growth / 1e6:.2f} MB"
