"""Fault tests on a private Mosquitto: broker restarts, outages, cut connections.

Each test starts its own broker on a free port (never the shared 1883). Waits are bounded and
event-driven: a handler call, a transport state change (`MqttTransport.wait_connected` /
`wait_disconnected`) or a broker process that finished starting.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

import aiomqtt
import paho.mqtt.client as paho_mqtt
import pytest
from cascade_bus_mqtt import RESERVED_PREFIX

import cascade_bus
from cascade_bus import ConnectError, PublishError
from cascade_bus.testing.brokers import free_port

pytestmark = [pytest.mark.fault, pytest.mark.mqtt]


@pytest.mark.parametrize("version", ["5", "3.1.1"])
async def test_clean_start_false_keeps_the_session(
    private_mosquitto, tcp_proxy, unique_topic, kit, buses, version
):
    """``clean_start=false`` makes the broker keep the session when the connection dies.

    With MQTT 5 that takes a non-zero Session Expiry Interval in CONNECT (a session with
    expiry 0 ends with the connection): the adapter sets it. The bus loses its connection (cut,
    no reconnect possible); a bare aiomqtt client resuming the session under the same client id
    receives, without subscribing, what was published in between.
    """
    broker = private_mosquitto()
    proxy = await tcp_proxy(broker.url)
    client_id = f"persist-{uuid.uuid4().hex[:12]}"
    bus = await cascade_bus.connect(
        proxy.url_for("mqtt"), client_id=client_id, clean_start=False, version=version
    )
    buses.append(bus)
    await bus.subscribe(f"{unique_topic}/#", qos=1)
    proxy.pause()
    await proxy.cut()
    await kit.wait_disconnected(bus)
    pub = await cascade_bus.connect(broker.url)
    buses.append(pub)
    await pub.publish(f"{unique_topic}/away", {"while": "away"}, qos=1)

    v5 = version == "5"
    async with (
        asyncio.timeout(kit.WAIT),
        aiomqtt.Client(
            "127.0.0.1",
            broker.port,
            identifier=client_id,
            protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
            clean_session=None if v5 else False,
            clean_start=False if v5 else paho_mqtt.MQTT_CLEAN_START_FIRST_ONLY,
        ) as bare,
    ):
        async for message in bare.messages:
            if not message.topic.value.startswith(RESERVED_PREFIX):  # the bus's barrier
                break
    assert message.topic.value == f"{unique_topic}/away"
    assert b'"while":"away"' in bytes(message.payload)  # type: ignore[arg-type]


async def test_subscriptions_survive_a_broker_restart(private_mosquitto, unique_topic, kit, buses):
    """A clean-session subscriber resubscribes every filter after the broker restarted."""
    broker = private_mosquitto()
    sub = await cascade_bus.connect(broker.url, **kit.FAST_RECONNECT)
    buses.append(sub)
    exact, wild, deep, shared = kit.Inbox(), kit.Inbox(), kit.Inbox(), kit.Inbox()
    await sub.subscribe(f"{unique_topic}/exact", exact, qos=1)
    await sub.subscribe(f"{unique_topic}/+/wild", wild, qos=1)
    await sub.subscribe(f"{unique_topic}/deep/#", deep)
    await sub.subscribe(f"{unique_topic}/shared", shared, queue="workers", qos=1)

    await broker.arestart()
    await kit.wait_connected(sub, reconnects=1)

    pub = await cascade_bus.connect(broker.url)
    buses.append(pub)
    await pub.publish(f"{unique_topic}/exact", {"n": 1}, qos=1)
    await pub.publish(f"{unique_topic}/x/wild", {"n": 2}, qos=1)
    await pub.publish(f"{unique_topic}/deep/a/b", {"n": 3}, qos=1)
    await pub.publish(f"{unique_topic}/shared", {"n": 4}, qos=1)
    assert await exact.wait_for(1) == [{"n": 1}]
    assert await wild.wait_for(1) == [{"n": 2}]
    assert await deep.wait_for(1) == [{"n": 3}]
    assert await shared.wait_for(1) == [{"n": 4}]
    assert sub.stats().reconnects >= 1


async def test_unchanged_retained_is_not_handed_over_again_after_reconnect(
    private_mosquitto, unique_topic, kit, buses
):
    """Resubscribing after a reconnect resyncs retained state (kept by a persistent broker).

    The broker replays the unchanged retained message; the subscription already has it, so it
    is not handed over again (test_resync_mqtt.py covers changes and clears while away).
    """
    broker = private_mosquitto(persistence=True)
    topic = f"{unique_topic}/state"
    bus = await cascade_bus.connect(broker.url, **kit.FAST_RECONNECT)
    buses.append(bus)
    await bus.publish(topic, {"state": "on"}, qos=1, retain=True)
    seen = kit.Inbox()
    await bus.subscribe(topic, seen)
    assert seen.payloads == [{"state": "on"}]  # retained: handed over before subscribe returned

    await broker.arestart()
    await kit.wait_connected(bus, reconnects=1)  # the replay is resynced before this returns
    await bus.publish(topic, {"state": "off"}, qos=1, retain=True)
    assert await seen.wait_for(2) == [{"state": "on"}, {"state": "off"}]
    await bus.publish(topic, b"", qos=1, retain=True)  # clear it


async def test_qos0_losses_during_an_outage_are_counted(
    private_mosquitto, unique_topic, kit, buses
):
    """Down, QoS 0 publishes fill the offline buffer; what does not fit is dropped and counted."""
    broker = private_mosquitto()
    bus = await cascade_bus.connect(broker.url, offline_buffer=10, **kit.FAST_RECONNECT)
    buses.append(bus)
    got = kit.Inbox()
    await bus.subscribe(f"{unique_topic}/#", got)  # resubscribed before the buffer is resent

    await broker.astop()
    await kit.wait_disconnected(bus)
    async with asyncio.timeout(kit.WAIT):
        for seq in range(50):
            await bus.publish(f"{unique_topic}/q0", {"seq": seq})
    stats = bus.stats()
    assert stats.dropped == {"offline_overflow": 40}
    assert stats.buffered == 10
    assert stats.published == 50  # accepted by the bus; the drops are counted separately

    await broker.astart()
    await kit.wait_connected(bus, reconnects=1)
    await bus.publish(f"{unique_topic}/q0", {"seq": "end"})  # same connection, same order
    received = await got.wait_for(11)
    assert received == [{"seq": seq} for seq in range(10)] + [{"seq": "end"}]
    assert bus.stats().buffered == 0
    assert bus.stats().dropped == {"offline_overflow": 40}


async def test_qos1_publish_while_down_is_buffered_then_delivered(
    private_mosquitto, unique_topic, kit, buses
):
    """Down, a QoS-1 publish returns once buffered; a full buffer raises PublishError at once."""
    broker = private_mosquitto()
    bus = await cascade_bus.connect(broker.url, offline_buffer=3, **kit.FAST_RECONNECT)
    buses.append(bus)
    got = kit.Inbox()
    await bus.subscribe(f"{unique_topic}/#", got, qos=1)

    await broker.astop()
    await kit.wait_disconnected(bus)
    async with asyncio.timeout(2.0):  # buffered: no waiting for a PUBACK that cannot come
        for seq in range(3):
            await bus.publish(f"{unique_topic}/q1", {"seq": seq}, qos=1)
    assert bus.stats().buffered == 3
    async with asyncio.timeout(2.0):
        with pytest.raises(PublishError, match="offline buffer full") as raised:
            await bus.publish(f"{unique_topic}/q1", {"seq": 3}, qos=1)
    assert raised.value.topic == f"{unique_topic}/q1"
    assert bus.stats().dropped == {"offline_overflow": 1}

    await broker.astart()
    await kit.wait_connected(bus, reconnects=1)
    assert await got.wait_for(3) == [{"seq": 0}, {"seq": 1}, {"seq": 2}]
    async with asyncio.timeout(kit.WAIT):
        await bus.flush()
    assert bus.stats().buffered == 0


async def test_cut_connection_is_noticed_and_recovered(
    private_mosquitto, tcp_proxy, unique_topic, kit, buses
):
    """A connection reset through the TCP proxy is noticed, counted and recovered."""
    broker = private_mosquitto()
    proxy = await tcp_proxy(broker.url)
    sub = await cascade_bus.connect(proxy.url_for("mqtt"), **kit.FAST_RECONNECT)
    buses.append(sub)
    got = kit.Inbox()
    await sub.subscribe(f"{unique_topic}/#", got, qos=1)
    pub = await cascade_bus.connect(broker.url)
    buses.append(pub)

    # A cut while new connections are refused: noticed, and the subscriber stays down.
    proxy.pause()
    assert await proxy.cut() == 1
    await kit.wait_disconnected(sub)
    assert sub.stats().reconnects == 0
    proxy.resume()
    await kit.wait_connected(sub, reconnects=1)
    await pub.publish(f"{unique_topic}/a", {"n": 1}, qos=1)
    assert await got.wait_for(1) == [{"n": 1}]

    # A plain cut: the subscriber reconnects at once, and gets what is published after it.
    assert await proxy.cut() == 1
    await kit.wait_connected(sub, reconnects=2)
    await pub.publish(f"{unique_topic}/b", {"n": 2}, qos=1)
    assert await got.wait_for(2) == [{"n": 1}, {"n": 2}]
    assert sub.stats().reconnects == 2
    assert proxy.accepted == 3


async def test_publisher_behind_a_cut_resends_unacknowledged(
    private_mosquitto, tcp_proxy, unique_topic, kit, buses
):
    """QoS-1 messages in flight when the publisher's connection is cut are resent: none lost."""
    broker = private_mosquitto()
    proxy = await tcp_proxy(broker.url)
    sub = await cascade_bus.connect(broker.url)
    buses.append(sub)
    seen: set[int] = set()
    some, all_seen = asyncio.Event(), asyncio.Event()

    def record(env: cascade_bus.Envelope[Any]) -> None:
        seen.add(env.payload["seq"])
        if len(seen) >= 50:
            some.set()
        if len(seen) == 1_000:
            all_seen.set()

    await sub.subscribe(f"{unique_topic}/#", record, qos=1)
    pub = await cascade_bus.connect(proxy.url_for("mqtt"), **kit.FAST_RECONNECT)
    buses.append(pub)

    async with asyncio.timeout(kit.WAIT):
        # 1,000 concurrent QoS-1 publishes: most wait for a PUBACK (or in paho's queue) when
        # the connection is cut.
        tasks = [
            asyncio.create_task(pub.publish(f"{unique_topic}/n", {"seq": seq}, qos=1))
            for seq in range(1_000)
        ]
        await some.wait()
        waiting_at_cut = sum(not task.done() for task in tasks)
        assert await proxy.cut() == 1
        await asyncio.gather(*tasks)
        await all_seen.wait()
    assert waiting_at_cut > 0
    assert seen == set(range(1_000))
    assert pub.stats().reconnects == 1
    assert pub.stats().published == 1_000


async def test_connect_to_a_closed_port_fails_fast(caplog, capfd):
    """Nothing listening: ConnectError quickly, naming host:port, with nothing logged or printed."""
    port = free_port()
    bus = cascade_bus.connect(f"mqtt://127.0.0.1:{port}")
    caplog.set_level(logging.DEBUG)
    async with asyncio.timeout(5.0):  # bounded: a refused port must not wait out a timeout
        with pytest.raises(ConnectError) as raised:
            await bus.open()
    assert f"127.0.0.1:{port}" in str(raised.value)
    assert not bus.is_open
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.WARNING]
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err
    assert err == ""


async def test_handler_publishing_qos1_while_its_subscription_is_full(
    mqtt_url, unique_topic, kit, buses
):
    """A handler awaiting its own QoS 1 PUBACK never stalls behind flow control.

    Reading resumes while one of our publishes waits for its ack, so the subscription may then
    overflow: every message is either handled or counted, none hangs (known limit: a broker
    that ignores our Receive Maximum can overrun a tiny buffer here).
    """
    bus = await cascade_bus.connect(mqtt_url)
    buses.append(bus)
    publisher = await cascade_bus.connect(mqtt_url)
    buses.append(publisher)
    echoes = kit.Inbox()
    await bus.subscribe(f"{unique_topic}/echo", echoes, qos=1)

    async def echo(env):
        await bus.publish(f"{unique_topic}/echo", env.payload, qos=1)  # waits for a PUBACK

    await bus.subscribe(f"{unique_topic}/in", echo, qos=1, buffer_size=2)
    for i in range(200):
        await publisher.publish(f"{unique_topic}/in", i, qos=1)

    def settled() -> bool:
        return len(echoes) + bus.stats().dropped.get("overflow", 0) == 200

    async with asyncio.timeout(kit.WAIT):
        while not settled():
            await echoes.wait_for(len(echoes) + 1, timeout=kit.WAIT)
    assert set(bus.stats().dropped) <= {"overflow"}
    assert len(set(echoes.payloads)) == len(echoes)  # nothing handled twice
