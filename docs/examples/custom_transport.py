"""A complete (toy) transport: the whole SPI in about sixty lines, registered at run time."""

import asyncio
from collections.abc import Awaitable, Mapping
from typing import Any, ClassVar

import cascade_bus
from cascade_bus import PublishError, UnsupportedFeature
from cascade_bus.spi import (
    BusURL,
    Capabilities,
    Message,
    MessageSink,
    Transport,
    TransportSubscription,
    topic_matches,
)


async def _ready(sinks: list[MessageSink]) -> None:
    """Wait until every full subscriber has room again."""
    for sink in sinks:
        await sink.ready()


class LoopbackTransport(Transport):
    """Every ``loopback://`` bus in this process shares one list of subscriptions."""

    # Declare what it can do; the bus refuses the rest with UnsupportedFeature.
    capabilities = Capabilities(max_qos=0, retain=False, wildcards=True)
    package: ClassVar[str] = "loopback-transport"  # named in error messages
    _subscriptions: ClassVar[list[tuple[str, MessageSink]]] = []

    def __init__(self, url: BusURL, options: Mapping[str, Any]) -> None:
        super().__init__(url, options)
        # A real transport reads self.options here and raises InvalidURL for unknown ones.
        self._mine: list[tuple[str, MessageSink]] = []
        self._open = False

    async def connect(self) -> None:
        """Nothing to reach: just become usable."""
        self._open = True

    async def aclose(self) -> None:
        """Drop this connection's subscriptions; idempotent, never raises."""
        self._open = False
        for entry in self._mine:
            if entry in self._subscriptions:
                self._subscriptions.remove(entry)
        self._mine.clear()

    def send(
        self,
        topic: str,
        data: bytes,
        qos: int,
        retain: bool,
        headers: Mapping[str, str] | None,
        reply_to: str | None = None,
    ) -> Awaitable[None] | None:
        """Hand the body to every matching subscription, in order (the hot path: no coroutine).

        Returns None once delivered, or an awaitable when a subscriber is at its high-water
        mark and the publisher should wait for it (flow control).
        """
        if not self._open:
            raise PublishError("loopback transport is closed", topic=topic)
        message = Message(topic, data)
        full = [
            sink
            for pattern, sink in self._subscriptions
            if topic_matches(pattern, topic) and not sink.deliver(message)
        ]
        return _ready(full) if full else None

    async def subscribe(
        self, pattern: str, sink: MessageSink, *, qos: int = 0, queue: str | None = None
    ) -> TransportSubscription:
        """Register the sink; no retained messages, so nothing to replay before returning."""
        entry = (pattern, sink)
        self._subscriptions.append(entry)
        self._mine.append(entry)
        return LoopbackSubscription(self, entry)


class LoopbackSubscription(TransportSubscription):
    """Removes one subscription again."""

    def __init__(self, transport: LoopbackTransport, entry: tuple[str, MessageSink]) -> None:
        self._transport = transport
        self._entry = entry

    async def unsubscribe(self) -> None:
        """Stop delivering to the sink; idempotent."""
        for where in (self._transport._subscriptions, self._transport._mine):
            if self._entry in where:
                where.remove(self._entry)


async def main() -> None:
    """Register the transport for ``loopback://`` and use it like any other."""
    cascade_bus.register_transport("loopback", LoopbackTransport)
    try:
        async with cascade_bus.connect("loopback://") as bus:
            async with bus.subscribe("greetings/#") as sub:
                await bus.publish("greetings/en", {"text": "hello"})
                env = await sub.get(timeout=1.0)
                print("loopback delivered:", env.topic, env.payload)

            async def echo(env: cascade_bus.Envelope[Any]) -> None:
                await bus.reply(env, env.payload)

            await bus.subscribe("echo", echo)
            reply = await bus.request("echo", [1, 2, 3], timeout=1.0)
            print("request/reply works too:", reply.payload)

            try:
                await bus.publish("greetings/en", {"text": "hi"}, retain=True)
            except UnsupportedFeature as exc:
                print("refused, not ignored:", exc)
    finally:
        cascade_bus.unregister_transport("loopback")


if __name__ == "__main__":
    asyncio.run(main())
