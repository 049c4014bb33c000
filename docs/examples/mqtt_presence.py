"""MQTT presence: a retained online/offline status per client, kept honest by the last will.

Needs an MQTT broker: CASCADE_BUS_MQTT_URL, or Mosquitto on 127.0.0.1:1883.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from typing import Any

import cascade_bus

URL = os.environ.get("CASCADE_BUS_MQTT_URL", "mqtt://127.0.0.1:1883")


async def main() -> None:
    """Watch a device come online, then go offline."""
    device = f"pump-{uuid.uuid4().hex[:6]}"  # unique: the broker may be shared
    status = f"plant/devices/{device}/status"

    async with cascade_bus.connect(URL) as watcher:
        async with watcher.subscribe(status) as statuses:
            # The device's bus publishes {"online": true} (retained, QoS 1) on every
            # (re)connect and sets its last will to {"online": false} (retained).
            pump = cascade_bus.connect(URL, client_id=device, presence_topic=status)
            async with pump:
                env = await statuses.get(timeout=5)
                print("while connected:", _show(env.payload, device))

            # A clean close publishes the offline status itself (DISCONNECT suppresses the
            # will); a crash, a kill or a cut connection makes the broker publish the will.
            env = await statuses.get(timeout=5)
            print("after close:", _show(env.payload, device))

        # Anyone subscribing later reads the current state from the retained message.
        async with watcher.subscribe(status) as late:
            env = await late.get(timeout=5)
            print("late subscriber (retained):", _show(env.payload, device))

        await watcher.publish(status, b"", retain=True, qos=1)  # clear the example's status


def _show(payload: Any, device: str) -> str:
    return str(payload).replace(device, "<client_id>")


if __name__ == "__main__":
    asyncio.run(main())
