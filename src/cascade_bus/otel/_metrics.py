"""Metrics from `Bus.stats`: observable counters and gauges, one set per meter provider.

Each instrumented bus reports with its own attributes; buses are held weakly.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

from .. import __version__
from .._stats import DropReason, Stats
from ._common import DROP_REASON, INSTRUMENTATION_NAME, bus_attributes

if TYPE_CHECKING:
    from opentelemetry.metrics import MeterProvider

    from .._bus import Bus

__all__ = ["BusMetrics", "instrument_bus"]

_DROP_REASONS: tuple[str, ...] = tuple(
    value for name, value in vars(DropReason).items() if name.isupper() and isinstance(value, str)
)


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
        self._buses[bus] = bus_attributes(bus)

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
