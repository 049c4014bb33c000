"""Errors: one root, typed subclasses, and counters for what the bus absorbs."""

import asyncio
from typing import Any

import cascade_bus
from cascade_bus import BusError, Envelope, InvalidTopic, PayloadTooLarge, UnknownScheme


async def main() -> None:
    """Trigger a few typed errors and show that a failing handler is only counted."""
    try:
        cascade_bus.connect("mqqt://broker.example:1883")
    except UnknownScheme as exc:
        print("UnknownScheme:", exc.scheme, "-> did you mean", exc.suggestion)

    reported = asyncio.Event()

    def on_error(error: Exception, topic: str, env: Envelope[Any] | None) -> None:
        print(f"on_error: {type(error).__name__}: {error} (topic {topic})")
        reported.set()

    # Options come from the URL query or keywords; on_error replaces the default log line.
    url = "memory://errors?max_payload=1024"
    async with cascade_bus.connect(url, on_error=on_error) as bus:
        try:
            await bus.publish("alerts/+", {"level": "high"})  # no wildcards when publishing
        except InvalidTopic as exc:
            print("InvalidTopic:", exc.topic)

        try:
            await bus.publish("alerts/big", "x" * 4096)
        except PayloadTooLarge as exc:
            print(f"PayloadTooLarge: {exc.size} > {exc.limit}")

        def flaky(env: Envelope[dict[str, int]]) -> None:
            raise RuntimeError("handler bug")

        # A handler that raises does not stop its subscription (or any other):
        # the error goes to the on_error hook and is counted in stats().
        async with bus.subscribe("alerts/#", flaky):
            await bus.publish("alerts/disk", {"free": 1})
            await asyncio.wait_for(reported.wait(), timeout=1.0)
        print("dropped:", bus.stats().dropped)

        try:
            await bus.publish("alerts/#", {})
        except BusError as exc:  # every cascade-bus error derives from BusError
            print("caught by the root:", type(exc).__name__)


if __name__ == "__main__":
    asyncio.run(main())
