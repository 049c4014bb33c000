"""OpenTelemetry for cascade-bus: traces across buses and transports, and the bus's counters.

Install the extra (``pip install 'cascade-bus[otel]'``, which needs only ``opentelemetry-api``)
and configure an OpenTelemetry SDK as usual; without an SDK every call is a no-op.

- `OpenTelemetryMiddleware` is a `Middleware`: a PRODUCER span per publish that injects the W3C
  ``traceparent`` / ``tracestate`` headers into the envelope, and a CONSUMER span per handled
  message whose parent is extracted from those headers, so one trace follows a message from
  bus to bus over MQTT, NATS, Redis or memory alike. It also records how long handlers take
  (a histogram).
- `instrument_bus` reports a bus's `Stats` as observable metrics: published, delivered,
  dropped by reason, dead-lettered, duplicates, reconnects, buffered and offline-buffer depth.
- `connect` does both: ``cascade_bus.otel.connect(url, ...)`` is `cascade_bus.connect` with
  tracing and metrics switched on.

The core package never imports this module, so ``import cascade_bus`` works without
OpenTelemetry installed.
"""

from __future__ import annotations

import re
import time
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

import msgspec

try:
    from opentelemetry import context as otel_context
    from opentelemetry import metrics, propagate, trace
    from opentelemetry.baggage.propagation import W3CBaggagePropagator
    from opentelemetry.metrics import CallbackOptions, Observation
    from opentelemetry.propagators.composite import CompositePropagator
    from opentelemetry.trace import (
        NonRecordingSpan,
        SpanContext,
        SpanKind,
        Status,
        StatusCode,
        TraceFlags,
    )
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "cascade_bus.otel needs OpenTelemetry: pip install 'cascade-bus[otel]' "
        "(or opentelemetry-api)"
    ) from exc

from . import __version__
from ._bus import Bus, ErrorHook
from ._bus import connect as _connect
from ._envelope import Envelope
from ._middleware import Middleware, Next
from ._stats import DropReason, Stats
from ._url import BusURL

if TYPE_CHECKING:
    from opentelemetry.metrics import MeterProvider
    from opentelemetry.trace import TracerProvider

__all__ = [
    "DEFAULT_SYSTEM",
    "DROP_REASON",
    "INSTRUMENTATION_NAME",
    "BusMetrics",
    "OpenTelemetryMiddleware",
    "connect",
    "instrument_bus",
]

INSTRUMENTATION_NAME: Final = "cascade_bus"
"""The instrumentation scope name of every tracer and meter this module creates."""

DROP_REASON: Final = "cascade_bus.drop.reason"
"""Attribute naming the `DropReason` on the ``cascade_bus.dropped`` counter."""

DEFAULT_SYSTEM: Final = "cascade_bus"
"""``messaging.system`` of a middleware that is neither bound to a bus nor told its system."""

# Semantic-convention attribute names (messaging, error, server), spelled out so that the
# module needs only opentelemetry-api.
_SYSTEM = "messaging.system"
_DESTINATION = "messaging.destination.name"
_MESSAGE_ID = "messaging.message.id"
_CONVERSATION_ID = "messaging.message.conversation_id"
_OPERATION_TYPE = "messaging.operation.type"
_OPERATION_NAME = "messaging.operation.name"
_CLIENT_ID = "messaging.client.id"
_ERROR_TYPE = "error.type"
_SERVER_ADDRESS = "server.address"
_SERVER_PORT = "server.port"

_NO_PARENT = otel_context.Context()

# TLS variants of a scheme report the system itself (NATS's TLS scheme is ``tls://``).
_SYSTEM_OF_SCHEME = {
    "mqtts": "mqtt",
    "rediss": "redis",
    "redis+cluster": "redis",
    "rediss+cluster": "redis",
    "tls": "nats",
}

_DROP_REASONS: tuple[str, ...] = tuple(
    value for name, value in vars(DropReason).items() if name.isupper() and isinstance(value, str)
)


def _bus_attributes(bus: Bus) -> dict[str, str | int]:
    """Attributes that identify a bus: its system (URL scheme), client id and server."""
    url = bus.url
    system = _SYSTEM_OF_SCHEME.get(url.scheme, url.scheme)
    attributes: dict[str, str | int] = {_SYSTEM: system, _CLIENT_ID: bus.id}
    if url.port is not None and url.host:
        attributes[_SERVER_ADDRESS] = url.host
        attributes[_SERVER_PORT] = url.port
    return attributes


# -- W3C propagation -----------------------------------------------------------------------------
#
# The propagator API (getter/setter objects, a regex searched through re's cache, a context per
# propagator) costs several µs per message. When the global propagator is the default one, W3C
# Trace Context (+ W3C Baggage), ``traceparent`` is written and parsed here directly, to and from
# the SpanContext; anything else (another propagator, a ``tracestate`` to parse, a traceparent
# that is not the plain version-00 form) goes through the propagator API, so the result is the
# same either way.

_TRACEPARENT = "traceparent"
_TRACESTATE = "tracestate"
_BAGGAGE = "baggage"
_TRACEPARENT_00 = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_TRACE_FLAGS = {f"{flags:02x}": TraceFlags(flags) for flags in range(256)}

_API = 0  # through propagate.inject / propagate.extract
_W3C = 1  # traceparent by hand
_W3C_BAGGAGE = 2  # traceparent by hand, baggage through its propagator

_baggage_propagator = W3CBaggagePropagator()
_mode_of: list[tuple[object, int]] = [(None, _API)]  # the last global propagator seen


def _propagation_mode() -> int:
    """How to propagate with the global textmap propagator (re-checked when it is replaced)."""
    textmap = propagate.get_global_textmap()
    seen, mode = _mode_of[0]
    if textmap is not seen:
        mode = _API
        kinds = [type(textmap)]
        if type(textmap) is CompositePropagator:
            kinds = [type(p) for p in getattr(textmap, "_propagators", ())]
        if kinds == [TraceContextTextMapPropagator]:
            mode = _W3C
        elif kinds == [TraceContextTextMapPropagator, W3CBaggagePropagator]:
            mode = _W3C_BAGGAGE  # the API's default (OTEL_PROPAGATORS=tracecontext,baggage)
        _mode_of[0] = (textmap, mode)
    return mode


def _inject(
    carrier: dict[str, str], span_context: SpanContext, context: otel_context.Context
) -> None:
    """Write ``span_context`` (and ``context``'s baggage) into ``carrier``, as the propagator."""
    mode = _propagation_mode()
    if mode == _API:
        propagate.inject(carrier, context)
        return
    carrier[_TRACEPARENT] = "00-%032x-%016x-%02x" % (  # noqa: UP031 - the fastest spelling
        span_context.trace_id,
        span_context.span_id,
        span_context.trace_flags,
    )
    trace_state = span_context.trace_state
    if trace_state:
        carrier[_TRACESTATE] = trace_state.to_header()
    else:  # a republished envelope's tracestate belonged to the traceparent just replaced
        carrier.pop(_TRACESTATE, None)
    # A context holding nothing but the span has no baggage: skip the baggage propagator.
    if mode == _W3C_BAGGAGE and len(context) > 1:
        _baggage_propagator.inject(carrier, context)


def _extract(headers: Mapping[str, str]) -> otel_context.Context:
    """The context carried by ``headers`` (a new, empty one if none), as the propagator."""
    mode = _propagation_mode()
    if mode == _API or _TRACESTATE in headers:
        return propagate.extract(headers)
    context = _NO_PARENT
    traceparent = headers.get(_TRACEPARENT)
    if traceparent is not None:
        match = _TRACEPARENT_00.fullmatch(traceparent)
        if match is None:  # another version, whitespace, garbage: the propagator's rules
            return propagate.extract(headers)
        trace_id = int(match[1], 16)
        span_id = int(match[2], 16)
        if trace_id and span_id:  # all-zero ids are invalid: no parent
            # positionally: trace_id, span_id, is_remote, trace_flags
            span_context = SpanContext(trace_id, span_id, True, _TRACE_FLAGS[match[3]])
            context = trace.set_span_in_context(NonRecordingSpan(span_context), _NO_PARENT)
    if mode == _W3C_BAGGAGE and _BAGGAGE in headers:
        context = _baggage_propagator.extract(headers, context)
    return context


class OpenTelemetryMiddleware(Middleware):
    """Trace every publish and every handled message, and time the handlers.

    Put it first in the bus's middleware so that its spans wrap everything else::

        otel = OpenTelemetryMiddleware()
        bus = otel.bind(cascade_bus.connect(url, middleware=[otel]))

    (`connect` in this module does exactly that, plus `instrument_bus`.)

    Per publish: a span ``<topic> publish`` of kind PRODUCER, whose context the global
    propagator (W3C ``traceparent`` / ``tracestate`` by default) injects into the envelope's
    headers. Its parent is the current span or, when there is none, the context already in the
    envelope's headers (so a dead letter or a republished envelope continues its trace). When
    nothing traces (no SDK, or a no-op provider) the envelope goes on untouched. With the
    default propagator (W3C Trace Context and Baggage) ``traceparent`` is written and read
    directly, which saves a few µs per message; any other configured propagator is used as is.

    Per handled message: a span ``<topic> process`` of kind CONSUMER whose parent is extracted
    from the headers, i.e. the producer span of the publishing bus, whatever the transport. It
    is the current span while the handler runs, so spans and publishes made by the handler join
    the trace. A handler (or inner middleware) that raises marks the span ERROR with an
    ``exception`` event and ``error.type``; each retry is a span of its own.

    Span attributes follow the messaging semantic conventions: ``messaging.system`` (the
    transport's URL scheme, TLS variants folded: ``mqtt``, ``nats``, ``redis``, ``memory``),
    ``messaging.destination.name`` (the topic), ``messaging.message.id``,
    ``messaging.operation.type`` and ``messaging.operation.name`` (``publish`` / ``process``),
    ``messaging.message.conversation_id`` (the correlation id, when set), ``server.address`` /
    ``server.port`` (network transports) and ``error.type``.

    Metric: the histogram ``messaging.process.duration`` (seconds) per handled message, with
    ``messaging.system``, ``messaging.operation.name`` and, on failure, ``error.type`` (no topic:
    topics are often unbounded in number). Counters come from `instrument_bus`.

    Args:
        tracer_provider: Where spans go; default the global tracer provider.
        meter_provider: Where the histogram goes; default the global meter provider.
        system: ``messaging.system`` to report; default the URL scheme of the bus given to
            `bind` (``cascade_bus`` until then).
    """

    def __init__(
        self,
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
        *,
        system: str | None = None,
    ) -> None:
        self._tracer = trace.get_tracer(
            INSTRUMENTATION_NAME, __version__, tracer_provider=tracer_provider
        )
        meter = metrics.get_meter(INSTRUMENTATION_NAME, __version__, meter_provider=meter_provider)
        self._process_duration = meter.create_histogram(
            "messaging.process.duration",
            unit="s",
            description="Duration of handling one message (the handler and inner middleware).",
        )
        self._explicit_system = system
        self._bus: weakref.ref[Bus] | None = None
        self._configure({_SYSTEM: system or DEFAULT_SYSTEM})

    def _configure(self, base: Mapping[str, str | int]) -> None:
        self._span_publish = {**base, _OPERATION_TYPE: "publish", _OPERATION_NAME: "publish"}
        self._span_process = {**base, _OPERATION_TYPE: "process", _OPERATION_NAME: "process"}
        self._metric_process: dict[str, str | int] = {
            _SYSTEM: base[_SYSTEM],
            _OPERATION_NAME: "process",
        }

    @property
    def system(self) -> str:
        """The ``messaging.system`` this middleware reports."""
        return str(self._span_publish[_SYSTEM])

    def bind(self, bus: Bus) -> Bus:
        """Take ``messaging.system`` (the URL scheme) and the server address from ``bus``.

        Returns the bus, so that ``bus = otel.bind(connect(url, middleware=[otel]))`` reads in
        one line. A middleware instance reports for one bus: binding another one raises.

        Raises:
            ValueError: already bound to another bus.
        """
        current = self._bus() if self._bus is not None else None
        if current is not None and current is not bus:
            raise ValueError(
                f"this OpenTelemetryMiddleware is bound to {current!r}; create one per bus"
            )
        attributes = _bus_attributes(bus)
        del attributes[_CLIENT_ID]  # metrics tell buses apart; spans have the resource
        if self._explicit_system is not None:
            attributes[_SYSTEM] = self._explicit_system
        self._configure(attributes)
        self._bus = weakref.ref(bus)
        return bus

    # -- the hooks -----------------------------------------------------------------------------

    async def publish(self, env: Envelope[Any], call_next: Next) -> None:
        """Run the publish inside a PRODUCER span and carry its context in the headers."""
        headers = env.headers
        parent = None
        if headers and _TRACEPARENT in headers and not _current_is_valid():
            parent = _extract(headers)
        topic = env.topic
        attributes: dict[str, Any] = {
            **self._span_publish,
            _DESTINATION: topic,
            _MESSAGE_ID: env.id,
        }
        if env.correlation_id:
            attributes[_CONVERSATION_ID] = env.correlation_id
        span = self._tracer.start_span(
            f"{topic} publish", context=parent, kind=SpanKind.PRODUCER, attributes=attributes
        )
        span_context = span.get_span_context()
        if not span_context.is_valid:  # nothing traces: no context to carry
            await call_next(env)
            return
        context = trace.set_span_in_context(span, parent)
        token = otel_context.attach(context)
        try:
            carrier = dict(headers)
            _inject(carrier, span_context, context)
            await call_next(msgspec.structs.replace(env, headers=carrier))
        except Exception as exc:
            _failed(span, exc)
            raise
        finally:
            otel_context.detach(token)
            span.end()

    async def handle(self, env: Envelope[Any], call_next: Next) -> None:
        """Run the handler inside a CONSUMER span whose parent comes from the headers."""
        # Always an explicit parent: the worker task's ambient context (whatever was current
        # when the subscription started) must not adopt the message.
        headers = env.headers
        parent = _extract(headers) if headers else _NO_PARENT
        topic = env.topic
        attributes: dict[str, Any] = {
            **self._span_process,
            _DESTINATION: topic,
            _MESSAGE_ID: env.id,
        }
        if env.correlation_id:
            attributes[_CONVERSATION_ID] = env.correlation_id
        span = self._tracer.start_span(
            f"{topic} process", context=parent, kind=SpanKind.CONSUMER, attributes=attributes
        )
        token = otel_context.attach(trace.set_span_in_context(span, parent))
        started = time.perf_counter()
        metric_attributes = self._metric_process
        try:
            await call_next(env)
        except Exception as exc:
            metric_attributes = {**metric_attributes, _ERROR_TYPE: _failed(span, exc)}
            raise
        finally:
            self._process_duration.record(time.perf_counter() - started, metric_attributes)
            otel_context.detach(token)
            span.end()


def _current_is_valid() -> bool:
    return trace.get_current_span().get_span_context().is_valid


def _failed(span: trace.Span, exc: Exception) -> str:
    """Mark ``span`` as failed by ``exc``; return the ``error.type``."""
    error_type = type(exc).__qualname__
    if span.is_recording():
        span.record_exception(exc)
        span.set_status(Status(StatusCode.ERROR, f"{error_type}: {exc}"))
        span.set_attribute(_ERROR_TYPE, error_type)
    return error_type


# -- metrics from stats() ------------------------------------------------------------------------


class BusMetrics:
    """Observable instruments that read `Bus.stats` of every bus added, at each collection.

    One set of instruments per meter provider (see `instrument_bus`); each bus reports with
    its own attributes (``messaging.system``, ``messaging.client.id`` = the bus id, and
    ``server.address`` / ``server.port`` for network transports). Buses are held weakly.

    Instruments (``{message}`` unless noted):

    - ``cascade_bus.published``, ``cascade_bus.delivered``, ``cascade_bus.dead_lettered``,
      ``cascade_bus.duplicates``: counters, the `Stats` fields of the same name;
    - ``cascade_bus.dropped``: counter by ``cascade_bus.drop.reason`` (every `DropReason`,
      zeros included, so that a rate can be taken from the first collection on);
    - ``cascade_bus.reconnects`` (``{reconnect}``): counter;
    - ``cascade_bus.buffered``: gauge, messages in every buffer now (`Stats.buffered`);
    - ``cascade_bus.offline_buffer.depth``: gauge, messages the transport holds for a broker
      it is not connected to (0 for transports without an offline buffer).

    Args:
        meter_provider: Where the instruments live; default the global meter provider.
    """

    def __init__(self, meter_provider: MeterProvider | None = None) -> None:
        meter = metrics.get_meter(INSTRUMENTATION_NAME, __version__, meter_provider=meter_provider)
        self._buses: weakref.WeakKeyDictionary[Bus, dict[str, str | int]] = (
            weakref.WeakKeyDictionary()
        )
        counters = {
            "cascade_bus.published": ("Messages the transport accepted.", self._published),
            "cascade_bus.delivered": ("Messages handed to a handler or iterator.", self._delivered),
            "cascade_bus.dead_lettered": (
                "Messages moved to a dead-letter topic after every attempt failed.",
                self._dead_lettered,
            ),
            "cascade_bus.duplicates": (
                "Redeliveries the transport noticed (at-least-once).",
                self._duplicates,
            ),
            "cascade_bus.dropped": ("Messages lost, by reason (the loss ledger).", self._dropped),
        }
        for name, (description, callback) in counters.items():
            meter.create_observable_counter(
                name, callbacks=[callback], unit="{message}", description=description
            )
        meter.create_observable_counter(
            "cascade_bus.reconnects",
            callbacks=[self._reconnects],
            unit="{reconnect}",
            description="Times the transport reconnected after losing the broker.",
        )
        meter.create_observable_gauge(
            "cascade_bus.buffered",
            callbacks=[self._buffered],
            unit="{message}",
            description="Messages waiting in buffers (offline buffer and subscription queues).",
        )
        meter.create_observable_gauge(
            "cascade_bus.offline_buffer.depth",
            callbacks=[self._offline],
            unit="{message}",
            description="Messages held for a broker the transport is not connected to.",
        )

    def add(self, bus: Bus) -> None:
        """Report ``bus`` from the next collection on (idempotent)."""
        self._buses[bus] = _bus_attributes(bus)

    def remove(self, bus: Bus) -> None:
        """Stop reporting ``bus`` (idempotent)."""
        self._buses.pop(bus, None)

    def __contains__(self, bus: object) -> bool:
        return bus in self._buses

    def _snapshots(self) -> list[tuple[Stats, dict[str, str | int]]]:
        return [(bus.stats(), attributes) for bus, attributes in list(self._buses.items())]

    def _field(self, name: str) -> Iterable[Observation]:
        return [Observation(getattr(s, name), attrs) for s, attrs in self._snapshots()]

    def _published(self, options: CallbackOptions) -> Iterable[Observation]:
        return self._field("published")

    def _delivered(self, options: CallbackOptions) -> Iterable[Observation]:
        return self._field("delivered")

    def _dead_lettered(self, options: CallbackOptions) -> Iterable[Observation]:
        return self._field("dead_lettered")

    def _duplicates(self, options: CallbackOptions) -> Iterable[Observation]:
        return self._field("duplicates")

    def _reconnects(self, options: CallbackOptions) -> Iterable[Observation]:
        return self._field("reconnects")

    def _buffered(self, options: CallbackOptions) -> Iterable[Observation]:
        return self._field("buffered")

    def _dropped(self, options: CallbackOptions) -> Iterable[Observation]:
        observations: list[Observation] = []
        for stats, attributes in self._snapshots():
            reasons = dict.fromkeys(_DROP_REASONS, 0)
            reasons.update(stats.dropped)
            observations.extend(
                Observation(count, {**attributes, DROP_REASON: reason})
                for reason, count in reasons.items()
            )
        return observations

    def _offline(self, options: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(int(getattr(bus.transport, "buffered", 0)), attributes)
            for bus, attributes in list(self._buses.items())
        ]


_metrics_by_provider: weakref.WeakKeyDictionary[Any, BusMetrics] = weakref.WeakKeyDictionary()


def instrument_bus(bus: Bus, meter_provider: MeterProvider | None = None) -> BusMetrics:
    """Report ``bus.stats()`` as OpenTelemetry metrics (see `BusMetrics`) until it is gone.

    Instruments are created once per meter provider and shared by every bus instrumented with
    it; calling this twice for one bus changes nothing.

    Args:
        bus: The bus to report.
        meter_provider: Where the metrics go; default the global meter provider.

    Returns:
        The `BusMetrics` of that provider (``remove(bus)`` stops reporting the bus).
    """
    provider = meter_provider if meter_provider is not None else metrics.get_meter_provider()
    bus_metrics = _metrics_by_provider.get(provider)
    if bus_metrics is None:
        bus_metrics = BusMetrics(provider)
        _metrics_by_provider[provider] = bus_metrics
    bus_metrics.add(bus)
    return bus_metrics


def connect(
    url: str | BusURL,
    *,
    tracer_provider: TracerProvider | None = None,
    meter_provider: MeterProvider | None = None,
    middleware: Sequence[Middleware] = (),
    on_error: ErrorHook | None = None,
    **options: Any,
) -> Bus:
    """Like `cascade_bus.connect`, with tracing and metrics switched on.

    The bus gets an `OpenTelemetryMiddleware` (outermost, bound to it) and `instrument_bus`.

    Args:
        url: The broker URL, as for `cascade_bus.connect`.
        tracer_provider: Where spans go; default the global tracer provider.
        meter_provider: Where metrics go; default the global meter provider.
        middleware: More middleware, inside the OpenTelemetry one.
        on_error: The error hook, as for `cascade_bus.connect`.
        **options: Bus and transport options, as for `cascade_bus.connect`.
    """
    otel = OpenTelemetryMiddleware(tracer_provider, meter_provider)
    bus = otel.bind(_connect(url, on_error=on_error, middleware=[otel, *middleware], **options))
    instrument_bus(bus, meter_provider)
    return bus
