"""Fault cases every network transport runs unchanged: outages, resync, hostile input.

Subclass `FaultSuite` as the conformance suite is subclassed (set ``url`` or override
``transport_url``). The ``outage`` fixture puts a `TcpProxy` between the buses under test and
the broker, so a case can cut every connection and refuse new ones while another bus, connected
directly, changes the broker's state; nothing else on the broker is disturbed. Transports
without a TCP endpoint (memory://) skip the outage cases with a reason.

Hooks a subclass may override: ``send_internal_junk`` (junk on the transport's own channels).
"""

from __future__ import annotations

from ._cases_hostile import HostileCases
from ._cases_outage import OutageCases
from ._cases_presence_outage import PresenceOutageCases
from ._fault_base import (
    DEFAULT_PORTS,
    JUNK_ENVELOPE,
    FaultBase,
    Outage,
    Restartable,
    network,
    raw_envelope,
)

__all__ = [
    "DEFAULT_PORTS",
    "JUNK_ENVELOPE",
    "FaultBase",
    "FaultSuite",
    "Outage",
    "Restartable",
    "network",
    "raw_envelope",
]


# pytest collects the last base's cases first: outages first, then the rest.
class FaultSuite(PresenceOutageCases, HostileCases, OutageCases):
    """Outage and hostile-input cases; subclass it as ``TestSomethingFaults`` with the URL.

    Class attributes to tune: ``reconnect_options`` (passed to every bus behind the proxy),
    ``wait_timeout`` (any single wait, reconnects included), ``live_retain_known``,
    ``restart_load``. Hooks: ``send_internal_junk``, ``restartable_broker``,
    ``durable_options``.
    """
