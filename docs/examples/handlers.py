"""Handlers and iterators: the two ways to consume a subscription."""

import asyncio

import cascade_bus
from cascade_bus import Envelope


async def main() -> None:
    """Consume one subscription with a handler and another with ``async for``."""
    async with cascade_bus.connect("memory://handlers") as bus:
        seen: list[str] = []
        all_seen = asyncio.Event()

        async def on_order(env: Envelope[dict[str, int]]) -> None:
            seen.append(f"{env.topic} qty={env.payload['qty']}")
            if len(seen) == 3:
                all_seen.set()

        # Handler mode: the bus calls on_order for each message, in order (FIFO),
        # from its own task, so a slow handler delays only this subscription.
        orders = await bus.subscribe("shop/orders/#", on_order)

        # Iterator mode: the subscription is an async iterator of envelopes.
        async with bus.subscribe("shop/orders/+") as sub:
            for qty in (1, 2, 3):
                await bus.publish(f"shop/orders/{qty}", {"qty": qty})
            async for env in sub:
                print("iterator got", env.topic, env.payload)
                if env.payload["qty"] == 3:
                    break

        # Unsubscribing drops what the handler has not taken yet, so wait for it first.
        await asyncio.wait_for(all_seen.wait(), timeout=1.0)
        await orders.unsubscribe()
        print("handler got", seen)


if __name__ == "__main__":
    asyncio.run(main())
