"""The envelope on the wire: CloudEvents JSON, MessagePack, raw, and plain clients."""

import asyncio

import msgspec

import cascade_bus
from cascade_bus import Envelope


async def main() -> None:
    """Show the JSON body of an envelope and how other formats and foreign bodies arrive."""
    async with (
        cascade_bus.connect("memory://wire", source="docs/envelope") as bus,
        cascade_bus.connect("memory://wire", format="msgpack") as packed,
        cascade_bus.connect("memory://wire", format="raw", source="docs/raw") as plain,
        bus.subscribe("wire/#") as sub,
    ):
        # 1. The default: a CloudEvents 1.0 structured JSON body.
        await bus.publish("wire/json", {"a": 1}, headers={"tenant": "acme"})
        env = await sub.get(timeout=1.0)
        print("json body:", msgspec.json.encode(env).decode())
        print("cloudevent:", env.to_cloudevent())
        print("round trip:", Envelope.from_cloudevent(env.to_cloudevent()).payload)

        # 2. format=msgpack: the same envelope in MessagePack; any bus decodes it.
        await packed.publish("wire/msgpack", {"b": 2})
        env = await sub.get(timeout=1.0)
        print("msgpack ->", env.payload, env.type)

        # 3. A plain client (mosquitto_pub -m '{"c": 3}', here the bare transport: no
        #    envelope, no headers): a bare JSON body arrives as its payload.
        await bus.transport.publish("wire/plain", b'{"c": 3}')
        env = await sub.get(timeout=1.0)
        print("bare json ->", env.payload, repr(env.source))

        # 4. A body that is not JSON arrives as bytes.
        await bus.transport.publish("wire/bytes", b"\x00\x01binary")
        env = await sub.get(timeout=1.0)
        print("bytes ->", env.payload, env.content_type)

        # 5. format=raw: the body is the bare JSON payload, so plain clients read exactly
        #    what was published; metadata rides in native headers where the transport
        #    has them (memory:// does), so cascade-bus receivers still see it.
        await plain.publish("wire/raw", {"d": 4})
        env = await sub.get(timeout=1.0)
        print("raw ->", env.payload, repr(env.source))


if __name__ == "__main__":
    asyncio.run(main())
