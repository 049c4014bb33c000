"""Request/reply: ask a question on a topic and wait for the first answer."""

import asyncio

import cascade_bus
from cascade_bus import Envelope, NoResponders, RequestTimeout


async def main() -> None:
    """Run a tiny responder and send it two requests, one to a topic nobody answers."""
    async with cascade_bus.connect("memory://rpc") as bus:

        async def add(env: Envelope[dict[str, int]]) -> None:
            # bus.reply publishes to env.reply_to with the request's correlation id.
            await bus.reply(env, {"sum": env.payload["a"] + env.payload["b"]})

        await bus.subscribe("calc/add", add)

        answer = await bus.request("calc/add", {"a": 2, "b": 3}, timeout=1.0)
        print("2 + 3 =", answer.payload["sum"])

        try:
            await bus.request("calc/divide", {"a": 1, "b": 0}, timeout=5.0)
        except NoResponders as exc:  # at once: memory:// and NATS know nobody listens
            print("no responder:", exc)
        except RequestTimeout as exc:  # elsewhere, after the timeout
            print("no reply:", exc)


if __name__ == "__main__":
    asyncio.run(main())
