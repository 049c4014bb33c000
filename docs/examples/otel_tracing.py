"""OpenTelemetry: one trace from the publishing bus to the handler, and the bus's counters.

Needs ``pip install 'cascade-bus[otel]' opentelemetry-sdk``. A real application configures an
exporter (OTLP, console, ...); the in-memory ones here let the example print what it recorded.
"""

import asyncio
from typing import Any

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    HistogramDataPoint,
    InMemoryMetricReader,
    NumberDataPoint,
)
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import cascade_bus
import cascade_bus.otel
from cascade_bus import Envelope
from cascade_bus.otel import OpenTelemetryMiddleware, instrument_bus

spans = InMemorySpanExporter()
tracer_provider = TracerProvider()
tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
reader = InMemoryMetricReader()
meter_provider = MeterProvider(metric_readers=[reader])


async def main() -> None:
    """Publish on one bus, handle on another, then print the spans and the metrics."""
    url = "memory://otel-demo"
    # The one-liner: tracing middleware (bound to the bus) plus metrics from stats().
    shop = cascade_bus.otel.connect(
        url, tracer_provider=tracer_provider, meter_provider=meter_provider
    )
    # The same by hand: the middleware first (outermost), bind() tells it the transport.
    otel = OpenTelemetryMiddleware(tracer_provider, meter_provider)
    warehouse = otel.bind(cascade_bus.connect(url, middleware=[otel]))
    instrument_bus(warehouse, meter_provider)

    shipped = asyncio.Event()

    async def ship(env: Envelope[Any]) -> None:
        print("handler sees traceparent:", "traceparent" in env.headers)
        shipped.set()

    async with shop, warehouse:
        await warehouse.subscribe("orders/+/created", ship)
        await shop.publish("orders/42/created", {"sku": "tea", "qty": 2})
        await shipped.wait()

    producer, consumer = spans.get_finished_spans()
    for span in (producer, consumer):
        print(f"span {span.name!r} kind={span.kind.name}")
    print("messaging.system:", dict(producer.attributes or {})["messaging.system"])
    parent, context = consumer.parent, producer.get_span_context()
    linked = (
        parent is not None
        and context is not None
        and (parent.trace_id, parent.span_id) == (context.trace_id, context.span_id)
    )
    print("consumer's parent is the producer:", linked)

    for name, value in metric_values().items():
        print(f"{name} = {value}")


def metric_values() -> dict[str, float]:
    """Sum every data point of the metrics this example prints (histograms: their count)."""
    wanted = ("cascade_bus.published", "cascade_bus.delivered", "messaging.process.duration")
    values: dict[str, float] = {}
    data = reader.get_metrics_data()
    for resource_metrics in data.resource_metrics if data else ():
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                if metric.name not in wanted:
                    continue
                for point in metric.data.data_points:
                    if isinstance(point, HistogramDataPoint):
                        values[metric.name] = values.get(metric.name, 0) + point.count
                    elif isinstance(point, NumberDataPoint):
                        values[metric.name] = values.get(metric.name, 0) + point.value
    return dict(sorted(values.items()))


if __name__ == "__main__":
    asyncio.run(main())
