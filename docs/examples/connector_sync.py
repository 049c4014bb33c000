"""Publishing from synchronous engine code, on the loop's thread or any other."""

import asyncio
from typing import Any

from cascade_bus import Connector


def report_state(connector: Connector, state: str) -> None:
    """Synchronous engine code: schedule the publish and return at once."""
    connector.publish_soon("cascade/telemetry/run-1/load/1/events", {"state": state})


async def main() -> None:
    """Publish one event from plain code and one from a worker thread."""
    connector = Connector("memory://sync")
    await connector.connect()
    states: list[str] = []
    both = asyncio.Event()

    async def on_event(topic: str, payload: dict[str, Any]) -> None:
        states.append(payload["state"])
        if len(states) == 2:
            both.set()

    await connector.subscribe("cascade/telemetry/#", on_event)
    report_state(connector, "pending")  # synchronous code running on the event loop's thread
    await asyncio.to_thread(report_state, connector, "running")  # another thread
    await asyncio.wait_for(both.wait(), timeout=1.0)
    await connector.disconnect()  # waits for scheduled publishes
    print("received:", states)


if __name__ == "__main__":
    asyncio.run(main())
