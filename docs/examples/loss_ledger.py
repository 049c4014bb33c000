"""The loss ledger: every message that did not reach a handler is counted, with its reason."""

import asyncio
import contextlib
import logging
import sys
from typing import Any

import msgspec

import cascade_bus
from cascade_bus import Envelope, PayloadTooLarge

# The first overflow of a bus logs one warning; show it on stdout for this example.
logging.basicConfig(stream=sys.stdout, format="log: %(message)s")


class Reading(msgspec.Struct):
    """What the typed subscription expects."""

    celsius: float


async def main() -> None:
    """Provoke one loss of each kind memory:// can have, then read stats()."""
    errors: list[str] = []

    def on_error(error: Exception, topic: str, env: Envelope[Any] | None) -> None:
        errors.append(type(error).__name__)

    handled = asyncio.Event()

    def record(env: Envelope[Reading]) -> None:
        if env.payload.celsius > 100:
            raise ValueError("sensor out of range")
        handled.set()

    url = "memory://ledger?max_payload=512"
    bus = await cascade_bus.connect(url, on_error=on_error, close_timeout=1)
    await bus.subscribe("plant/temp", record, type=Reading)
    await bus.publish("plant/temp", {"celsius": 21.5})  # delivered
    await bus.publish("plant/temp", {"celsius": "warm"})  # decode_error: not a Reading
    await bus.publish("plant/temp", {"celsius": 999.0})  # handler_error: the handler raised
    with contextlib.suppress(PayloadTooLarge):  # payload_too_large: refused, never sent
        await bus.publish("plant/temp", {"celsius": 1.0, "note": "x" * 600})

    backlog = await bus.subscribe("plant/#", buffer_size=2, overflow="drop_newest")
    for celsius in (1.0, 2.0, 3.0):
        await bus.publish("plant/level", {"celsius": celsius})  # the third: overflow
    await backlog.unsubscribe()  # the 2 it still queued: unsubscribed

    audit = await bus.subscribe("plant/#")  # an iterator nobody reads
    await bus.publish("plant/level", {"celsius": 4.0})
    await handled.wait()
    await bus.close()  # what audit still queued: closed

    stats = bus.stats()
    print("published:", stats.published)
    print("delivered:", stats.delivered)
    for reason, count in sorted(stats.dropped.items()):
        print(f"dropped {reason}: {count}")
    print("errors reported:", sorted(errors))
    # Each published message reached one subscription here, so the ledger balances exactly:
    lost = stats.dropped_total - stats.dropped.get("payload_too_large", 0)
    print(f"{stats.published} published = {stats.delivered} delivered + {lost} lost, all counted")
    print(f"still queued: {audit.pending}, buffered: {stats.buffered}")


if __name__ == "__main__":
    asyncio.run(main())
