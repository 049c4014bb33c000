"""No 40 ms stall behind a broker that keeps Nagle on (stock Mosquitto: ``set_tcp_nodelay`` off).

Having just written (SUBSCRIBE, a PUBLISH) puts Linux's TCP in delayed-ACK mode, and the broker's
Nagle then holds its next small packet until that ACK: the first message after a subscribe and
each QoS 1 round trip waited ~44 ms. The transport re-arms TCP_QUICKACK where it is needed
(see ``_Wire._ack_now``).
These run on the shared broker (the stock configuration users have); the bounds are generous
regression guards, the figures are in bench/bench_mqtt.py.
"""

from __future__ import annotations

import asyncio
import socket
import statistics
import time
from typing import Any

import pytest

import cascade_bus
from cascade_bus import Envelope

pytestmark = [
    pytest.mark.mqtt,
    pytest.mark.skipif(
        not hasattr(socket, "TCP_QUICKACK"), reason="TCP_QUICKACK is Linux only (no fix elsewhere)"
    ),
]

BOUND = 0.020  # seconds; the stall was 41-45 ms every time, a fixed delivery ~0.2 ms
SAMPLES = 5


@pytest.mark.parametrize("qos", [0, 1])
@pytest.mark.parametrize("version", ["5", "3.1.1"])
async def test_first_message_after_a_fresh_subscribe_is_not_held_back(
    mqtt_url: str, unique_topic: str, version: str, qos: int, buses: list[cascade_bus.Bus]
) -> None:
    pub = await cascade_bus.connect(mqtt_url, version=version)
    sub = await cascade_bus.connect(mqtt_url, version=version)
    buses += [pub, sub]
    loop = asyncio.get_running_loop()
    delays: list[float] = []
    for i in range(SAMPLES):
        arrived: asyncio.Future[float] = loop.create_future()

        def got(_env: Envelope[Any], arrived: asyncio.Future[float] = arrived) -> None:
            if not arrived.done():
                arrived.set_result(time.perf_counter())

        subscription = await sub.subscribe(f"{unique_topic}/{i}", got, qos=qos)
        start = time.perf_counter()
        await pub.publish(f"{unique_topic}/{i}", {"i": i}, qos=qos)
        async with asyncio.timeout(5):
            delays.append(await arrived - start)
        await subscription.unsubscribe()
    assert statistics.median(delays) < BOUND, [f"{d * 1e3:.1f} ms" for d in delays]


@pytest.mark.parametrize("version", ["5", "3.1.1"])
async def test_qos1_round_trip_is_not_held_back(
    mqtt_url: str, unique_topic: str, version: str, buses: list[cascade_bus.Bus]
) -> None:
    """A publishes, B's handler answers, A waits: a PUBACK then a PUBLISH, each way."""
    a = await cascade_bus.connect(mqtt_url, version=version)
    b = await cascade_bus.connect(mqtt_url, version=version)
    buses += [a, b]
    loop = asyncio.get_running_loop()
    replies: asyncio.Queue[float] = asyncio.Queue()

    async def echo(env: Envelope[Any]) -> None:
        await b.publish(f"{unique_topic}/pong", env.payload, qos=1)

    await b.subscribe(f"{unique_topic}/ping", echo, qos=1)
    await a.subscribe(f"{unique_topic}/pong", lambda _env: replies.put_nowait(loop.time()), qos=1)
    trips: list[float] = []
    for i in range(3 * SAMPLES):
        start = loop.time()
        await a.publish(f"{unique_topic}/ping", {"i": i}, qos=1)
        async with asyncio.timeout(5):
            trips.append(await replies.get() - start)
    assert statistics.median(trips) < BOUND, [f"{t * 1e3:.1f} ms" for t in trips]
