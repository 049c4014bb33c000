"""The `Bus`: publish, subscribe, request/reply and the counters, over any `Transport`.

`Bus` is assembled from one part per concern, each in its own module: shared state and
options (`_bus_core`), open/close (`_bus_lifecycle`), publishing (`_bus_publish`),
subscribing (`_bus_subscribe`) and request/reply (`_bus_request`).
"""

from __future__ import annotations

from typing import Any

from ._bus_request import BusRequests
from ._host import ErrorHook
from ._stats import Stats
from ._url import BusURL

__all__ = ["Bus", "ErrorHook", "connect"]


class Bus(BusRequests):
    """A connection to one broker through one transport, with envelopes and dispatch.

    Build it with `connect` (or directly) and open it with ``async with`` or ``await
    bus.open()``. A bus is single-use: once closed it cannot be reopened (make a new one).

    Args:
        url: The broker URL, e.g. ``"memory://"``, ``"mqtt://user:pass@host:1883"``. Query
            parameters are options; keyword options override them.
        transport: A ready-made `Transport` instance instead of a URL.
        on_error: Called with every error the bus absorbs instead of raising (a failing
            handler, an undecodable message); the default logs it.
        middleware: `Middleware` instances wrapping every publish and every handler call of
            this bus, first = outermost (OpenTelemetry, metrics, auditing).
        **options: Bus options (below) and transport options (see each transport's docs).

    The bus options (in the URL query or as keywords) are:

    - ``format``: ``json`` (default; the CloudEvents envelope), ``msgpack``, or ``raw`` (the
      bare payload; metadata in native headers where the transport has them).
    - ``source``: the CloudEvents ``source`` of published envelopes.
    - ``buffer_size``: messages each subscription queues before flow control (10,000).
    - ``connect_timeout``, ``publish_timeout``, ``subscribe_timeout``, ``close_timeout``,
      ``flow_timeout``, ``retained_timeout``: bounds, in seconds, for every wait in the bus.
    - ``inbox_prefix``: topic prefix for request/reply inboxes (``_inbox``).
    - ``dedupe``: suppress a message whose envelope id each subscription saw among its last
      ``dedupe`` messages (0, the default: off); suppressed ones count as duplicates.
    - ``presence``: a topic (or True for ``cascade/status/<host>-<pid>``) that holds a
      retained ``presence_online`` body (``{"status": "online"}``) while the bus is open and
      ``presence_offline`` (``{"status": "offline"}``) after close or a crash; how fast a
      crash shows depends on the transport (docs/presence.md). ``presence_interval``
      (5 s) paces the lease renewals where presence is emulated (NATS, Redis): offline within
      5 intervals of a crash. ``presence_sweep``: also turn lapsed leases of other buses into
      offline without announcing this bus (watchers).

    Raises:
        UnknownScheme: no transport is installed for the URL's scheme.
        InvalidURL: the URL or an option is invalid.
        UnsupportedFeature: ``presence`` on a transport that does not declare it.
    """

    @property
    def presence_topic(self) -> str | None:
        """The topic this bus keeps its online/offline status on (option ``presence``)."""
        return self._presence.topic if self._presence is not None else None

    def stats(self) -> Stats:
        """Return a snapshot of the counters (published, delivered, dropped by reason, ...)."""
        buffered = sum(s.pending for s in self._subs) + self.transport.buffered
        return self._stats.snapshot(buffered=buffered)


def connect(url: str | BusURL, *, on_error: ErrorHook | None = None, **options: Any) -> Bus:
    """Create a `Bus` for ``url``; open it with ``async with`` or ``await``.

    ``async with cascade_bus.connect("memory://") as bus: ...`` or
    ``bus = await cascade_bus.connect("mqtt://localhost:1883")``.

    Raises:
        UnknownScheme: no transport for the URL scheme (suggests the closest one and the
            package to install).
        InvalidURL: the URL or an option is invalid.
    """
    return Bus(url, on_error=on_error, **options)
