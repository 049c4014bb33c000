"""Last will and the presence helper (``presence_topic``), on a private Mosquitto.

A client that vanishes (connection cut, process killed) gets its will published by the broker;
a clean close does not. ``presence_topic`` keeps a retained ``{"online": ..., "client_id": ...}``
on one topic: online at every (re)connect, offline by the will on a crash, offline on close.
"""

from __future__ import annotations

import asyncio
import sys
import textwrap
import uuid

import pytest

import cascade_bus
from cascade_bus import InvalidURL

pytestmark = pytest.mark.mqtt

VICTIM = textwrap.dedent(
    """
    import asyncio, sys
    import cascade_bus

    async def main() -> None:
        url, topic = sys.argv[1], sys.argv[2]
        bus = await cascade_bus.connect(
            url, will_topic=topic, will_payload='{"gone":"killed"}', will_qos=1
        )
        print("ready", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())
    """
)


@pytest.mark.fault
async def test_will_is_published_when_the_connection_is_cut(
    private_mosquitto, tcp_proxy, unique_topic, kit, buses
):
    broker = private_mosquitto()
    proxy = await tcp_proxy(broker.url)
    observer = await cascade_bus.connect(broker.url)
    buses.append(observer)
    wills = kit.Inbox()
    await observer.subscribe(f"{unique_topic}/will", wills, qos=1)
    victim = await cascade_bus.connect(
        proxy.url_for("mqtt"),
        will_topic=f"{unique_topic}/will",
        will_payload=b'{"gone":"cut"}',
        will_qos=1,
        will_retain=True,
        **kit.FAST_RECONNECT,
    )
    buses.append(victim)

    proxy.pause()  # the victim cannot come back
    assert await proxy.cut() == 1
    assert await wills.wait_for(1) == [{"gone": "cut"}]
    newcomer = kit.Inbox()
    await observer.subscribe(f"{unique_topic}/will", newcomer)
    assert newcomer.payloads == [{"gone": "cut"}]  # will_retain: kept for later subscribers


@pytest.mark.fault
async def test_will_is_published_when_the_process_is_killed(
    private_mosquitto, unique_topic, kit, buses, tmp_path
):
    broker = private_mosquitto()
    observer = await cascade_bus.connect(broker.url)
    buses.append(observer)
    wills = kit.Inbox()
    await observer.subscribe(f"{unique_topic}/will", wills, qos=1)
    script = tmp_path / "victim.py"
    script.write_text(VICTIM)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        broker.url,
        f"{unique_topic}/will",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(kit.WAIT):
            line = await proc.stdout.readline()
        assert line == b"ready\n", (line, await proc.stderr.read() if proc.stderr else b"")
        proc.kill()  # SIGKILL: no DISCONNECT, the kernel closes the socket
        async with asyncio.timeout(kit.WAIT):
            await proc.wait()
        assert await wills.wait_for(1) == [{"gone": "killed"}]
    finally:
        kit.kill(proc)
        await proc.wait()


async def test_no_will_on_a_clean_close(private_mosquitto, unique_topic, kit, buses):
    """close() sends DISCONNECT (and closes the socket): the broker discards the will."""
    broker = private_mosquitto()
    observer = await cascade_bus.connect(broker.url)
    buses.append(observer)
    seen = kit.Inbox()
    await observer.subscribe(f"{unique_topic}/#", seen, qos=1)
    client_id = f"clean-{uuid.uuid4().hex[:8]}"
    async with cascade_bus.connect(
        broker.url, client_id=client_id, will_topic=f"{unique_topic}/will", will_payload=b"{}"
    ):
        pass
    # Had the old connection stayed open, connecting with its client id would take it over
    # and the broker would publish its will before answering this CONNECT.
    async with cascade_bus.connect(broker.url, client_id=client_id):
        pass
    await observer.publish(f"{unique_topic}/marker", {"marker": True}, qos=1)
    assert await seen.wait_for(1) == [{"marker": True}]
    assert [env.topic for env in seen.envelopes] == [f"{unique_topic}/marker"]


@pytest.mark.fault
@pytest.mark.parametrize("version", ["5", "3.1.1"])
async def test_presence_online_crashed_back_and_closed(
    private_mosquitto, tcp_proxy, unique_topic, kit, buses, version
):
    broker = private_mosquitto()
    proxy = await tcp_proxy(broker.url)
    topic = f"{unique_topic}/presence"
    client_id = f"presence-{uuid.uuid4().hex[:8]}"
    online = {"online": True, "client_id": client_id}
    offline = {"online": False, "client_id": client_id}

    async def retained_now() -> list[object]:
        """What a newcomer finds retained on the presence topic."""
        probe = await cascade_bus.connect(broker.url)
        try:
            found = kit.Inbox()
            await probe.subscribe(topic, found)  # retained handed over before it returns
            return found.payloads
        finally:
            await probe.close()

    victim = await cascade_bus.connect(
        proxy.url_for("mqtt"),
        client_id=client_id,
        presence_topic=topic,
        version=version,
        **kit.FAST_RECONNECT,
    )
    buses.append(victim)
    # 1. Online once connect() returned (acknowledged, retained).
    observer = await cascade_bus.connect(broker.url)
    buses.append(observer)
    states = kit.Inbox()
    await observer.subscribe(topic, states, qos=1)
    assert states.payloads == [online]

    # 2. A crash: the broker publishes the will, offline, retained.
    proxy.pause()
    await proxy.cut()
    assert await states.wait_for(2) == [online, offline]
    assert await retained_now() == [offline]

    # 3. Back: online again at the reconnect.
    proxy.resume()
    await kit.wait_connected(victim, reconnects=1)
    assert await states.wait_for(3) == [online, offline, online]
    assert await retained_now() == [online]

    # 4. A clean close says offline itself (a DISCONNECT suppresses the will).
    await victim.close()
    assert await states.wait_for(4) == [online, offline, online, offline]
    assert await retained_now() == [offline]
    await observer.publish(topic, b"", qos=1, retain=True)  # leave nothing retained


def test_presence_options_are_checked():
    with pytest.raises(InvalidURL, match="will_topic"):
        cascade_bus.connect("mqtt://127.0.0.1", presence_topic="p/x", will_topic="w/x")
    with pytest.raises(InvalidURL, match="presence_topic"):
        cascade_bus.connect("mqtt://127.0.0.1", presence_topic="p/+")


def test_bus_presence_is_the_native_will_and_refuses_another_will():
    """The bus's portable ``presence`` option maps onto the will; will_topic conflicts with it."""
    bus = cascade_bus.connect("mqtt://127.0.0.1", presence="p/x")
    assert bus.capabilities.presence
    assert bus.presence_topic == "p/x"
    assert bus.transport.presence_payload(False) == b'{"status":"offline"}'
    with pytest.raises(InvalidURL, match="will_topic"):
        cascade_bus.connect("mqtt://127.0.0.1", presence="p/x", will_topic="w/x")
    with pytest.raises(InvalidURL, match="presence_topic"):
        cascade_bus.connect("mqtt://127.0.0.1", presence="p/x", presence_topic="p/y")
