"""OpenTelemetry: spans, their links across buses and transports, attributes, and metrics.

Spans and metrics are read back from the SDK's in-memory exporter and reader.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import msgspec
import pytest

pytest.importorskip("opentelemetry.sdk", reason="needs opentelemetry-sdk (the test extra)")

from opentelemetry import baggage, propagate, trace
from opentelemetry import context as otel_context
from opentelemetry.metrics import NoOpMeterProvider
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.propagators.textmap import (
    CarrierT,
    Getter,
    Setter,
    TextMapPropagator,
    default_getter,
    default_setter,
)
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import (
    NonRecordingSpan,
    NoOpTracerProvider,
    SpanContext,
    SpanKind,
    StatusCode,
    TraceFlags,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

import cascade_bus
from cascade_bus import Bus, DropReason, Envelope, PayloadTooLarge
from cascade_bus.otel import (
    DROP_REASON,
    BusMetrics,
    OpenTelemetryMiddleware,
    instrument_bus,
)
from cascade_bus.otel import connect as otel_connect

WAIT = 5.0


class Tracing:
    """An SDK tracer provider whose finished spans are kept in memory."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))

    @property
    def spans(self) -> tuple[ReadableSpan, ...]:
        return self.exporter.get_finished_spans()

    def named(self, name: str) -> list[ReadableSpan]:
        return [span for span in self.spans if span.name == name]

    async def wait_for(self, count: int) -> tuple[ReadableSpan, ...]:
        await until(lambda: len(self.spans) >= count, f"{count} spans")
        return self.spans

    def middleware(self, **kwargs: Any) -> OpenTelemetryMiddleware:
        return OpenTelemetryMiddleware(self.provider, NoOpMeterProvider(), **kwargs)

    def bus(self, url: str, **options: Any) -> Bus:
        """A bus traced into this provider (metrics off)."""
        otel = self.middleware()
        return otel.bind(cascade_bus.connect(url, middleware=[otel], **options))


class Metering:
    """An SDK meter provider read on demand."""

    def __init__(self) -> None:
        self.reader = InMemoryMetricReader()
        self.provider = MeterProvider(metric_readers=[self.reader])

    def collect(self) -> dict[str, list[tuple[dict[str, Any], Any]]]:
        """Every metric by name: a list of (attributes, data point)."""
        data = self.reader.get_metrics_data()
        out: dict[str, list[tuple[dict[str, Any], Any]]] = {}
        assert data is not None
        for resource_metrics in data.resource_metrics:
            for scope_metrics in resource_metrics.scope_metrics:
                for metric in scope_metrics.metrics:
                    out.setdefault(metric.name, []).extend(
                        (dict(point.attributes or {}), point) for point in metric.data.data_points
                    )
        return out


@pytest.fixture
def tracing() -> Iterator[Tracing]:
    t = Tracing()
    yield t
    t.provider.shutdown()


@pytest.fixture
def metering() -> Iterator[Metering]:
    m = Metering()
    yield m
    m.provider.shutdown()


@pytest.fixture
async def buses() -> AsyncIterator[list[Bus]]:
    """Buses appended here are closed after the test."""
    opened: list[Bus] = []
    yield opened
    await asyncio.gather(*(bus.close() for bus in reversed(opened)))


def mem() -> str:
    return f"memory://otel-{uuid.uuid4().hex}"


def new_topic(name: str = "t") -> str:
    return f"otel/{uuid.uuid4().hex[:12]}/{name}"


async def until(condition: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    try:
        async with asyncio.timeout(timeout):
            # Counters and exporters have no event to wait on: poll them, bounded.
            while not condition():  # noqa: ASYNC110
                await asyncio.sleep(0.001)
    except TimeoutError:
        raise AssertionError(f"waited {timeout}s for {what}") from None


class Inbox:
    def __init__(self) -> None:
        self.envelopes: list[Envelope[Any]] = []

    def __call__(self, env: Envelope[Any]) -> None:
        self.envelopes.append(env)

    async def wait_for(self, count: int) -> list[Envelope[Any]]:
        await until(lambda: len(self.envelopes) >= count, f"{count} messages")
        return self.envelopes


def traceparent_of(span: ReadableSpan) -> str:
    ctx = span.get_span_context()
    assert ctx is not None
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def assert_child_of(child: ReadableSpan, parent: ReadableSpan) -> None:
    assert child.parent is not None, f"{child.name} has no parent"
    assert child.context is not None
    assert parent.context is not None
    assert child.parent.span_id == parent.context.span_id
    assert child.context.trace_id == parent.context.trace_id


# -- spans -------------------------------------------------------------------------------------


async def assert_trace_crosses(tracing: Tracing, publisher: Bus, subscriber: Bus, t: str) -> None:
    """Publish on one bus, handle on the other: PRODUCER -> CONSUMER in one trace."""
    inbox = Inbox()
    await subscriber.subscribe(t, inbox)
    await publisher.publish(t, {"n": 1}, correlation_id="conv-1", headers={"k": "v"})
    (env,) = await inbox.wait_for(1)
    await tracing.wait_for(2)

    (producer,) = tracing.named(f"{t} publish")
    (consumer,) = tracing.named(f"{t} process")
    assert producer.kind is SpanKind.PRODUCER
    assert consumer.kind is SpanKind.CONSUMER
    assert producer.parent is None  # nothing was current: a new trace
    assert_child_of(consumer, producer)
    assert consumer.parent is not None
    assert consumer.parent.is_remote
    assert env.headers["traceparent"] == traceparent_of(producer)
    assert env.headers["k"] == "v"

    system = publisher.url.scheme
    common: dict[str, Any] = {
        "messaging.system": system,
        "messaging.destination.name": t,
        "messaging.message.id": env.id,
        "messaging.message.conversation_id": "conv-1",
    }
    url = publisher.url
    if url.port is not None:
        common |= {"server.address": url.host, "server.port": url.port}
    assert dict(producer.attributes or {}) == {
        **common,
        "messaging.operation.type": "publish",
        "messaging.operation.name": "publish",
    }
    assert dict(consumer.attributes or {}) == {
        **common,
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
    }
    assert producer.status.status_code is StatusCode.UNSET
    assert consumer.status.status_code is StatusCode.UNSET


async def test_producer_and_consumer_spans_across_two_memory_buses(
    tracing: Tracing, buses: list[Bus]
) -> None:
    url = mem()
    publisher = await tracing.bus(url)
    subscriber = await tracing.bus(url)
    buses += [publisher, subscriber]
    await assert_trace_crosses(tracing, publisher, subscriber, new_topic())


@pytest.mark.mqtt
@pytest.mark.parametrize("wire_format", ["json", "raw"])
async def test_producer_and_consumer_spans_across_two_mqtt_buses(
    tracing: Tracing, buses: list[Bus], mqtt_url: str, unique_topic: str, wire_format: str
) -> None:
    """JSON carries the headers in the envelope; raw in MQTT 5 user properties."""
    publisher = await tracing.bus(mqtt_url, format=wire_format)
    subscriber = await tracing.bus(mqtt_url, format=wire_format)
    buses += [publisher, subscriber]
    await assert_trace_crosses(tracing, publisher, subscriber, f"{unique_topic}/orders")


async def test_a_publish_inside_a_span_is_its_child_and_the_handler_continues_the_trace(
    tracing: Tracing, buses: list[Bus]
) -> None:
    """app span -> a publish -> a process -> (handler publishes) b publish -> b process."""
    url = mem()
    bus = await tracing.bus(url)
    buses.append(bus)
    a, b = new_topic("a"), new_topic("b")
    inbox = Inbox()

    async def forward(env: Envelope[Any]) -> None:
        await bus.publish(b, env.payload + 1)

    await bus.subscribe(a, forward)
    await bus.subscribe(b, inbox)
    with tracing.provider.get_tracer("app").start_as_current_span("request") as root:
        await bus.publish(a, 1)
    assert [env.payload for env in await inbox.wait_for(1)] == [2]
    await tracing.wait_for(5)

    (app,) = tracing.named("request")
    (a_publish,) = tracing.named(f"{a} publish")
    (a_process,) = tracing.named(f"{a} process")
    (b_publish,) = tracing.named(f"{b} publish")
    (b_process,) = tracing.named(f"{b} process")
    assert_child_of(a_publish, app)
    assert_child_of(a_process, a_publish)
    assert_child_of(b_publish, a_process)
    assert_child_of(b_process, b_publish)
    assert {span.context.trace_id for span in tracing.spans if span.context} == {
        root.get_span_context().trace_id
    }


async def test_a_message_without_trace_context_starts_a_new_trace(
    tracing: Tracing, buses: list[Bus]
) -> None:
    """A foreign publisher: the consumer span is a root, not a child of what was current."""
    url = mem()
    subscriber = await tracing.bus(url)
    plain = await cascade_bus.connect(url)
    buses += [subscriber, plain]
    t = new_topic()
    inbox = Inbox()
    with tracing.provider.get_tracer("app").start_as_current_span("setup"):
        await subscriber.subscribe(t, inbox)  # the handler task starts inside "setup"
    await plain.publish(t, 1)
    await inbox.wait_for(1)
    await tracing.wait_for(2)
    (process,) = tracing.named(f"{t} process")
    assert process.parent is None


async def test_a_failing_handler_marks_each_attempt_and_the_dead_letter_continues_the_trace(
    tracing: Tracing, buses: list[Bus]
) -> None:
    url = mem()
    bus = await tracing.bus(url, on_error=lambda *args: None)
    buses.append(bus)
    t, dlq = new_topic("jobs"), new_topic("dead")

    async def failing(env: Envelope[Any]) -> None:
        raise ValueError("bad job")

    dead = await bus.subscribe(dlq)
    await bus.subscribe(t, failing, retries=1, retry_delay=0, dead_letter=dlq)
    await bus.publish(t, {"job": 1})
    dead_env = await dead.get(timeout=WAIT)
    await tracing.wait_for(4)

    (publish,) = tracing.named(f"{t} publish")
    attempts = tracing.named(f"{t} process")
    assert len(attempts) == 2
    for attempt in attempts:
        assert_child_of(attempt, publish)
        assert attempt.status.status_code is StatusCode.ERROR
        assert attempt.status.description == "ValueError: bad job"
        assert (attempt.attributes or {})["error.type"] == "ValueError"
        (event,) = attempt.events
        assert event.name == "exception"
        assert (event.attributes or {})["exception.type"] == "ValueError"
        assert (event.attributes or {})["exception.message"] == "bad job"
    (dead_publish,) = tracing.named(f"{dlq} publish")
    assert_child_of(dead_publish, publish)  # no current span: the headers' context is used
    assert dead_env.headers["traceparent"] == traceparent_of(dead_publish)
    assert dead_env.headers["x-death-error-type"] == "ValueError"
    assert bus.stats().dead_lettered == 1


async def test_a_failing_publish_marks_the_producer_span(
    tracing: Tracing, buses: list[Bus]
) -> None:
    bus = await tracing.bus(mem(), max_payload=100)
    buses.append(bus)
    t = new_topic()
    with pytest.raises(PayloadTooLarge):
        await bus.publish(t, "x" * 500)
    (span,) = await tracing.wait_for(1)
    assert span.name == f"{t} publish"
    assert span.status.status_code is StatusCode.ERROR
    assert (span.attributes or {})["error.type"] == "PayloadTooLarge"
    assert bus.stats().dropped == {DropReason.PAYLOAD_TOO_LARGE: 1}


async def test_without_an_sdk_the_envelope_is_untouched(buses: list[Bus]) -> None:
    otel = OpenTelemetryMiddleware(NoOpTracerProvider(), NoOpMeterProvider())
    bus = await otel.bind(cascade_bus.connect(mem(), middleware=[otel]))
    buses.append(bus)
    t = new_topic()
    inbox = Inbox()
    await bus.subscribe(t, inbox)
    await bus.publish(t, 1, headers={"a": "b"})
    (env,) = await inbox.wait_for(1)
    assert env.headers == {"a": "b"}
    assert bus.stats().delivered == 1


async def test_bind_takes_the_system_from_the_bus_and_refuses_a_second_bus(
    tracing: Tracing,
) -> None:
    otel = tracing.middleware()
    assert otel.system == "cascade_bus"  # not bound yet
    first = cascade_bus.connect(mem(), middleware=[otel])
    assert otel.bind(first) is first
    assert otel.system == "memory"
    assert otel.bind(first) is first  # again: fine
    with pytest.raises(ValueError, match="create one per bus"):
        otel.bind(cascade_bus.connect(mem()))
    explicit = tracing.middleware(system="inproc")
    explicit.bind(cascade_bus.connect(mem(), middleware=[explicit]))
    assert explicit.system == "inproc"


@pytest.mark.parametrize(
    ("url", "system"),
    [
        ("memory://x", "memory"),
        ("mqtt://broker.invalid", "mqtt"),
        ("mqtts://broker.invalid", "mqtt"),
    ],
)
def test_messaging_system_is_the_scheme_without_its_tls_variant(
    tracing: Tracing, url: str, system: str
) -> None:
    if url.startswith("mqtt"):
        pytest.importorskip("cascade_bus_mqtt")
    otel = tracing.middleware()
    otel.bind(cascade_bus.connect(url, middleware=[otel]))  # built, never opened
    assert otel.system == system


# -- propagation -------------------------------------------------------------------------------
#
# With the default global propagator (W3C Trace Context + Baggage) the middleware writes and parses
# traceparent itself; these tests hold it to what the propagator API does, and check that any other
# propagator is used as configured.

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
SPAN_ID = "b7ad6b7169203331"
CARRIERS: dict[str, dict[str, str]] = {
    "sampled": {"traceparent": f"00-{TRACE_ID}-{SPAN_ID}-01"},
    "not sampled": {"traceparent": f"00-{TRACE_ID}-{SPAN_ID}-00"},
    "sampled, random trace id": {"traceparent": f"00-{TRACE_ID}-{SPAN_ID}-03"},
    "with tracestate": {"traceparent": f"00-{TRACE_ID}-{SPAN_ID}-01", "tracestate": "v=1,w=2"},
    "with baggage": {"traceparent": f"00-{TRACE_ID}-{SPAN_ID}-01", "baggage": "user=al%20ice,t=1"},
    "baggage only": {"baggage": "user=bob"},
    "future version": {"traceparent": f"01-{TRACE_ID}-{SPAN_ID}-01-more"},
    "leading blanks": {"traceparent": f"  00-{TRACE_ID}-{SPAN_ID}-01"},
    "upper case": {"traceparent": f"00-{TRACE_ID.upper()}-{SPAN_ID}-01"},
    "zero trace id": {"traceparent": f"00-{'0' * 32}-{SPAN_ID}-01"},
    "zero span id": {"traceparent": f"00-{TRACE_ID}-{'0' * 16}-01"},
    "version ff": {"traceparent": f"ff-{TRACE_ID}-{SPAN_ID}-01"},
    "version 00 with more": {"traceparent": f"00-{TRACE_ID}-{SPAN_ID}-01-more"},
    "garbage": {"traceparent": "garbage"},
}


@pytest.mark.parametrize("carrier", CARRIERS.values(), ids=CARRIERS.keys())
async def test_the_handler_continues_exactly_what_the_propagator_extracts(
    tracing: Tracing, buses: list[Bus], carrier: dict[str, str]
) -> None:
    url = mem()
    subscriber = await tracing.bus(url)
    plain = await cascade_bus.connect(url)  # a foreign publisher: the headers as they are
    buses += [subscriber, plain]
    t = new_topic()
    seen: list[tuple[SpanContext, dict[str, object]]] = []

    def handler(env: Envelope[Any]) -> None:
        seen.append((trace.get_current_span().get_span_context(), dict(baggage.get_all())))

    await subscriber.subscribe(t, handler)
    await plain.publish(t, 1, headers=carrier)
    await until(lambda: bool(seen), "the handler")

    expected = propagate.extract(carrier)  # the API's answer, the reference
    parent = trace.get_current_span(expected).get_span_context()
    current, handler_baggage = seen[0]
    assert handler_baggage == dict(baggage.get_all(expected))
    if not parent.is_valid:
        assert current.trace_id != int(TRACE_ID, 16)  # a new trace
        (process,) = await tracing.wait_for(1)
        assert process.parent is None
        return
    assert current.trace_id == parent.trace_id
    assert current.trace_state == parent.trace_state
    assert current.trace_flags.sampled == parent.trace_flags.sampled
    if parent.trace_flags.sampled:
        (process,) = await tracing.wait_for(1)
        assert process.parent == parent  # ids, flags, tracestate, remote
    else:  # the unsampled decision is followed: nothing recorded
        await until(lambda: subscriber.stats().delivered == 1, "the handler to return")
        assert tracing.spans == ()


async def test_the_producer_injects_what_the_propagator_would(
    tracing: Tracing, buses: list[Bus]
) -> None:
    bus = await tracing.bus(mem())
    buses.append(bus)
    t = new_topic()
    sub = await bus.subscribe(t)
    with_baggage = baggage.set_baggage("user", "al ice", baggage.set_baggage("tenant", "t1"))
    token = otel_context.attach(with_baggage)
    try:
        await bus.publish(t, 1, headers={"k": "v"})
    finally:
        otel_context.detach(token)
    env = await sub.get(timeout=WAIT)
    (producer,) = await tracing.wait_for(1)
    assert producer.context is not None

    expected: dict[str, str] = {"k": "v"}
    propagate.inject(expected, trace.set_span_in_context(NonRecordingSpan(producer.context)))
    propagate.inject(expected, with_baggage)  # baggage from the publisher's context
    assert env.headers == expected
    assert set(expected) == {"k", "traceparent", "baggage"}


async def test_tracestate_follows_its_trace_and_is_dropped_with_a_replaced_traceparent(
    tracing: Tracing, buses: list[Bus]
) -> None:
    bus = await tracing.bus(mem())
    buses.append(bus)
    t = new_topic()
    sub = await bus.subscribe(t)
    foreign = {"traceparent": f"00-{TRACE_ID}-{SPAN_ID}-01", "tracestate": "v=1,w=2"}

    # No current span: the publish continues the headers' trace, tracestate included.
    await bus.publish(t, 1, headers=foreign)
    continued = await sub.get(timeout=WAIT)
    (producer,) = await tracing.wait_for(1)
    assert producer.parent is not None
    assert producer.parent.trace_id == int(TRACE_ID, 16)
    assert continued.headers["traceparent"] == traceparent_of(producer)
    assert continued.headers["tracestate"] == "v=1,w=2"

    # Inside another trace: the old traceparent is replaced, its tracestate must not stay.
    with tracing.provider.get_tracer("app").start_as_current_span("request") as root:
        await bus.publish(t, 2, headers=foreign)
    replaced = await sub.get(timeout=WAIT)
    assert (
        replaced.headers["traceparent"].split("-")[1] == f"{root.get_span_context().trace_id:032x}"
    )
    assert "tracestate" not in replaced.headers


class SpanIdPropagator(TextMapPropagator):
    """A made-up propagator: trace and span id in one ``x-span`` header."""

    def extract(
        self,
        carrier: CarrierT,
        context: otel_context.Context | None = None,
        getter: Getter[CarrierT] = default_getter,
    ) -> otel_context.Context:
        context = otel_context.Context() if context is None else context
        values = getter.get(carrier, "x-span")
        if not values:
            return context
        trace_id, span_id = (int(part, 16) for part in values[0].split(":"))
        remote = SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(1))
        return trace.set_span_in_context(NonRecordingSpan(remote), context)

    def inject(
        self,
        carrier: CarrierT,
        context: otel_context.Context | None = None,
        setter: Setter[CarrierT] = default_setter,
    ) -> None:
        span_context = trace.get_current_span(context).get_span_context()
        if span_context.is_valid:
            setter.set(carrier, "x-span", f"{span_context.trace_id:x}:{span_context.span_id:x}")

    @property
    def fields(self) -> set[str]:
        return {"x-span"}


@pytest.fixture
def restore_textmap() -> Iterator[TextMapPropagator]:
    """The global propagator as it was; set again after the test."""
    saved = propagate.get_global_textmap()
    yield saved
    propagate.set_global_textmap(saved)


@pytest.mark.parametrize(
    ("propagators", "fields"),
    [
        ([SpanIdPropagator()], {"x-span"}),
        ([TraceContextTextMapPropagator(), SpanIdPropagator()], {"x-span", "traceparent"}),
    ],
    ids=["custom only", "W3C and custom"],
)
async def test_a_configured_propagator_is_used(
    tracing: Tracing,
    buses: list[Bus],
    restore_textmap: TextMapPropagator,
    propagators: list[TextMapPropagator],
    fields: set[str],
) -> None:
    url = mem()
    publisher = await tracing.bus(url)
    subscriber = await tracing.bus(url)
    buses += [publisher, subscriber]
    t = new_topic()
    inbox = Inbox()
    await subscriber.subscribe(t, inbox)

    propagate.set_global_textmap(CompositePropagator(propagators))
    await publisher.publish(t, 1)
    (env,) = await inbox.wait_for(1)
    await tracing.wait_for(2)
    assert set(env.headers) == fields
    (producer,) = tracing.named(f"{t} publish")
    (consumer,) = tracing.named(f"{t} process")
    assert_child_of(consumer, producer)

    propagate.set_global_textmap(restore_textmap)  # back to the default: traceparent again
    await publisher.publish(t, 2)
    (_, again) = await inbox.wait_for(2)
    assert set(again.headers) == {"traceparent"}


# -- metrics -----------------------------------------------------------------------------------


def for_bus(points: list[tuple[dict[str, Any], Any]], bus: Bus) -> list[tuple[dict[str, Any], Any]]:
    return [(attrs, point) for attrs, point in points if attrs["messaging.client.id"] == bus.id]


def value(metrics: dict[str, list[tuple[dict[str, Any], Any]]], name: str, bus: Bus) -> Any:
    ((_, point),) = for_bus(metrics[name], bus)
    return point.value


def assert_metrics_match_stats(metering: Metering, bus: Bus) -> dict[str, Any]:
    metrics = metering.collect()
    stats = bus.stats()
    for name in ("published", "delivered", "dead_lettered", "duplicates", "reconnects", "buffered"):
        assert value(metrics, f"cascade_bus.{name}", bus) == getattr(stats, name), name
    dropped = {
        attrs[DROP_REASON]: point.value
        for attrs, point in for_bus(metrics["cascade_bus.dropped"], bus)
    }
    assert {reason: n for reason, n in dropped.items() if n} == stats.dropped
    reasons = {v for k, v in vars(DropReason).items() if k.isupper()}
    assert set(dropped) == reasons  # every reason reported, zeros included
    assert value(metrics, "cascade_bus.offline_buffer.depth", bus) == getattr(
        bus.transport, "buffered", 0
    )
    return metrics


class Reading(msgspec.Struct):
    celsius: float


async def test_metrics_match_stats(metering: Metering, buses: list[Bus]) -> None:
    otel = OpenTelemetryMiddleware(NoOpTracerProvider(), metering.provider)
    bus = otel.bind(cascade_bus.connect(mem(), middleware=[otel], on_error=lambda *a: None))
    await bus
    buses.append(bus)
    assert instrument_bus(bus, metering.provider) is instrument_bus(bus, metering.provider)
    t = new_topic()
    handled: list[float] = []

    def handler(env: Envelope[Reading]) -> None:
        if env.payload.celsius < 0:
            raise ArithmeticError("below zero")
        handled.append(env.payload.celsius)

    await bus.subscribe(t, handler, type=Reading)
    backlog = await bus.subscribe(t, buffer_size=2, overflow="drop_newest")  # nobody reads
    for celsius in (20.0, -1.0, 21.0):
        await bus.publish(t, {"celsius": celsius})
    await bus.publish(t, {"celsius": "warm"})  # undecodable for the typed subscription
    await until(lambda: bus.stats().delivered + bus.stats().dropped_total >= 6, "all counted")
    assert backlog.pending == 2

    metrics = assert_metrics_match_stats(metering, bus)
    assert bus.stats().dropped == {"handler_error": 1, "overflow": 2, "decode_error": 1}
    assert value(metrics, "cascade_bus.buffered", bus) == 2
    durations = {
        attrs.get("error.type"): point for attrs, point in metrics["messaging.process.duration"]
    }
    assert set(durations) == {None, "ArithmeticError"}
    assert durations[None].count == 2
    assert durations["ArithmeticError"].count == 1
    assert all(point.sum >= 0 for point in durations.values())
    ok_attributes = next(
        a for a, _ in metrics["messaging.process.duration"] if "error.type" not in a
    )
    assert ok_attributes == {"messaging.system": "memory", "messaging.operation.name": "process"}

    # More traffic: the counters follow, the instruments are not duplicated.
    await bus.publish(t, {"celsius": 22.0})
    await until(lambda: len(handled) == 3, "the third reading")
    assert_metrics_match_stats(metering, bus)


async def test_each_bus_reports_under_its_own_id_and_can_be_removed(
    metering: Metering, buses: list[Bus]
) -> None:
    url = mem()
    a = await cascade_bus.connect(url)
    b = await cascade_bus.connect(url)
    buses += [a, b]
    metrics_handle = instrument_bus(a, metering.provider)
    assert isinstance(metrics_handle, BusMetrics)
    instrument_bus(b, metering.provider)
    t = new_topic()
    sub = await b.subscribe(t)
    await a.publish(t, 1)
    await sub.get(timeout=WAIT)
    metrics = metering.collect()
    assert value(metrics, "cascade_bus.published", a) == 1
    assert value(metrics, "cascade_bus.published", b) == 0
    assert value(metrics, "cascade_bus.delivered", b) == 1
    metrics_handle.remove(a)
    assert a not in metrics_handle
    assert b in metrics_handle
    assert for_bus(metering.collect()["cascade_bus.published"], a) == []


async def test_otel_connect_traces_and_meters_in_one_call(
    tracing: Tracing, metering: Metering
) -> None:
    url = mem()
    async with (
        otel_connect(url, tracer_provider=tracing.provider, meter_provider=metering.provider) as a,
        otel_connect(url, tracer_provider=tracing.provider, meter_provider=metering.provider) as b,
    ):
        t = new_topic()
        inbox = Inbox()
        await b.subscribe(t, inbox)
        await a.publish(t, "hi")
        await inbox.wait_for(1)
        spans = await tracing.wait_for(2)
        assert_metrics_match_stats(metering, a)
        assert_metrics_match_stats(metering, b)
    producer, consumer = sorted(spans, key=lambda s: s.kind is SpanKind.CONSUMER)
    assert_child_of(consumer, producer)
    assert (producer.attributes or {})["messaging.system"] == "memory"


@pytest.mark.mqtt
@pytest.mark.fault
async def test_reconnects_and_offline_buffer_depth_on_mqtt(
    metering: Metering, private_mosquitto: Any, unique_topic: str
) -> None:
    from cascade_bus_mqtt import MqttTransport

    broker = private_mosquitto()
    async with otel_connect(
        broker.url,
        meter_provider=metering.provider,
        reconnect_min=0.02,
        reconnect_max=0.2,
        offline_buffer=3,
    ) as bus:
        transport = bus.transport
        assert isinstance(transport, MqttTransport)
        await broker.astop()
        async with asyncio.timeout(WAIT):
            await transport.wait_disconnected()
        for i in range(5):
            await bus.publish(f"{unique_topic}/x", i)
        metrics = assert_metrics_match_stats(metering, bus)
        assert value(metrics, "cascade_bus.offline_buffer.depth", bus) == 3
        assert bus.stats().dropped == {"offline_overflow": 2}
        await broker.astart()
        async with asyncio.timeout(WAIT):
            await transport.wait_connected(reconnects=1)
        await bus.flush(timeout=WAIT)
        metrics = assert_metrics_match_stats(metering, bus)
    assert value(metrics, "cascade_bus.reconnects", bus) == 1
    assert value(metrics, "cascade_bus.offline_buffer.depth", bus) == 0
    attrs, _ = for_bus(metrics["cascade_bus.published"], bus)[0]
    assert attrs["messaging.system"] == "mqtt"
    assert attrs["server.port"] == broker.port


# -- packaging ---------------------------------------------------------------------------------


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-W", "error", "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_core_does_not_import_opentelemetry() -> None:
    result = run_python(
        "import sys, cascade_bus\n"
        "assert not [m for m in sys.modules if m.startswith('opentelemetry')]\n"
        "print('clean')"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "clean"


def test_without_opentelemetry_the_otel_module_says_what_to_install() -> None:
    result = run_python(
        "import sys\n"
        "sys.modules['opentelemetry'] = None\n"
        "import cascade_bus\n"
        "try:\n"
        "    import cascade_bus.otel\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    assert result.returncode == 0, result.stderr
    assert "pip install 'cascade-bus[otel]'" in result.stdout
