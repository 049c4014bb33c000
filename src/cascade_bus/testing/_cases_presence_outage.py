"""Fault case: presence through an outage (offline while cut off, online again once back)."""

from __future__ import annotations

from .._presence import CRASH_BOUND_INTERVALS
from ._cases_presence import INTERVAL, OFFLINE, ONLINE, SLACK
from ._fault_base import FaultBase, Outage
from ._helpers import BusFactory, Collector

__all__ = ["PresenceOutageCases"]


class PresenceOutageCases(FaultBase):
    """The network, not the process, goes: the same bound as a crash, then back online."""

    async def test_presence_through_an_outage(
        self, make_bus: BusFactory, outage: Outage, topic: str
    ) -> None:
        """Cut off: offline within the bound; reconnected: online again; closed: offline."""
        observer = await make_bus(presence_sweep=True, presence_interval=INTERVAL)
        self.require(observer, "presence")
        status = f"{topic}/cut"
        victim = await self.behind(make_bus, outage, presence=status, presence_interval=INTERVAL)
        seen = Collector()
        await observer.subscribe(status, seen, qos=1)
        assert seen.payloads == [ONLINE]
        bound = INTERVAL * CRASH_BOUND_INTERVALS + SLACK

        await outage.begin(victim)
        await seen.wait_count(2, bound)
        assert seen.payloads == [ONLINE, OFFLINE]
        await outage.end(victim)
        # Leases: the next renewal finds its lease claimed and announces again.
        await seen.wait_count(3, bound)
        assert seen.payloads == [ONLINE, OFFLINE, ONLINE]

        await victim.close()
        await seen.wait_count(4, self.wait_timeout)
        assert seen.payloads == [ONLINE, OFFLINE, ONLINE, OFFLINE]
