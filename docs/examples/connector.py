"""Cascade's Connector: dict payloads, async callbacks, a retained pause and its release."""

import asyncio
from typing import Any

from cascade_bus import Connector


async def main() -> None:
    """A controller pauses run-1 before the engine starts; the engine sees it at once."""
    controller = Connector("memory://cascade")
    engine = Connector("memory://cascade")
    await controller.connect()
    await engine.connect()

    paused: dict[str, bool] = {}
    resumed = asyncio.Event()

    async def on_constraint(topic: str, payload: dict[str, Any]) -> None:
        run = topic.rsplit("/", 1)[-1]
        paused[run] = bool(payload.get("paused"))  # {} means: constraint cleared
        print("engine got", topic, payload)
        if not paused[run]:
            resumed.set()

    # A retained constraint, set before anyone subscribes ...
    await controller.publish(
        "cascade/constraints/run-1", {"paused": True, "reason": "maintenance"}, retain=True
    )
    # ... is in force by the time subscribe() returns.
    await engine.subscribe("cascade/constraints/#", on_constraint)
    print("run-1 paused at start:", paused["run-1"])

    # Telemetry is plain dicts; publish() never raises into the engine.
    await engine.publish("cascade/telemetry/run-1/extract/1/events", {"state": "pending"}, qos=1)

    # An empty retained payload clears the constraint; subscribers receive {}.
    await controller.publish("cascade/constraints/run-1", {}, retain=True)
    await asyncio.wait_for(resumed.wait(), timeout=1.0)
    print("run-1 paused now:", paused["run-1"], "| failed publishes:", engine.publish_failures)

    await engine.disconnect()
    await controller.disconnect()


if __name__ == "__main__":
    asyncio.run(main())
