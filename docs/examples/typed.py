"""Typed payloads: decode straight into a msgspec Struct, with a typed error on mismatch."""

import asyncio
from typing import Any

import msgspec

import cascade_bus
from cascade_bus import DecodeError, Envelope


class Reading(msgspec.Struct):
    """One sensor reading."""

    sensor: str
    celsius: float


async def main() -> None:
    """Publish a good and a bad reading to a subscription typed as ``Reading``."""
    errors: list[str] = []

    def on_error(error: Exception, topic: str, env: Envelope[Any] | None) -> None:
        if isinstance(error, DecodeError):
            errors.append(f"{topic}: {error}")

    async with cascade_bus.connect("memory://typed", on_error=on_error) as bus:
        async with bus.subscribe("readings/#", type=Reading) as sub:
            await bus.publish("readings/a", Reading(sensor="a", celsius=20.5))
            await bus.publish("readings/b", {"sensor": "b", "celsius": "warm"})
            env = await sub.get(timeout=1.0)
            reading: Reading = env.payload  # already a Reading, not a dict
            print("got", reading)
            try:
                await sub.get(timeout=0.1)
            except TimeoutError:
                print("the bad reading never reached the iterator")
        print("on_error got:", errors)
        print("dropped:", bus.stats().dropped)


if __name__ == "__main__":
    asyncio.run(main())
