"""The conformance suite every cascade-bus transport runs unchanged: `ConformanceSuite`.

The cases live in themed mixins (``_cases_*.py``) over `SuiteBase`; this module composes them
and keeps the public names (the suite, its helpers and its data, e.g. `WILDCARD_MATRIX`).
"""

from __future__ import annotations

from ._base import SuiteBase
from ._cases_cascade import CascadeCases
from ._cases_delivery import DeliveryCases
from ._cases_lifecycle import LifecycleCases
from ._cases_messaging import MessagingCases
from ._cases_presence import PresenceCases
from ._cases_queues_requests import QueueRequestCases
from ._cases_retained import RetainedCases
from ._helpers import (
    SENTINEL_KEY,
    BusFactory,
    CallbackRecorder,
    Collector,
    ConnectorFactory,
    ErrorRecorder,
    Reading,
    Signal,
    is_sentinel,
    sentinel,
    with_query,
)
from ._suite_data import (
    ODD_LEVELS,
    RAW_ROUND_TRIP_PAYLOADS,
    ROUND_TRIP_PAYLOADS,
    WILDCARD_MATRIX,
    WILDCARD_TOPICS,
)

__all__ = [
    "ODD_LEVELS",
    "RAW_ROUND_TRIP_PAYLOADS",
    "ROUND_TRIP_PAYLOADS",
    "SENTINEL_KEY",
    "WILDCARD_MATRIX",
    "WILDCARD_TOPICS",
    "BusFactory",
    "CallbackRecorder",
    "Collector",
    "ConformanceSuite",
    "ConnectorFactory",
    "ErrorRecorder",
    "Reading",
    "Signal",
    "SuiteBase",
    "is_sentinel",
    "sentinel",
    "with_query",
]


# pytest collects the cases of the last base first: listed in reverse, so they run from round
# trips to the Cascade scenarios, as they read.
class ConformanceSuite(
    PresenceCases,
    CascadeCases,
    LifecycleCases,
    QueueRequestCases,
    RetainedCases,
    DeliveryCases,
    MessagingCases,
    SuiteBase,
):
    """The conformance cases; subclass it as ``TestSomething`` and provide the URL.

    Set the class attribute ``url``::

        from cascade_bus.testing import ConformanceSuite

        class TestMemory(ConformanceSuite):
            url = "memory://conformance"

    or, when the URL comes from another fixture (a broker started for the session)::

        class TestMqtt(ConformanceSuite):
            @pytest.fixture
            def transport_url(self, mqtt_url: str) -> str:
                return mqtt_url

    The fixtures are `SuiteBase`'s (``make_bus``, ``bus``, ``unique``, ``topic``,
    ``make_connector``). Every case is an ``async def`` test marked ``pytest.mark.asyncio``, so
    the suite runs under pytest-asyncio in ``auto`` and ``strict`` mode alike. Cases that need a
    feature a transport may lack ask its `Capabilities` first and are skipped with a reason
    naming the missing capability (``"nats lacks capability: retain"``); everything else must
    pass. The cases follow Watermill's universal Pub/Sub tests: round trips, the wildcard
    matrix, ordering, concurrency, handler failures, retained messages, queue groups,
    request/reply, closing, the Cascade `Connector` scenarios and bad input.

    Rules the cases keep, so a transport on a shared broker can run them in parallel: each test
    publishes under its own unique prefix (the ``topic`` fixture, ``conf/<hex>``), every wait is
    bounded by ``asyncio.timeout``, nothing sleeps to synchronise (a *sentinel* message
    published last tells a subscriber it has seen everything before it), and retained messages
    a test leaves under its prefix are cleared when the test ends.
    """
