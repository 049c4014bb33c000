"""Quickstart: publish a message and receive it, on the in-process memory:// broker."""

import asyncio

import cascade_bus


async def main() -> None:
    """Subscribe to a pattern, publish to a matching topic, print what arrives."""
    async with (
        cascade_bus.connect("memory://") as bus,
        bus.subscribe("sensors/+/temperature") as sub,
    ):
        await bus.publish("sensors/kitchen/temperature", {"celsius": 21.5})
        env = await sub.get(timeout=1.0)
        print(env.topic, env.payload)


if __name__ == "__main__":
    asyncio.run(main())
