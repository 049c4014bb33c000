"""The kit's `Waiters`: futures settled by their token's arrival, failed all at once."""

from __future__ import annotations

import asyncio

import pytest

from cascade_bus import ConnectionLost
from cascade_bus.spi import Waiters


async def test_arrival_settles_only_its_own_waiter() -> None:
    waiters = Waiters()
    first, second = waiters.add(b"1"), waiters.add(b"2")
    assert waiters.arrived(b"2")
    assert second.done()
    assert not first.done()
    assert b"1" in waiters
    assert b"2" not in waiters
    assert len(waiters) == 1


async def test_a_late_or_unknown_token_is_told_apart() -> None:
    waiters = Waiters()
    waiters.add(b"7")
    waiters.discard(b"7")  # the waiter gave up (a timeout, a cancel)
    assert not waiters.arrived(b"7")
    assert not waiters.arrived(b"forged")


async def test_fail_all_fails_every_waiter_and_empties_the_table() -> None:
    waiters = Waiters()
    futures = [waiters.add(b"%d" % i) for i in range(3)]
    waiters.fail_all(ConnectionLost("gone"))
    assert len(waiters) == 0
    for fut in futures:
        with pytest.raises(ConnectionLost, match="gone"):
            await fut


async def test_a_cancelled_waiter_is_skipped_by_arrival_and_failure() -> None:
    waiters = Waiters()
    cancelled, live = waiters.add(b"1"), waiters.add(b"2")
    cancelled.cancel()
    assert waiters.arrived(b"1")  # ours, though nobody waits any more: no error
    waiters.fail_all(ConnectionLost("gone"))
    assert cancelled.cancelled()
    with pytest.raises(ConnectionLost):
        await asyncio.wait_for(live, 1.0)
