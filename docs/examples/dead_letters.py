"""Retries and dead letters: a failing handler gets N more attempts, then the message moves on."""

import asyncio
from typing import Any

import cascade_bus
from cascade_bus import Envelope

attempts: dict[int, int] = {}


async def charge(env: Envelope[dict[str, int]]) -> None:
    """Payment 1 succeeds at its second attempt; payment 2 always fails."""
    payment = env.payload["payment"]
    attempts[payment] = attempts.get(payment, 0) + 1
    if payment == 2 or attempts[payment] < 2:
        raise ConnectionError(f"gateway timeout for payment {payment}")
    print(f"payment {payment} charged at attempt {attempts[payment]}")


async def main() -> None:
    """Two payments, one of which ends in the dead-letter topic with the reason."""

    def on_error(error: Exception, topic: str, env: Envelope[Any] | None) -> None:
        print(f"on_error (after the last attempt): {error}")

    async with cascade_bus.connect("memory://payments", on_error=on_error) as bus:
        async with bus.subscribe("payments/dead") as dead_letters:
            await bus.subscribe(
                "payments/new",
                charge,
                retries=2,  # up to 3 attempts in all
                retry_delay=0.01,  # 0.01 s, then 0.02 s
                dead_letter="payments/dead",
            )
            await bus.publish("payments/new", {"payment": 1})
            await bus.publish("payments/new", {"payment": 2})

            dead = await dead_letters.get(timeout=5)
            print("dead letter:", dead.payload)
            for key, value in sorted(dead.headers.items()):
                if key.startswith("x-death-") and key != "x-death-id":
                    print(f"  {key}: {value}")
        stats = bus.stats()
        print(f"delivered {stats.delivered}, dead_lettered {stats.dead_lettered}, ", end="")
        print(f"dropped {stats.dropped}")


if __name__ == "__main__":
    asyncio.run(main())
