"""NATS-specific behaviour: QoS across levels, queue groups at QoS 1, redeliveries, URLs.

Shared server for what needs no fault; private servers where the test needs a server of its
own (several servers in one URL, no JetStream).
"""

from __future__ import annotations

import asyncio
from typing import Any

import nats
import pytest
from cascade_bus_nats import NatsTransport

import cascade_bus
from cascade_bus import (
    ConnectError,
    InvalidTopic,
    InvalidURL,
    PayloadTooLarge,
    UnsupportedFeature,
)
from cascade_bus.testing.brokers import free_port

pytestmark = pytest.mark.nats


async def test_qos_is_the_lower_of_publish_and_subscribe(nats_url, unique_topic, kit, buses):
    """QoS-0 subscribers get QoS-1 messages and QoS-1 subscribers QoS-0 ones, once each."""
    bus = await cascade_bus.connect(nats_url)
    buses.append(bus)
    q0, q1 = kit.Inbox(), kit.Inbox()
    await bus.subscribe(f"{unique_topic}/#", q0, qos=0)
    await bus.subscribe(f"{unique_topic}/#", q1, qos=1)
    await bus.publish(f"{unique_topic}/a", "p0", qos=0)
    await bus.publish(f"{unique_topic}/b", "p1", qos=1)
    await bus.publish(f"{unique_topic}", "parent", qos=1)  # a/# matches a itself
    await q0.wait_for(3)
    await q1.wait_for(3)
    await bus.publish(f"{unique_topic}/end", "end")
    await q0.wait_until(lambda: "end" in q0.payloads, "end")
    await q1.wait_until(lambda: "end" in q1.payloads, "end")
    assert sorted(q0.payloads) == ["end", "p0", "p1", "parent"]
    assert sorted(q1.payloads) == ["end", "p0", "p1", "parent"]
    assert {e.topic for e in q1.envelopes} >= {unique_topic, f"{unique_topic}/b"}


async def test_queue_group_at_qos1_each_message_once(private_nats, unique_topic, buses):
    """Each message once across the group, at QoS 1 and at QoS 0.

    A private server: a queue group's consumer outlives its members (``consumer_inactive``),
    and a test should not leave one on the shared server.
    """
    nats_url = private_nats().url
    members = [await cascade_bus.connect(nats_url) for _ in range(3)]
    buses.extend(members)
    got: list[list[int]] = [[], [], []]
    total = asyncio.Event()

    def handler(i: int) -> Any:
        def record(env: cascade_bus.Envelope[Any]) -> None:
            got[i].append(env.payload)
            if sum(map(len, got)) == 200:
                total.set()

        return record

    for i, bus in enumerate(members):
        await bus.subscribe(f"{unique_topic}/jobs", handler(i), queue="workers", qos=1)
    publisher = await cascade_bus.connect(nats_url)
    buses.append(publisher)
    for n in range(100):
        await publisher.publish(f"{unique_topic}/jobs", n, qos=1)
        await publisher.publish(f"{unique_topic}/jobs", 1000 + n, qos=0)
    async with asyncio.timeout(10):
        await total.wait()
    everything = sorted(v for member in got for v in member)
    assert everything == list(range(100)) + list(range(1000, 1100))
    assert sum(1 for member in got if member) > 1, [len(m) for m in got]


async def test_unacked_message_is_redelivered_and_counted(nats_url, unique_topic, buses):
    """A handler slower than ``ack_wait``: JetStream redelivers; the copy is a duplicate."""
    bus = await cascade_bus.connect(nats_url, ack_wait=0.3)
    buses.append(bus)
    calls: list[Any] = []
    redelivered = asyncio.Event()

    async def slow(env: cascade_bus.Envelope[Any]) -> None:
        calls.append(env.payload)
        if len(calls) == 1:
            await redelivered.wait()  # hold the first delivery until its copy arrived
        else:
            redelivered.set()

    await bus.subscribe(f"{unique_topic}/slow", slow, qos=1, max_concurrency=2)
    await bus.publish(f"{unique_topic}/slow", "once", qos=1)
    async with asyncio.timeout(10):
        await redelivered.wait()
    assert calls == ["once", "once"]
    assert bus.stats().duplicates == 1


async def test_dollar_topics_and_nats_inboxes_stay_out_of_leading_wildcards(
    private_nats, buses, kit
):
    server = private_nats()
    bus = await cascade_bus.connect(server.url)
    buses.append(bus)
    everything, dollar = kit.Inbox(), kit.Inbox()
    await bus.subscribe("#", everything)
    await bus.subscribe("$app/#", dollar)
    await bus.publish("$app/x", 1)
    await bus.publish("$app/y", 2, qos=1)  # its ack and the stream traffic stay invisible
    await bus.publish("plain", 3)
    await dollar.wait_for(2)
    await everything.wait_until(lambda: 3 in everything.payloads, "the plain message")
    nc = await nats.connect(server.url)
    try:
        await nc.publish("plain", b"4", reply="_INBOX.abc.def")  # a plain NATS request ...
        await nc.publish("_INBOX.abc.def", b"5")  # ... and its reply: hidden from '#'
        await nc.publish("last", b'"end"')  # one connection: the server keeps this order
    finally:
        await nc.close()
    await everything.wait_until(lambda: "end" in everything.payloads, "the last message")
    assert [e.topic for e in everything.envelopes] == ["plain", "plain", "last"]
    assert sorted(dollar.payloads) == [1, 2]


async def test_several_servers_in_one_url(private_nats, unique_topic, buses, kit):
    """``nats://down:port,up:port``: the dead first server is skipped."""
    up = private_nats()
    dead = f"127.0.0.1:{free_port()}"
    bus = await cascade_bus.connect(f"nats://{dead},{up.host}:{up.port}")
    buses.append(bus)
    assert bus.url.hosts[1] == (up.host, up.port)
    inbox = kit.Inbox()
    await bus.subscribe(f"{unique_topic}/x", inbox)
    await bus.publish(f"{unique_topic}/x", 1, qos=1)
    assert await inbox.wait_for(1) == [1]


async def test_unreachable_server_fails_fast() -> None:
    url = f"nats://127.0.0.1:{free_port()},127.0.0.1:{free_port()}"
    async with asyncio.timeout(5):
        with pytest.raises(ConnectError, match="could not connect"):
            await cascade_bus.connect(url).open()


async def test_server_without_jetstream(private_nats, unique_topic, buses, kit):
    server = private_nats(jetstream=False)
    with pytest.raises(ConnectError, match="JetStream is not enabled"):
        await cascade_bus.connect(server.url).open()
    bus = await cascade_bus.connect(server.url, jetstream=False)
    buses.append(bus)
    assert bus.capabilities.max_qos == 0
    assert not bus.capabilities.retain
    with pytest.raises(UnsupportedFeature):
        await bus.publish(f"{unique_topic}/x", 1, qos=1)
    inbox = kit.Inbox()
    await bus.subscribe(f"{unique_topic}/x", inbox)
    await bus.publish(f"{unique_topic}/x", 1)
    assert await inbox.wait_for(1) == [1]


def test_last_will_is_refused() -> None:
    with pytest.raises(UnsupportedFeature) as info:
        cascade_bus.connect("nats://127.0.0.1:4222", will_topic="x/offline")
    assert info.value.feature == "last will"
    assert not NatsTransport.capabilities.will


def test_unknown_and_bad_options_are_invalid_urls() -> None:
    with pytest.raises(InvalidURL, match="unknown NATS option"):
        cascade_bus.connect("nats://127.0.0.1:4222?colour=blue")
    with pytest.raises(InvalidURL, match="stream"):
        cascade_bus.connect("nats://127.0.0.1:4222", stream="has.dot")
    with pytest.raises(InvalidURL, match="qos1_prefix"):
        cascade_bus.connect("nats://127.0.0.1:4222", qos1_prefix="a.*")


async def test_topics_nats_cannot_take(nats_url, unique_topic, buses):
    bus = await cascade_bus.connect(nats_url, format="raw")
    buses.append(bus)
    with pytest.raises(InvalidTopic, match="reserved"):
        await bus.publish("$CASCADE/Q1/x", 1)
    with pytest.raises(InvalidTopic, match="NATS takes at most"):
        await bus.publish(f"{unique_topic}/" + "x" * 5000, 1)
    limit = bus.transport.max_payload
    assert limit is not None
    with pytest.raises(PayloadTooLarge):  # the body fits, but not with its headers
        await bus.publish(f"{unique_topic}/big", b"x" * (limit - 10), headers={"k": "v" * 100})
    assert bus.stats().dropped_total == 3  # every refusal is counted


async def test_transport_repr_and_state(nats_url, buses):
    bus = await cascade_bus.connect(nats_url)
    buses.append(bus)
    transport = bus.transport
    assert isinstance(transport, NatsTransport)
    assert "connected" in repr(transport)
    assert transport.connected
    assert transport.client is not None
    assert transport.buffered == 0


async def test_client_id_keeps_qos1_consumers_across_a_close(private_nats, unique_topic, kit):
    """With ``client_id`` a closed bus's QoS-1 subscription is resumed by the next bus.

    What was published while no bus was subscribed arrives when the next one subscribes the
    same pattern; ``unsubscribe()`` (not ``close()``) deletes the consumer.
    """
    server = private_nats()
    first = await cascade_bus.connect(server.url, client_id="worker-1")
    early = kit.Inbox()
    await first.subscribe(f"{unique_topic}/jobs", early, qos=1)
    async with cascade_bus.connect(server.url) as publisher:
        await publisher.publish(f"{unique_topic}/jobs", 1, qos=1)
        assert await early.wait_for(1) == [1]
        await first.close()  # keeps the consumer
        for n in (2, 3):
            await publisher.publish(f"{unique_topic}/jobs", n, qos=1)
    async with cascade_bus.connect(server.url, client_id="worker-1") as second:
        late = kit.Inbox()
        sub = await second.subscribe(f"{unique_topic}/jobs", late, qos=1)
        assert await late.wait_for(2) == [2, 3]
        await sub.unsubscribe()  # deletes it
        nc = await nats.connect(server.url)
        try:
            assert await nc.jsm().consumers_info("CASCADE_BUS") == []
        finally:
            await nc.close()


async def test_without_client_id_close_removes_the_consumers(private_nats, unique_topic):
    server = private_nats()
    bus = await cascade_bus.connect(server.url)
    await bus.subscribe(f"{unique_topic}/x", qos=1)
    await bus.close()
    nc = await nats.connect(server.url)
    try:
        assert await nc.jsm().consumers_info("CASCADE_BUS") == []
    finally:
        await nc.close()
