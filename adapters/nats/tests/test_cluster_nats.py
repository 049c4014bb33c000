"""A 3-node nats-server cluster: failover with replicated JetStream state (issue 8, NATS part).

One cluster per module: three private nats-server processes on free loopback ports (client,
cluster and monitoring ports), routes to one another, JetStream in a store directory each. The
buses get all three URLs and create the stream and the bucket with ``replicas=auto``, which is
3 here. Each test SIGKILLs the node a bus is connected to (chosen to be the node that leads the
meta group, the QoS-1 stream or the KV bucket, the worst case) and checks that the bus
reconnects elsewhere and goes on; afterwards the node is started again and the test waits until
the cluster is whole and every replica current. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import nats.js.errors as js_errors
import pytest
from cascade_bus_nats import NatsTransport

import cascade_bus
from cascade_bus import ConnectError, InvalidURL, NoResponders
from cascade_bus.testing.brokers import BrokerProcess, find_executable
from cascade_bus.testing.pytest_plugin import broker_unavailable

pytestmark = [pytest.mark.nats, pytest.mark.fault]

STREAM = "CASCADE_BUS"
KV_STREAM = "KV_cascade_retained"
#: Bound for the cluster to form, a node to come back, replicas to catch up.
CLUSTER_WAIT = 30.0
#: Bound for one failover: reconnect, leader elections, redeliveries after ``ack_wait``.
FAILOVER_WAIT = 30.0
#: Bus options: quick reconnects, quick redelivery of what the dead node swallowed.
FAST: dict[str, Any] = {
    "reconnect_wait": 0.02,
    "connect_attempt_timeout": 1.0,
    "ack_timeout": 1.0,
    "ack_wait": 1.0,
}


@dataclass
class Node:
    """One nats-server of the cluster."""

    name: str
    broker: BrokerProcess
    cluster_port: int
    http_port: int

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.broker.port}"

    def monitor(self, path: str) -> dict[str, Any]:
        """GET a monitoring endpoint (``/jsz``, ``/routez``...) of this node."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=1) as r:
            data: dict[str, Any] = json.load(r)
            return data


class Cluster:
    """Three nats-server processes routed to one another, JetStream clustered."""

    def __init__(self, exe: Path, size: int = 3) -> None:
        self.exe = exe
        self.name = f"cbus-{os.urandom(3).hex()}"
        ports = _free_ports(3 * size)
        client_ports, cluster_ports, http_ports = ports[:size], ports[size:-size], ports[-size:]
        self.nodes = [
            Node(
                f"n{i + 1}",
                BrokerProcess(
                    f"nats-cluster-n{i + 1}",
                    "nats",
                    self._command(i, cluster_ports),
                    client_ports[i],
                ),
                cluster_ports[i],
                http_ports[i],
            )
            for i in range(size)
        ]

    def _command(self, index: int, cluster_ports: list[int]) -> Any:
        def command(port: int, workdir: Path) -> list[str]:
            routes = ", ".join(
                f"nats-route://127.0.0.1:{p}" for i, p in enumerate(cluster_ports) if i != index
            )
            config = workdir / "nats.conf"
            config.write_text(
                f"server_name: n{index + 1}\n"
                f"listen: 127.0.0.1:{port}\n"
                f"http: 127.0.0.1:{self.nodes[index].http_port}\n"
                f'jetstream {{ store_dir: "{workdir / "jetstream"}" }}\n'
                f"cluster {{ name: {self.name}, listen: 127.0.0.1:{cluster_ports[index]}, "
                f"routes: [{routes}] }}\n"
            )
            return [str(self.exe), "-c", str(config)]

        return command

    def url(self, first: Node | None = None) -> str:
        """``nats://a,b,c`` with ``first`` first (the bus connects to it: randomize is off)."""
        order = sorted(self.nodes, key=lambda n: n is not first)
        return "nats://" + ",".join(node.address for node in order)

    def servers(self) -> list[str]:
        """Every node's URL, for a plain nats-py client."""
        return [f"nats://{node.address}" for node in self.nodes]

    def node(self, name: str) -> Node:
        return next(node for node in self.nodes if node.name == name)

    def node_of(self, bus: cascade_bus.Bus) -> Node:
        """The node a bus is connected to right now."""
        transport = bus.transport
        assert isinstance(transport, NatsTransport)
        assert transport.client is not None
        url = transport.client.connected_url
        assert url is not None
        return next(node for node in self.nodes if node.broker.port == url.port)

    def others(self, node: Node) -> list[Node]:
        return [n for n in self.nodes if n is not node]

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        for node in self.nodes:
            node.broker.start()
        self.wait_formed(CLUSTER_WAIT)

    def close(self) -> None:
        for node in self.nodes:
            node.broker.close()

    def formed(self) -> bool:
        """Every node routed to every other and agreeing on a JetStream meta leader."""
        leaders = set()
        for node in self.nodes:
            if not node.broker.running:
                return False
            try:
                if node.monitor("/routez").get("num_routes") != len(self.nodes) - 1:
                    return False
                meta = node.monitor("/jsz").get("meta_cluster") or {}
            except OSError:
                return False
            if not meta.get("leader") or meta.get("cluster_size") != len(self.nodes):
                return False
            leaders.add(meta["leader"])
        return len(leaders) == 1

    def wait_formed(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.formed():
            if time.monotonic() >= deadline:
                logs = "\n".join(n.broker.read_log()[-1500:] for n in self.nodes)
                raise TimeoutError(f"the cluster did not form within {timeout}s:\n{logs}")
            time.sleep(0.05)

    def meta_leader(self) -> Node:
        return self.node(self.nodes[0].monitor("/jsz")["meta_cluster"]["leader"])

    async def kill(self, node: Node) -> None:
        """SIGKILL one node (no goodbye to clients or peers) and reap it."""
        pid = node.broker.pid
        assert pid is not None, f"{node.name} is not running"
        os.kill(pid, signal.SIGKILL)
        await node.broker.astop()

    async def heal(self) -> None:
        """Start every stopped node; wait until the cluster is whole and replicas current."""
        for node in self.nodes:
            if not node.broker.running:
                await node.broker.astart()
        await asyncio.to_thread(self.wait_formed, CLUSTER_WAIT)
        nc = await nats.connect(servers=self.servers(), connect_timeout=2)
        try:
            jsm = nc.jsm(timeout=2)
            async with asyncio.timeout(CLUSTER_WAIT):
                for stream in (STREAM, KV_STREAM):
                    # The server's state has no event to wait on: poll it, bounded above.
                    while True:
                        if await _replicas_current(jsm, stream):
                            break
                        await asyncio.sleep(0.05)
        finally:
            await nc.close()


async def _replicas_current(jsm: Any, stream: str) -> bool:
    try:
        info = await jsm.stream_info(stream)
    except js_errors.NotFoundError:
        return True  # not created yet: nothing to catch up
    except (nats.errors.Error, TimeoutError):
        return False
    cluster = info.cluster
    if cluster is None or not cluster.leader:
        return False
    return all(peer.current and not peer.offline for peer in cluster.replicas or [])


async def stream_leader(cluster: Cluster, stream: str) -> str:
    """The name of the node leading ``stream``."""
    nc = await nats.connect(servers=cluster.servers(), connect_timeout=2)
    try:
        info = await nc.jsm(timeout=5).stream_info(stream)
        assert info.cluster is not None
        assert info.cluster.leader
        assert info.config.num_replicas == 3, info.config  # replicas=auto chose 3
        return info.cluster.leader
    finally:
        await nc.close()


def _free_ports(count: int) -> list[int]:
    """``count`` distinct ports that were free a moment ago (all bound at once, then freed)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]


def _server_version(exe: Path) -> tuple[int, ...]:
    out = subprocess.run(
        [str(exe), "--version"], capture_output=True, text=True, timeout=10, check=False
    ).stdout
    found = re.search(r"v?(\d+)\.(\d+)\.(\d+)", out)
    return tuple(int(x) for x in found.groups()) if found else (0,)


@pytest.fixture(scope="module")
def nats_cluster() -> Iterator[Cluster]:
    """Three private nats-servers forming one JetStream cluster (for this module)."""
    exe = find_executable(
        "nats-server", "/usr/sbin/nats-server", Path(sys.executable).parent / "nats-server"
    )
    if exe is None:
        broker_unavailable("nats", "`nats-server` not found (a 3-node cluster needs it)")
    version = _server_version(exe)
    if version < (2, 2, 0):
        broker_unavailable("nats", f"{exe} is {version}; clustered JetStream needs 2.2 or later")
    cluster = Cluster(exe)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
async def cluster(nats_cluster: Cluster) -> AsyncIterator[Cluster]:
    """The module's cluster, whole again (every node up, replicas current) after the test."""
    yield nats_cluster
    await nats_cluster.heal()


async def connect(url: str, buses: list[cascade_bus.Bus], **options: Any) -> cascade_bus.Bus:
    bus = await cascade_bus.connect(url, **{**FAST, **options})
    buses.append(bus)
    return bus


def test_replicas_option_is_checked() -> None:
    """``replicas`` is ``auto`` or 1 to 5."""
    assert cascade_bus.connect("nats://h?replicas=auto").transport._opts.replicas == 0
    assert cascade_bus.connect("nats://h", replicas=3).transport._opts.replicas == 3
    for bad in ("0", "6", "three"):
        with pytest.raises(InvalidURL, match="replicas"):
            cascade_bus.connect(f"nats://h?replicas={bad}")


async def test_explicit_replicas_a_single_server_cannot_place(private_nats, buses) -> None:
    """``replicas=3`` on a lone server: `ConnectError` saying so; ``auto`` makes 1 replica."""
    server = private_nats()
    with pytest.raises(ConnectError, match="replicas=3"):
        await cascade_bus.connect(server.url, replicas=3)
    bus = await connect(server.url, buses)
    nc = await nats.connect(server.url)
    try:
        assert (await nc.jsm().stream_info(STREAM)).config.num_replicas == 1
        assert (await nc.jsm().stream_info(KV_STREAM)).config.num_replicas == 1
    finally:
        await nc.close()
    await bus.publish("cluster/single", 1, qos=1)


async def test_qos0_keeps_flowing_both_ways_when_the_node_is_killed(
    cluster, unique_topic, kit, buses
):
    """A bus on the meta leader publishes and receives; the node dies; it goes on elsewhere.

    Two buses publish numbered QoS-0 messages to each other without pause while the node of
    one of them is killed. QoS 0 may lose what was on its way through the dead node and what
    was published before the moved subscription's interest reached the other nodes: those
    losses are counted and reported. Once a message published after the kill got through,
    nothing more is lost, nothing is duplicated, and order holds.
    """
    victim = cluster.meta_leader()
    moved = await connect(cluster.url(victim), buses)
    peer = await connect(cluster.url(cluster.others(victim)[0]), buses)
    assert cluster.node_of(moved) is victim
    to_moved, to_peer = kit.Inbox(), kit.Inbox()
    await moved.subscribe(f"{unique_topic}/to-moved", to_moved)
    await peer.subscribe(f"{unique_topic}/to-peer", to_peer)
    sent = {"to-moved": 0, "to-peer": 0}
    stop = asyncio.Event()

    async def publish_until_stopped(sender: cascade_bus.Bus, direction: str) -> None:
        while not stop.is_set():
            await sender.publish(f"{unique_topic}/{direction}", sent[direction])
            sent[direction] += 1
            await sender.flush(timeout=10)
            # A load generator's pace (not a synchronisation): both buses share this process,
            # and a publisher outrunning the other bus's receive loop would delay that bus's
            # own round trips behind the backlog the server queued for it.
            await asyncio.sleep(0.001)

    publishers = [
        asyncio.create_task(publish_until_stopped(peer, "to-moved")),
        asyncio.create_task(publish_until_stopped(moved, "to-peer")),
    ]
    try:
        await to_moved.wait_for(100)
        await to_peer.wait_for(100)
        await cluster.kill(victim)
        killed_at = dict(sent)
        await kit.wait_connected(moved, reconnects=1, timeout=FAILOVER_WAIT)
        assert cluster.node_of(moved) is not victim
        # 200 more each way after the kill, and the publishers still running meanwhile.
        for inbox, direction in ((to_moved, "to-moved"), (to_peer, "to-peer")):
            await inbox.wait_until(
                lambda inbox=inbox, d=direction: (
                    bool(inbox.payloads) and inbox.payloads[-1] >= killed_at[d] + 200
                ),
                f"200 {direction} messages published after the kill",
                timeout=FAILOVER_WAIT,
            )
    finally:
        stop.set()
        outcome = await asyncio.gather(*publishers, return_exceptions=True)
    assert outcome == [None, None], outcome
    losses = {}
    for inbox, direction in ((to_moved, "to-moved"), (to_peer, "to-peer")):
        got = inbox.payloads
        assert got == sorted(set(got)), f"{direction}: duplicated or out of order"
        first_after = next(n for n in got if n >= killed_at[direction])
        assert got[got.index(first_after) :] == list(range(first_after, got[-1] + 1)), direction
        losses[direction] = got[-1] + 1 - len(got)
    print(
        f"QoS 0 across the failover of {victim.name} (moved bus now on "
        f"{cluster.node_of(moved).name}): sent {sent}, lost {losses} (counted, expected)"
    )
    assert moved.stats().reconnects == 1
    assert peer.stats().reconnects == 0
    # Request/reply across nodes after the failover, and "no responders" from the new node.
    await peer.subscribe(f"{unique_topic}/svc", lambda env: peer.reply(env, "pong"))
    async with asyncio.timeout(FAILOVER_WAIT):
        while True:  # the responder's interest reaches the moved bus's node a moment later
            try:
                reply = await moved.request(f"{unique_topic}/svc", "ping", timeout=5)
                break
            except NoResponders:
                continue
    assert reply.payload == "pong"
    with pytest.raises(NoResponders):
        await moved.request(f"{unique_topic}/nobody", "ping", timeout=3600)


async def test_qos1_messages_survive_killing_the_stream_leader(cluster, unique_topic, kit, buses):
    """2,000 QoS-1 messages; the node leading the stream, with both buses on it, dies mid-run.

    Every message arrives at least once: the stream and the subscriber's durable consumer are
    replicated (R3) and elect new leaders, nats-py moves both buses to another node, the
    publisher resends what was never acknowledged (the stream drops the copies it has), and
    what the dead node had pushed but nobody acked is redelivered after ``ack_wait``
    (duplicates, counted).
    """
    total = 2_000
    await (await connect(cluster.url(), buses)).flush()  # the stream exists before we ask
    victim = cluster.node(await stream_leader(cluster, STREAM))
    sub = await connect(cluster.url(victim), buses)
    pub = await connect(cluster.url(victim), buses)
    assert cluster.node_of(sub) is victim
    assert cluster.node_of(pub) is victim
    seen: set[int] = set()
    duplicates = 0
    kill_at = asyncio.Event()
    everything = asyncio.Event()

    def record(env: cascade_bus.Envelope[Any]) -> None:
        nonlocal duplicates
        if env.payload in seen:
            duplicates += 1
            return
        seen.add(env.payload)
        if len(seen) == total // 4:
            kill_at.set()
        if len(seen) == total:
            everything.set()

    await sub.subscribe(f"{unique_topic}/q1", record, qos=1)
    published = 0

    async def publish_all() -> None:
        nonlocal published
        for i in range(total):
            await pub.publish(f"{unique_topic}/q1", i, qos=1)
            published += 1

    started = time.monotonic()
    killed_at = ""
    try:
        async with asyncio.timeout(FAILOVER_WAIT * 2):
            publishing = asyncio.create_task(publish_all())
            await kill_at.wait()
            killed_at = f"{len(seen)} received/{published} published"
            await cluster.kill(victim)
            await publishing
            await everything.wait()
            await kit.nats(sub).wait_jetstream()
    finally:
        report = (
            f"killed {victim.name} at {killed_at}; {len(seen)}/{total} distinct in "
            f"{time.monotonic() - started:.2f}s; duplicates {duplicates}; now on "
            f"{cluster.node_of(sub).name if kit.nats(sub).client else '?'}; "
            f"subscriber {sub.stats()}; publisher {pub.stats()}"
        )
        print(report)
    assert len(seen) == total, report
    assert sub.stats().delivered == total + duplicates, report
    assert sub.stats().dropped_total == 0, report
    assert pub.stats().dropped_total == 0, report
    assert pub.stats().published == total, report
    assert sub.stats().reconnects == 1, report
    assert pub.stats().reconnects == 1, report
    assert cluster.node_of(sub) is not victim


async def test_retained_values_survive_killing_the_bucket_leader(cluster, unique_topic, kit, buses):
    """Retained values live in the replicated KV bucket: the node leading it dies, none is lost.

    Read back with a wildcard (a snapshot consumer) and with exact topics (reads through the
    bucket's leader), by the bus that was on the dead node and by a fresh one; written again
    after the failover.
    """
    count = 20
    writer = await connect(cluster.url(), buses)
    await writer.flush()
    victim = cluster.node(await stream_leader(cluster, KV_STREAM))
    writer_node = cluster.others(victim)[0]
    await writer.close()
    writer = await connect(cluster.url(writer_node), buses)
    reader = await connect(cluster.url(victim), buses)
    assert cluster.node_of(reader) is victim
    for i in range(count):
        await writer.publish(f"{unique_topic}/r/{i}", {"i": i}, retain=True)
    before = kit.Inbox()
    await reader.subscribe(f"{unique_topic}/r/+", before)
    assert sorted(e.payload["i"] for e in before.envelopes) == list(range(count))

    await cluster.kill(victim)
    await kit.wait_connected(reader, reconnects=1, timeout=FAILOVER_WAIT)
    async with asyncio.timeout(FAILOVER_WAIT):
        await kit.nats(reader).wait_jetstream()
    fresh = await connect(cluster.url(cluster.others(victim)[1]), buses)
    for bus in (reader, fresh):
        wild = kit.Inbox()
        await bus.subscribe(f"{unique_topic}/r/+", wild)
        assert sorted(e.payload["i"] for e in wild.envelopes) == list(range(count))
        exact = kit.Inbox()
        await bus.subscribe(f"{unique_topic}/r/7", exact)
        assert exact.payloads == [{"i": 7}]
    # Writable again under the new leader; a new subscriber sees the new value only.
    async with asyncio.timeout(FAILOVER_WAIT):
        await writer.publish(f"{unique_topic}/r/7", {"i": 7, "after": True}, retain=True)
    late = kit.Inbox()
    await reader.subscribe(f"{unique_topic}/r/7", late)
    assert late.payloads == [{"i": 7, "after": True}]
    for i in range(count):
        await writer.publish(f"{unique_topic}/r/{i}", b"", retain=True)
