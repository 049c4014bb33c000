"""Retained messages: the last value of a topic, handed to every new subscriber."""

import asyncio

import cascade_bus


async def main() -> None:
    """Retain a value, see a late subscriber get it at once, then clear it."""
    async with cascade_bus.connect("memory://retained") as bus:
        await bus.publish("plant/boiler/setpoint", {"celsius": 70}, retain=True)
        await bus.publish("plant/boiler/setpoint", {"celsius": 65}, retain=True)  # last wins

        # Subscribed after the publish: the retained value is already queued when
        # subscribe() returns, so get() does not have to wait for it.
        async with bus.subscribe("plant/+/setpoint") as sub:
            print("pending after subscribe:", sub.pending)
            env = await sub.get(timeout=1.0)
            print("retained:", env.topic, env.payload)

        # An empty body published with retain=True clears the retained message.
        await bus.publish("plant/boiler/setpoint", b"", retain=True)
        async with bus.subscribe("plant/+/setpoint") as sub:
            print("pending after clear:", sub.pending)


if __name__ == "__main__":
    asyncio.run(main())
