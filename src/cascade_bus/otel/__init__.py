"""OpenTelemetry for cascade-bus: one trace per message across buses, and the bus's counters.

Install the extra (``pip install 'cascade-bus[otel]'``, which needs only ``opentelemetry-api``)
and configure an SDK as usual; without one every call is a no-op. `OpenTelemetryMiddleware`
traces publishes and handled messages, `instrument_bus` reports `Stats` as metrics, and
`connect` does both. The core package never imports this one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

try:
    import opentelemetry.trace  # noqa: F401 - checked here, before the modules that use it
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "cascade_bus.otel needs OpenTelemetry: pip install 'cascade-bus[otel]' "
        "(or opentelemetry-api)"
    ) from exc

from .._bus import Bus, ErrorHook
from .._bus import connect as _connect
from .._middleware import Middleware
from .._url import BusURL
from ._common import DEFAULT_SYSTEM, DROP_REASON, INSTRUMENTATION_NAME
from ._metrics import BusMetrics, instrument_bus
from ._tracing import OpenTelemetryMiddleware

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
