"""A Cascade pause constraint and telemetry over nats:// (needs a NATS server).

Uses CASCADE_BUS_NATS_URL, or the server on its standard port on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from typing import Any

import cascade_bus

URL = os.environ.get("CASCADE_BUS_NATS_URL", "nats://127.0.0.1:4222")


async def main() -> None:
    """Set a retained pause, then see it (and live telemetry) from a new subscriber."""
    run = f"run-{uuid.uuid4().hex[:8]}"  # unique: the server may be shared
    seen: list[Any] = []
    async with cascade_bus.connect(URL) as bus:
        await bus.publish(f"cascade/constraints/{run}", {"paused": True}, retain=True, qos=1)
        await bus.subscribe(f"cascade/constraints/{run}", lambda env: seen.append(env.payload))
        print("retained before subscribe() returned:", seen)  # already delivered
        async with bus.subscribe(f"cascade/telemetry/{run}/+/+/events") as telemetry:
            await bus.publish(f"cascade/telemetry/{run}/t1/1/events", {"state": "running"})
            env = await telemetry.get(timeout=5)
            print("telemetry:", env.topic.split("/", 3)[-1], env.payload)
        await bus.publish(f"cascade/constraints/{run}", b"", retain=True)  # clear it


if __name__ == "__main__":
    asyncio.run(main())
