"""Tracing middleware: a PRODUCER span per publish, a CONSUMER span per handled message.

The producer span's context travels in the envelope headers, so the consumer span on any bus,
over any transport, continues the same trace; handler durations go to a histogram.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import msgspec
from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from .. import __version__
from .._envelope import Envelope
from .._middleware import Middleware, Next
from ._common import (
    CLIENT_ID,
    CONVERSATION_ID,
    DEFAULT_SYSTEM,
    DESTINATION,
    ERROR_TYPE,
    INSTRUMENTATION_NAME,
    MESSAGE_ID,
    OPERATION_NAME,
    OPERATION_TYPE,
    SYSTEM,
    bus_attributes,
)
from ._propagation import NO_PARENT, TRACEPARENT, extract, inject

if TYPE_CHECKING:
    from opentelemetry.metrics import MeterProvider
    from opentelemetry.trace import TracerProvider

    from .._bus import Bus

__all__ = ["OpenTelemetryMiddleware"]


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
        self._configure({SYSTEM: system or DEFAULT_SYSTEM})

    def _configure(self, base: Mapping[str, str | int]) -> None:
        self._span_publish = {**base, OPERATION_TYPE: "publish", OPERATION_NAME: "publish"}
        self._span_process = {**base, OPERATION_TYPE: "process", OPERATION_NAME: "process"}
        self._metric_process: dict[str, str | int] = {
            SYSTEM: base[SYSTEM],
            OPERATION_NAME: "process",
        }

    @property
    def system(self) -> str:
        """The ``messaging.system`` this middleware reports."""
        return str(self._span_publish[SYSTEM])

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
        attributes = bus_attributes(bus)
        del attributes[CLIENT_ID]  # metrics tell buses apart; spans have the resource
        if self._explicit_system is not None:
            attributes[SYSTEM] = self._explicit_system
        self._configure(attributes)
        self._bus = weakref.ref(bus)
        return bus

    # -- the hooks -----------------------------------------------------------------------------

    async def publish(self, env: Envelope[Any], call_next: Next) -> None:
        """Run the publish inside a PRODUCER span and carry its context in the headers."""
        headers = env.headers
        parent = None
        if headers and TRACEPARENT in headers and not _current_is_valid():
            parent = extract(headers)
        topic = env.topic
        attributes: dict[str, Any] = {
            **self._span_publish,
            DESTINATION: topic,
            MESSAGE_ID: env.id,
        }
        if env.correlation_id:
            attributes[CONVERSATION_ID] = env.correlation_id
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
            inject(carrier, span_context, context)
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
        parent = extract(headers) if headers else NO_PARENT
        topic = env.topic
        attributes: dict[str, Any] = {
            **self._span_process,
            DESTINATION: topic,
            MESSAGE_ID: env.id,
        }
        if env.correlation_id:
            attributes[CONVERSATION_ID] = env.correlation_id
        span = self._tracer.start_span(
            f"{topic} process", context=parent, kind=SpanKind.CONSUMER, attributes=attributes
        )
        token = otel_context.attach(trace.set_span_in_context(span, parent))
        started = time.perf_counter()
        metric_attributes = self._metric_process
        try:
            await call_next(env)
        except Exception as exc:
            metric_attributes = {**metric_attributes, ERROR_TYPE: _failed(span, exc)}
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
        span.set_attribute(ERROR_TYPE, error_type)
    return error_type
