"""W3C context propagation through envelope headers, fast for the default propagator.

``inject`` / ``extract`` behave exactly as the global textmap propagator; when that is the
default one (W3C Trace Context, + Baggage) ``traceparent`` is written and parsed by hand.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

__all__ = ["NO_PARENT", "TRACEPARENT", "extract", "inject"]

NO_PARENT = otel_context.Context()
"""An empty context: "no parent", whatever is current."""

# The propagator API (getter/setter objects, a regex searched through re's cache, a context per
# propagator) costs several µs per message. When the global propagator is the default one, W3C
# Trace Context (+ W3C Baggage), ``traceparent`` is written and parsed here directly, to and from
# the SpanContext; anything else (another propagator, a ``tracestate`` to parse, a traceparent
# that is not the plain version-00 form) goes through the propagator API, so the result is the
# same either way.

TRACEPARENT = "traceparent"
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


def inject(
    carrier: dict[str, str], span_context: SpanContext, context: otel_context.Context
) -> None:
    """Write ``span_context`` (and ``context``'s baggage) into ``carrier``, as the propagator."""
    mode = _propagation_mode()
    if mode == _API:
        propagate.inject(carrier, context)
        return
    carrier[TRACEPARENT] = "00-%032x-%016x-%02x" % (  # noqa: UP031 - the fastest spelling
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


def extract(headers: Mapping[str, str]) -> otel_context.Context:
    """The context carried by ``headers`` (a new, empty one if none), as the propagator."""
    mode = _propagation_mode()
    if mode == _API or _TRACESTATE in headers:
        return propagate.extract(headers)
    context = NO_PARENT
    traceparent = headers.get(TRACEPARENT)
    if traceparent is not None:
        match = _TRACEPARENT_00.fullmatch(traceparent)
        if match is None:  # another version, whitespace, garbage: the propagator's rules
            return propagate.extract(headers)
        trace_id = int(match[1], 16)
        span_id = int(match[2], 16)
        if trace_id and span_id:  # all-zero ids are invalid: no parent
            # positionally: trace_id, span_id, is_remote, trace_flags
            span_context = SpanContext(trace_id, span_id, True, _TRACE_FLAGS[match[3]])
            context = trace.set_span_in_context(NonRecordingSpan(span_context), NO_PARENT)
    if mode == _W3C_BAGGAGE and _BAGGAGE in headers:
        context = _baggage_propagator.extract(headers, context)
    return context
