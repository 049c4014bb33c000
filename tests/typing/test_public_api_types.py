"""Static checks of the public API's types, run by mypy --strict (see tests/test_typing.py).

Every `assert_type` is verified by mypy and is a no-op at run time; the file also runs under
pytest against memory:// so the code it type-checks is real, working code. Lines marked
``# type: ignore[code]`` must stay errors: under --strict an unneeded ignore fails the check.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, assert_type

import msgspec

import cascade_bus
from cascade_bus import (
    Bus,
    BusURL,
    Capabilities,
    Envelope,
    Stats,
    SubscribeCall,
    Subscription,
    Transport,
    UnknownScheme,
)


class Point(msgspec.Struct):
    x: int
    y: int


def on_point(env: Envelope[Point]) -> None:
    assert_type(env.payload, Point)


async def on_point_async(env: Envelope[Point]) -> None:
    assert_type(env.payload.x, int)


async def test_public_api_types() -> None:
    bus = cascade_bus.connect(f"memory://typing-{uuid.uuid4().hex}", buffer_size=10)
    assert_type(bus, Bus)
    assert_type(bus.url, BusURL)
    assert_type(bus.capabilities, Capabilities)
    assert_type(bus.capabilities.max_qos, int)
    assert_type(bus.transport, Transport)
    assert_type(bus.is_open, bool)
    assert_type(bus.id, str)

    opened = await bus
    assert_type(opened, Bus)
    assert_type(await bus.open(), Bus)
    async with bus as entered:
        assert_type(entered, Bus)

        # subscribe(..., type=T) is typed by T, without it by Any
        typed_call = bus.subscribe("typing/+", type=Point)
        assert_type(typed_call, SubscribeCall[Point])
        untyped_call = bus.subscribe("typing/+")
        assert_type(untyped_call, SubscribeCall[Any])
        sync_call = bus.subscribe("typing/h", on_point, type=Point)
        assert_type(sync_call, SubscribeCall[Point])
        async_call = bus.subscribe("typing/h", on_point_async, type=Point)
        assert_type(async_call, SubscribeCall[Point])
        lambda_call = bus.subscribe("typing/h", lambda env: None)
        assert_type(lambda_call, SubscribeCall[Any])
        for unused in (untyped_call, sync_call, async_call, lambda_call):
            unused.close()  # only their types are checked: no subscription, no warning

        sub = await typed_call
        assert_type(sub, Subscription[Point])
        assert_type(sub.pending, int)
        assert_type(sub.closed, bool)
        assert_type(sub.pattern, str)
        assert_type(sub.queue, str | None)

        assert_type(await bus.publish("typing/a", {"x": 1, "y": 2}), None)
        env = await sub.get(5)
        assert_type(env, Envelope[Point])
        assert_type(env.payload, Point)
        assert_type(env.payload.x, int)
        assert_type(env.id, str)
        assert_type(env.time, datetime)
        assert_type(env.headers, dict[str, str])
        assert_type(env.correlation_id, str | None)
        assert_type(env.reply_to, str | None)
        assert_type(env.is_clear, bool)
        assert_type(env.to_cloudevent(), dict[str, Any])
        assert_type(Envelope.from_cloudevent(env.to_cloudevent()), Envelope[Any])
        assert env.payload == Point(1, 2)
        await sub.unsubscribe()

        async with bus.subscribe("typing/b", type=Point) as iterated:
            assert_type(iterated, Subscription[Point])
            await bus.publish("typing/b", Point(3, 4))
            async for item in iterated:
                assert_type(item, Envelope[Point])
                assert item.payload.y == 4
                break

        async def responder(req: Envelope[Any]) -> None:
            await bus.reply(req, req.payload)

        await bus.subscribe("typing/rpc", responder)
        reply = await bus.request("typing/rpc", {"x": 5, "y": 6}, timeout=5)
        assert_type(reply, Envelope[Any])

        stats = bus.stats()
        assert_type(stats, Stats)
        assert_type(stats.published, int)
        assert_type(stats.dropped, dict[str, int])
        assert_type(stats.dropped_total, int)

        assert_type(await bus.flush(), None)

    assert_type(await bus.close(), None)

    # Module-level helpers
    assert_type(cascade_bus.topic_matches("a/#", "a"), bool)
    assert_type(cascade_bus.validate_topic("a/b"), str)
    assert_type(cascade_bus.validate_pattern("a/+"), str)
    assert_type(cascade_bus.available_transports(), dict[str, str])
    assert_type(cascade_bus.get_transport("memory"), type[Transport])
    try:
        cascade_bus.connect("kafka://h")
    except UnknownScheme as exc:
        assert_type(exc.suggestion, str | None)
        assert_type(exc.known, tuple[str, ...])


async def _must_not_type_check(bus: Bus, env: Envelope[Point]) -> None:
    """Never run; each line is an error mypy must report (else the ignore is unused)."""
    env.payload = Point(0, 0)  # type: ignore[misc]
    await bus.publish(1, {})  # type: ignore[arg-type]
    bus.subscribe("a", on_point, type=int)  # type: ignore[arg-type]
    sub = await bus.subscribe("a", type=Point)
    sub.pattern.no_such_attribute  # type: ignore[attr-defined]  # noqa: B018
    wrong: Subscription[int] = sub  # type: ignore[assignment]
    del wrong
