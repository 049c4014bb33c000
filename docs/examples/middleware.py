"""Middleware: ordered hooks around every publish and every handler call."""

import asyncio
from typing import Any

import msgspec

import cascade_bus
from cascade_bus import Envelope, Middleware, Next


class Stamp(Middleware):
    """Publish side: add a header to every outgoing envelope."""

    def __init__(self, service: str) -> None:
        self.service = service

    async def publish(self, env: Envelope[Any], call_next: Next) -> None:
        """Continue with a copy of the envelope that carries one more header."""
        headers = {**env.headers, "x-service": self.service}
        await call_next(msgspec.structs.replace(env, headers=headers))


class Trace(Middleware):
    """Handle side: say when a handler call starts and ends (or fails)."""

    def __init__(self, name: str) -> None:
        self.name = name

    async def handle(self, env: Envelope[Any], call_next: Next) -> None:
        """Print around the rest of the chain."""
        print(f"  {self.name} before {env.topic}")
        try:
            await call_next(env)
        except Exception as exc:
            print(f"  {self.name} saw {type(exc).__name__}")
            raise
        print(f"  {self.name} after")


class RejectUnsigned(Middleware):
    """Handle side: refuse envelopes without a header; the handler never sees them."""

    async def handle(self, env: Envelope[Any], call_next: Next) -> None:
        """Raise instead of continuing: counted as handler_error, reported to on_error."""
        if "x-service" not in env.headers:
            raise PermissionError("unsigned message")
        await call_next(env)


async def main() -> None:
    """A bus-wide chain, a per-subscription chain, and an error inside a middleware."""
    done, failed = asyncio.Event(), asyncio.Event()

    async def handler(env: Envelope[Any]) -> None:
        print(f"  handler got {env.payload} from {env.headers['x-service']}")
        done.set()

    def on_error(error: Exception, topic: str, env: Envelope[Any] | None) -> None:
        print(f"on_error: {type(error).__name__}: {error}")
        failed.set()

    url = "memory://middleware-demo"
    # Bus middleware wraps every publish and every handler of this bus; the first is outermost.
    async with (
        cascade_bus.connect(
            url, middleware=[Stamp("billing"), Trace("bus")], on_error=on_error
        ) as bus,
        cascade_bus.connect(url) as plain,
    ):
        # Subscription middleware runs inside the bus's own.
        chain = [Trace("subscription"), RejectUnsigned()]
        await bus.subscribe("invoices/+", handler, middleware=chain)

        print("stamped publish:")
        await bus.publish("invoices/1", {"total": 42})
        await done.wait()

        print("unsigned publish (from a bus without Stamp):")
        await plain.publish("invoices/2", {"total": 7})
        await failed.wait()
        stats = bus.stats()
        print(f"stats: {stats.delivered} delivered, dropped {stats.dropped}")


if __name__ == "__main__":
    asyncio.run(main())
