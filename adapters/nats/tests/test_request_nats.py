"""Request/reply on NATS: the server's "no responders" status becomes `NoResponders` at once.

A request goes out with its inbox as the NATS reply subject, so a server with nothing
subscribed to the subject answers with a 503 status on that inbox; any other publish carries no
reply subject and can never cause one. A responder that is subscribed but silent still means a
plain `RequestTimeout`. Shared server; every request to nobody uses ``timeout=3600`` inside a
5 s bound, so a regression fails instead of hanging.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from cascade_bus_nats import NatsTopicMapper
from nats.aio.msg import Msg

import cascade_bus
from cascade_bus import DropReason, NoResponders, RequestTimeout

pytestmark = pytest.mark.nats

MAPPER = NatsTopicMapper()
#: A bound for a request to nobody, whose own timeout (3600 s) must never be reached.
FAST = 5.0


def record_no_responders(bus: cascade_bus.Bus) -> list[str]:
    """Record every ``on_no_responders`` call the transport makes (and still pass it on)."""
    calls: list[str] = []
    transport = bus.transport
    hook = transport.on_no_responders
    assert hook is not None

    def spy(reply_to: str) -> None:
        calls.append(reply_to)
        hook(reply_to)

    transport.on_no_responders = spy
    return calls


async def ask_nobody(bus: cascade_bus.Bus, topic: str) -> NoResponders:
    """Request on a topic nobody listens to; return the `NoResponders` it must raise."""
    async with asyncio.timeout(FAST):
        with pytest.raises(NoResponders, match="nobody") as info:
            await bus.request(f"{topic}/nobody", {"q": 1}, timeout=3600)
    return info.value


@pytest.mark.parametrize("fmt", ["json", "msgpack", "raw"])
async def test_request_to_nobody_raises_no_responders_at_once(
    nats_url, unique_topic, buses, api, fmt
):
    """The 503 status reaches the bus's inbox and ends the request; nothing is delivered."""
    assert cascade_bus.connect(nats_url).capabilities.no_responders
    bus = await cascade_bus.connect(nats_url, format=fmt)
    buses.append(bus)
    calls = record_no_responders(bus)
    error = await ask_nobody(bus, unique_topic)
    assert isinstance(error, RequestTimeout)
    assert len(calls) == 1, calls
    assert calls[0].startswith(f"_inbox/{bus.id}/"), calls
    stats = bus.stats()
    assert stats.delivered == 0, stats  # the status message is not a reply
    assert DropReason.DECODE_ERROR not in stats.dropped, stats
    # A second one, and the bus still works for requests that find a responder.
    await ask_nobody(bus, unique_topic)

    async def echo(env: cascade_bus.Envelope[Any]) -> None:
        await bus.reply(env, {"echo": env.payload})

    await bus.subscribe(f"{unique_topic}/svc", echo)
    reply = await bus.request(f"{unique_topic}/svc", 7, timeout=FAST)
    assert reply.payload == {"echo": 7}
    assert len(calls) == 2, calls


async def test_responders_and_queue_groups_still_answer(nats_url, unique_topic, buses, api):
    """A plain responder and a two-member queue group answer; each request exactly once."""
    requester = await cascade_bus.connect(nats_url)
    responder = await cascade_bus.connect(nats_url)
    workers = [await cascade_bus.connect(nats_url, format="raw") for _ in range(2)]
    buses.extend([requester, responder, *workers])
    calls = record_no_responders(requester)
    served: list[int] = []

    async def double(env: cascade_bus.Envelope[Any]) -> None:
        await responder.reply(env, env.payload * 2)

    def worker(bus: cascade_bus.Bus, n: int) -> Any:
        async def handle(env: cascade_bus.Envelope[Any]) -> None:
            served.append(n)
            await bus.reply(env, {"worker": n, "got": env.payload})

        return handle

    await responder.subscribe(f"{unique_topic}/double", double)
    for n, bus in enumerate(workers):
        await bus.subscribe(f"{unique_topic}/jobs", worker(bus, n), queue="workers")
    async with asyncio.timeout(FAST * 2):
        doubled = await asyncio.gather(
            *(requester.request(f"{unique_topic}/double", i, timeout=FAST) for i in range(20))
        )
        jobs = await asyncio.gather(
            *(requester.request(f"{unique_topic}/jobs", i, timeout=FAST) for i in range(20))
        )
    assert [r.payload for r in doubled] == [i * 2 for i in range(20)]
    assert [r.payload["got"] for r in jobs] == list(range(20))
    assert len(served) == 20  # each job once, across the group
    assert calls == []


@pytest.mark.parametrize("qos", [0, 1])
async def test_silent_responder_gives_request_timeout(nats_url, unique_topic, kit, buses, api, qos):
    """Someone subscribed who never answers: `RequestTimeout`, not `NoResponders`.

    At QoS 1 the subscriber's interest in the plain subject (for QoS-0 messages) is what the
    server sees; a queue-group member counts too.
    """
    requester = await cascade_bus.connect(nats_url)
    silent = await cascade_bus.connect(nats_url)
    buses.extend([requester, silent])
    calls = record_no_responders(requester)
    heard, heard_group = kit.Inbox(), kit.Inbox()
    sub = await silent.subscribe(f"{unique_topic}/silent", heard, qos=qos)
    async with asyncio.timeout(FAST):
        with pytest.raises(RequestTimeout) as info:
            await requester.request(f"{unique_topic}/silent", {"q": 1}, timeout=0.3)
    assert not isinstance(info.value, NoResponders)
    assert await heard.wait_for(1) == [{"q": 1}]
    await sub.unsubscribe()
    await silent.subscribe(f"{unique_topic}/silent", heard_group, qos=qos, queue="quiet")
    async with asyncio.timeout(FAST):
        with pytest.raises(RequestTimeout) as info:
            await requester.request(f"{unique_topic}/silent", {"q": 2}, timeout=0.3)
    assert not isinstance(info.value, NoResponders)
    assert await heard_group.wait_for(1) == [{"q": 2}]
    assert calls == []


async def test_only_requests_carry_a_reply_subject(plain, nats_url, unique_topic, buses, api, kit):
    """Plain publishes go without a NATS reply subject, even when the body says ``replyto``.

    A plain NATS client sees each message's reply subject: empty for publishes (in every
    format, with "replyto" inside the payload as bait), the bus's inbox for a request, which
    the plain client can then answer with ``msg.respond()``.
    """
    json_bus = await cascade_bus.connect(nats_url)
    raw_bus = await cascade_bus.connect(nats_url, format="raw")
    pack_bus = await cascade_bus.connect(nats_url, format="msgpack")
    buses.extend([json_bus, raw_bus, pack_bus])
    seen: list[Msg] = []
    got = asyncio.Event()

    async def on_msg(msg: Msg) -> None:
        seen.append(msg)
        got.set()
        if msg.reply:
            await msg.respond(b'{"answer": 42}')

    await plain.subscribe(MAPPER.to_native(f"{unique_topic}/svc"), cb=on_msg)
    await kit.settle(plain)
    bait = {"replyto": "_inbox/x/y", "data": "replyto"}
    for bus in (json_bus, raw_bus, pack_bus):
        await bus.publish(f"{unique_topic}/svc", bait)
        await bus.publish(f"{unique_topic}/svc", b"replyto")
        await bus.publish(f"{unique_topic}/svc", "ends like a request: replyto")
    for bus in (json_bus, pack_bus):  # in the envelope's headers, not its reply_to
        await bus.publish(f"{unique_topic}/svc", bait, headers={"ce-replyto": "x"})
    replies = [
        await bus.request(f"{unique_topic}/svc", {"q": 1}, timeout=FAST)
        for bus in (json_bus, raw_bus, pack_bus)
    ]
    assert [r.payload for r in replies] == [{"answer": 42}] * 3
    async with asyncio.timeout(FAST):
        while len(seen) < 14:
            got.clear()
            await got.wait()
    assert [m.reply for m in seen[:11]] == [""] * 11
    assert [m.reply for m in seen[11:]] == [MAPPER.to_native(r.topic) for r in replies]
    for reply, bus in zip(replies, (json_bus, raw_bus, pack_bus), strict=True):
        assert reply.topic.startswith(f"_inbox/{bus.id}/")


async def test_no_responders_status_never_reaches_a_subscription(
    nats_url, unique_topic, kit, buses, api
):
    """The 503 may go to any of the requester's subscriptions matching the inbox: none sees it.

    The server hands it to the first matching plain subscription of the requesting
    connection, which can be a user's ``_inbox/#`` rather than the bus's own inbox.
    """
    requester = await cascade_bus.connect(nats_url)
    responder = await cascade_bus.connect(nats_url)
    buses.extend([requester, responder])
    calls = record_no_responders(requester)
    watcher = kit.Inbox()
    await requester.subscribe(f"_inbox/{requester.id}/#", watcher)
    await ask_nobody(requester, unique_topic)

    async def answer(env: cascade_bus.Envelope[Any]) -> None:
        await responder.reply(env, "pong")

    await responder.subscribe(f"{unique_topic}/ping", answer)
    reply = await requester.request(f"{unique_topic}/ping", "ping", timeout=FAST)
    assert reply.payload == "pong"
    # The watcher saw the reply (sent after the status, on the same connection) and nothing
    # else: the status message was taken out wherever it arrived.
    await watcher.wait_for(1)
    assert watcher.payloads == ["pong"]
    assert len(calls) == 1
    assert DropReason.DECODE_ERROR not in requester.stats().dropped
