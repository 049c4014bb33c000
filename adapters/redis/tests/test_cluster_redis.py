"""Redis Cluster (``redis+cluster://``) on a private 3-master cluster on loopback.

The core conformance suite runs unchanged twice: with the default shard key (the first topic
level: the suite's topics all share the slot of ``{conf}``) and with ``shard_levels=2``, where
every test's prefix ``conf/<id>`` is its own shard key, so the tests spread over the three masters.
Its patterns are *narrow* either way (the shard levels hold no wildcard). Broad patterns (a
wildcard inside the shard levels) get their own tests below: the suite's wildcard matrix with a
fence per shard key (a broad subscription is ordered per shard key only, while the suite's single
sentinel assumes one order across all of a publisher's topics), retained replay across masters,
and the retained race. The rest checks where keys live, order per shard, QoS 1 across masters,
NOSCRIPT after a script flush, and reconnecting links.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import uuid
from typing import Any
from urllib.parse import quote

import pytest
from cascade_bus_redis import RedisTransport, hash_tag, shard_key
from cascade_bus_redis._cluster import ClusterLinks, RedisClusterTransport, slot_tags
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot

from cascade_bus import ConnectError, Envelope, InvalidURL, UnsupportedFeature, connect
from cascade_bus.testing import ConformanceSuite
from cascade_bus.testing.conformance import WILDCARD_MATRIX, WILDCARD_TOPICS, with_query
from cascade_bus.testing.runs import RetainedRuns, retained_storm

pytestmark = pytest.mark.redis

P = "cascade_bus:"


class TestRedisCluster(ConformanceSuite):
    @pytest.fixture
    def transport_url(self, redis_cluster: Any) -> str:
        return str(redis_cluster.url)


class TestRedisClusterTwoShardLevels(ConformanceSuite):
    """shard_levels=2: each test's topics get their own slot, spread over the masters."""

    @pytest.fixture
    def transport_url(self, redis_cluster: Any) -> str:
        return with_query(str(redis_cluster.url), shard_levels="2")


@pytest.fixture
async def cluster_client(redis_cluster: Any) -> Any:
    """A plain redis-py cluster client on the private cluster (to look at keys and slots)."""
    client = RedisCluster(
        startup_nodes=[ClusterNode("127.0.0.1", port) for port in redis_cluster.ports],
        protocol=2,
    )
    await client.initialize()
    yield client
    await client.aclose()


def cluster_of(bus: Any) -> RedisClusterTransport:
    transport = bus.transport
    assert isinstance(transport, RedisClusterTransport)
    return transport


def links_of(bus: Any) -> ClusterLinks:
    """The cluster transport's links part (its channels and per-master pub/sub links)."""
    links = cluster_of(bus)._links
    assert isinstance(links, ClusterLinks)
    return links


async def owner(client: RedisCluster, key: str) -> str:
    """The master that holds ``key`` (and checks that it really is there)."""
    node = client.get_node_from_key(key)
    assert node is not None
    assert await client.execute_command("EXISTS", key, target_nodes=node) == 1, key
    return str(node.name)


# -- no broker -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "levels", "key"),
    [
        ("a/b/c", 1, "a"),
        ("a/b/c", 2, "a/b"),
        ("a", 2, "a"),
        ("a/b/#", 2, "a/b"),
        ("a/+/c", 1, "a"),
        ("a/#", 1, "a"),
        ("a/#", 2, None),  # also matches "a", whose key is "a", not "a/<x>"
        ("+/x", 1, None),
        ("#", 1, None),
        ("a/+/c", 2, None),
        ("$SYS/x", 1, "$SYS"),
    ],
)
def test_shard_key(name: str, levels: int, key: str | None) -> None:
    assert shard_key(name, levels) == key


def test_hash_tags_keep_one_shard_in_one_slot() -> None:
    for key in ("plain", "with}brace", "}lead", "a{b}c", "50%", "%7D", "ünï"):
        tag = hash_tag(key)
        assert tag.count("}") == 1, tag
        assert tag.endswith("}"), tag
        slots = {key_slot(f"{P}{tag}{suffix}".encode()) for suffix in ("retained", "seq", "x")}
        assert len(slots) == 1, key
    assert hash_tag("a}b") != hash_tag("a%7Db")  # the escaping is injective
    tags = slot_tags()
    assert len(tags) == 16384
    assert all(key_slot(b"x{" + tag + b"}broad") == slot for slot, tag in enumerate(tags))


def test_urls_and_options() -> None:
    bus = connect("redis+cluster://u:pw@a:7000,b:7001?shard_levels=2")
    transport = cluster_of(bus)
    assert transport._opts.hosts == (("a", 7000), ("b", 7001))
    assert transport._opts.shard_levels == 2
    assert "pw" not in repr(transport)
    assert "pw" not in repr(bus)
    assert cluster_of(connect("rediss+cluster://a:7000?tls_verify=false"))._opts.tls is not None
    with pytest.raises(InvalidURL, match="database 0"):
        connect("redis+cluster://a:7000/3")
    with pytest.raises(InvalidURL, match="database 0"):
        connect("redis+cluster://a:7000?db=1")
    with pytest.raises(InvalidURL, match="braces"):
        connect("redis+cluster://a:7000?prefix=x{y}")
    with pytest.raises(InvalidURL, match="shard_levels"):
        connect("redis+cluster://a:7000?shard_levels=0")
    with pytest.raises(InvalidURL, match=r"redis\+cluster"):
        connect("redis://a:6379?shard_levels=2")
    mapped = cluster_of(connect("redis+cluster://a:7000?address_map=10.0.0.1:7000%3D127.0.0.1:1"))
    assert mapped._opts.address_map == {("10.0.0.1", 7000): ("127.0.0.1", 1)}
    for bad in ("10.0.0.1:7000", "10.0.0.1:7000%3Dnoport", "x%3D127.0.0.1:1"):
        with pytest.raises(InvalidURL, match="address_map"):
            connect(f"redis+cluster://a:7000?address_map={bad}")
    with pytest.raises(InvalidURL, match="address_map"):
        connect("redis://a:6379?address_map=a:1%3Db:2")  # redis+cluster:// only
    with pytest.raises(InvalidURL, match=r"redis\+cluster://"):
        connect("redis://a:6379,b:6379")
    # The standalone transport still takes braces in its prefix (no hash tags there).
    assert isinstance(connect("redis://a:6379?prefix=x{y}").transport, RedisTransport)


# -- where things live -----------------------------------------------------------------------------


async def test_topics_spread_over_masters_and_each_stays_in_one_slot(
    redis_cluster, open_bus, cluster_client, kit
):
    """Retained bodies of 24 first levels spread over the masters; a topic's retained body,
    its QoS 1 stream and its pattern lease share one slot."""
    uid = uuid.uuid4().hex[:12]
    bus = await open_bus(redis_cluster.url)
    firsts = [f"spread{i}-{uid}" for i in range(24)]
    for i, first in enumerate(firsts):
        await bus.publish(f"{first}/state", {"i": i}, retain=True)
    await bus.flush()
    owners = {first: await owner(cluster_client, f"{P}{{{first}}}retained") for first in firsts}
    assert len(set(owners.values())) > 1, owners  # 3^-23 odds of a false failure
    assert set(owners.values()) <= {n.name for n in cluster_client.get_primaries()}

    first = firsts[0]
    transport = cluster_of(bus)
    inbox = kit.Inbox()
    await bus.subscribe(f"{first}/#", inbox, qos=1)
    await bus.subscribe(f"{first}/+", kit.Inbox())  # a QoS 0 pattern: leased in the namespace
    stream = f"{P}{{{first}}}s:{transport.client_id}:0/{first}/#"
    slot = key_slot(f"{P}{{{first}}}retained".encode())
    assert key_slot(stream.encode()) == slot
    assert await owner(cluster_client, stream) == owners[first]
    assert await owner(cluster_client, f"{P}{{{first}}}routes") == owners[first]
    assert await owner(cluster_client, f"{P}{{{first}}}patterns") == owners[first]
    assert await inbox.wait_for(1) == [{"i": 0}]  # the retained body, through the stream
    await bus.publish(f"{first}/live", "x", qos=1)
    assert await inbox.wait_for(2) == [{"i": 0}, "x"]
    for first in firsts:
        await bus.publish(f"{first}/state", b"", retain=True)


async def test_order_per_topic_across_shards(redis_cluster, open_bus, kit):
    """Interleaved publishes to 6 shard keys: every subscription sees each topic in order."""
    uid = uuid.uuid4().hex[:12]
    publisher, subscriber = await open_bus(redis_cluster.url), await open_bus(redis_cluster.url)
    firsts = [f"order{i}-{uid}" for i in range(6)]
    exact, pattern, qos1 = kit.Inbox(), kit.Inbox(), kit.Inbox()
    broad = kit.Inbox()
    for first in firsts:
        await subscriber.subscribe(f"{first}/seq", exact)
        await subscriber.subscribe(f"{first}/+", pattern)
        await subscriber.subscribe(f"{first}/#", qos1, qos=1)
    await subscriber.subscribe(f"+/seq-{uid}", broad)
    n = 300
    for i in range(n):
        for first in firsts:
            await publisher.publish(f"{first}/seq", i)
            await publisher.publish(f"{first}/seq-{uid}", i)
    total = n * len(firsts)
    await exact.wait_for(total)
    await pattern.wait_for(2 * total)
    await qos1.wait_for(2 * total)
    await broad.wait_for(total)
    for inbox in (exact, pattern, qos1, broad):
        by_topic: dict[str, list[int]] = {}
        for env in inbox.envelopes:
            by_topic.setdefault(env.topic, []).append(env.payload)
        assert all(values == list(range(n)) for values in by_topic.values()), inbox
        assert len(by_topic) in (len(firsts), 2 * len(firsts))


# -- QoS 1 and queue groups ------------------------------------------------------------------------


async def test_qos1_across_masters_all_arrive(redis_cluster, open_bus, cluster_client, kit):
    uid = uuid.uuid4().hex[:12]
    publisher = await open_bus(redis_cluster.url)
    subscriber = await open_bus(redis_cluster.url)
    firsts = [f"q{i}-{uid}" for i in range(8)]
    owners = set()
    seen: set[int] = set()
    received = 0
    progress = asyncio.Event()

    def handle(env: Envelope[Any]) -> None:
        nonlocal received
        received += 1
        seen.add(env.payload)
        progress.set()

    for first in firsts:
        await subscriber.subscribe(f"{first}/jobs/+", handle, qos=1)
        owners.add(cluster_client.get_node_from_key(f"{P}{{{first}}}routes").name)
    assert len(owners) > 1
    total = 4000
    for start in range(0, total, 200):
        await asyncio.gather(
            *(
                publisher.publish(f"{firsts[i % 8]}/jobs/{i % 3}", i, qos=1)
                for i in range(start, start + 200)
            )
        )
    async with asyncio.timeout(kit.WAIT * 3):
        while len(seen) < total:
            progress.clear()
            await progress.wait()
    assert seen == set(range(total))
    assert received - total <= subscriber.stats().duplicates


async def test_queue_group_on_a_cluster(redis_cluster, open_bus, kit):
    uid = uuid.uuid4().hex[:12]
    handled: list[list[int]] = [[], [], []]
    progress = asyncio.Event()

    def member(i: int) -> Any:
        def handle(env: Envelope[Any]) -> None:
            handled[i].append(env.payload)
            progress.set()

        return handle

    for i in range(3):
        bus = await open_bus(redis_cluster.url)
        await bus.subscribe(f"work-{uid}/+", member(i), qos=1, queue="pool")
    publisher = await open_bus(redis_cluster.url)
    for i in range(300):
        await publisher.publish(f"work-{uid}/{i % 4}", i, qos=1)
    async with asyncio.timeout(kit.WAIT):
        while sum(map(len, handled)) < 300:
            progress.clear()
            await progress.wait()
    assert sorted(p for got in handled for p in got) == list(range(300))


# -- broad patterns --------------------------------------------------------------------------------


async def test_broad_pattern_spans_every_master(redis_cluster, open_bus, cluster_client, kit):
    """``+/events-<id>`` (a wildcard on the shard level): retained replay and live messages
    from every master, the exact filter, the ``$`` rule, leases in every slot, and refusal of
    what a broad pattern cannot do (QoS 1, queue groups)."""
    uid = uuid.uuid4().hex[:12]
    publisher, subscriber = await open_bus(redis_cluster.url), await open_bus(redis_cluster.url)
    firsts = [f"broad{i}-{uid}" for i in range(9)]
    for i, first in enumerate(firsts):
        await publisher.publish(f"{first}/events-{uid}", {"retained": i}, retain=True)
    await publisher.publish(f"$sys-{uid}/events-{uid}", {"dollar": True}, retain=True)
    await publisher.flush()
    owners = {cluster_client.get_node_from_key(f"{P}{{{f}}}retained").name for f in firsts}
    assert len(owners) > 1

    inbox = kit.Inbox()
    sub = await subscriber.subscribe(f"+/events-{uid}", inbox)
    assert sorted(p["retained"] for p in inbox.payloads) == list(range(9))  # before returning
    await publisher.publish(f"$sys-{uid}/events-{uid}", {"no": 3})
    for first in firsts:
        await publisher.publish(f"{first}/events-{uid}", {"live": first})
        await publisher.publish(f"{first}/events-{uid}/deeper", {"no": 1})
        await publisher.publish(f"{first}/other-{uid}", {"no": 2})
        # Order holds per shard key (not across them): one sentinel per shard key.
        await publisher.publish(f"{first}/events-{uid}", {"end": first})
    await inbox.wait_until(lambda: sum("end" in p for p in inbox.payloads) == 9, "9 sentinels")
    live = [p for p in inbox.payloads[9:] if "end" not in p]
    assert sorted(p["live"] for p in live) == sorted(firsts), live

    # The lease sits in every slot's broad hash (sampled on every master) until unsubscribe().
    (channel,) = links_of(subscriber)._classic.values()
    samples = [f"{P}{{{slot_tags()[slot].decode()}}}broad" for slot in (0, 6000, 16383, 9000)]
    assert {cluster_client.get_node_from_key(key).name for key in samples} == {
        n.name for n in cluster_client.get_primaries()
    }
    for key in samples:
        assert await cluster_client.hexists(key, channel.field.decode())
    await sub.unsubscribe()
    for key in samples:
        assert not await cluster_client.hexists(key, channel.field.decode())

    with pytest.raises(UnsupportedFeature, match="shard"):
        await subscriber.subscribe(f"+/events-{uid}", kit.Inbox(), qos=1)
    with pytest.raises(UnsupportedFeature, match="shard"):
        await subscriber.subscribe(f"+/events-{uid}", kit.Inbox(), queue="w")
    for first in firsts:
        await publisher.publish(f"{first}/events-{uid}", b"", retain=True)
    await publisher.publish(f"$sys-{uid}/events-{uid}", b"", retain=True)


async def test_wildcard_matrix_with_broad_patterns(redis_cluster, open_bus, kit):
    """The conformance wildcard matrix under ``w<id>/`` with ``shard_levels=2``: ``w<id>/+``,
    ``w<id>/#``, ``w<id>/+/b``... are broad (their topics spread over 5 shard keys), the rest
    narrow or exact; each pattern gets exactly its topics."""
    uid = uuid.uuid4().hex[:12]
    url = with_query(redis_cluster.url, shard_levels="2")
    subscriber, publisher = await open_bus(url), await open_bus(url)
    root = f"w{uid}"
    inboxes = {pattern: kit.Inbox() for pattern in WILDCARD_MATRIX}
    for pattern, inbox in inboxes.items():
        await subscriber.subscribe(f"{root}/{pattern}", inbox)
    broad = {p for p in WILDCARD_MATRIX if shard_key(f"{root}/{p}", 2) is None}
    assert broad == {"+", "+/b", "+/+", "+/+/c", "#"}
    assert len({shard_key(f"{root}/{t}", 2) for t in WILDCARD_TOPICS}) == 5
    for name in WILDCARD_TOPICS:
        await publisher.publish(f"{root}/{name}", {"t": name})
    # A fence per (pattern, shard key it matches topics in), published after everything:
    # order holds per shard key, so once every fence is in, every message of the pattern is.
    fences: dict[str, int] = {}
    for pattern, expected in WILDCARD_MATRIX.items():
        by_key = {shard_key(f"{root}/{t}", 2): t for t in sorted(expected)}
        fences[pattern] = len(by_key)
        for name in by_key.values():
            await publisher.publish(f"{root}/{name}", {"fence": pattern})
    failures = []
    for pattern, inbox in inboxes.items():
        await inbox.wait_until(
            lambda inbox=inbox, pattern=pattern: (
                sum(p.get("fence") == pattern for p in inbox.payloads) == fences[pattern]
            ),
            f"the fences of {pattern!r}",
        )
        got = sorted(p["t"] for p in inbox.payloads if "t" in p)
        if got != sorted(WILDCARD_MATRIX[pattern]):
            failures.append(f"{pattern!r}: expected {sorted(WILDCARD_MATRIX[pattern])}, got {got}")
        if any(
            env.topic != f"{root}/{env.payload['t']}"
            for env in inbox.envelopes
            if "t" in env.payload
        ):
            failures.append(f"{pattern!r}: a wrong concrete topic")
    assert not failures, "\n".join(failures)


async def test_scripts_flushed_are_loaded_again(redis_cluster, open_bus, cluster_client, kit):
    """After SCRIPT FLUSH on every master (as after a restart): publishes, leases and broad
    subscriptions reload the scripts and go on (the broad fast path falls back slot by slot)."""
    uid = uuid.uuid4().hex[:12]
    publisher, subscriber = await open_bus(redis_cluster.url), await open_bus(redis_cluster.url)
    narrow = kit.Inbox()
    await subscriber.subscribe(f"flush-{uid}/+", narrow)
    await cluster_client.execute_command("SCRIPT FLUSH", target_nodes=RedisCluster.PRIMARIES)
    broad = kit.Inbox()
    await subscriber.subscribe(f"+/flushed-{uid}", broad)
    await cluster_client.execute_command("SCRIPT FLUSH", target_nodes=RedisCluster.PRIMARIES)
    for i in range(20):
        await publisher.publish(f"flush-{uid}/flushed-{uid}", i, qos=i % 2)
    assert await narrow.wait_for(20) == list(range(20))
    assert await broad.wait_for(20) == list(range(20))
    assert publisher.stats().dropped_total == 0


async def test_plain_clients_and_junk_on_shard_channels(
    redis_cluster, open_bus, cluster_client, kit
):
    """A plain redis-py client reads the frames with SSUBSCRIBE and may publish a frame of its
    own (bare JSON becomes the payload); what is not a frame is ignored, never delivered."""
    uid = uuid.uuid4().hex[:12]
    topic = f"plain-{uid}/x"
    channel = f"{P}{{plain-{uid}}}t:{topic}"
    bus = await open_bus(redis_cluster.url)
    inbox = kit.Inbox()
    await bus.subscribe(topic, inbox)
    pubsub = cluster_client.pubsub()
    try:
        await pubsub.ssubscribe(channel)
        for junk in (b"no frame", b"x\x00t\x00body", b"\x00\x00body", b"12\x00"):
            await cluster_client.spublish(channel, junk)
        await cluster_client.spublish(channel, b"\x00" + topic.encode() + b'\x00{"plain": 1}')
        await bus.publish(topic, {"bus": 2})
        assert await inbox.wait_for(2) == [{"plain": 1}, {"bus": 2}]
        frames = []
        async with asyncio.timeout(kit.WAIT):
            while len(frames) < 6:
                message = await pubsub.get_sharded_message(timeout=1.0)
                if message is not None and message["type"] in ("smessage", b"smessage"):
                    frames.append(message["data"])
        seq, name, body = frames[-1].split(b"\x00", 2)
        assert (seq, name) == (b"", topic.encode())
        assert json.loads(body)["data"] == {"bus": 2}  # the envelope, as on a standalone server
    finally:
        await pubsub.aclose()
    assert len(inbox.payloads) == 2


# -- the retained race, across shards --------------------------------------------------------------

ROUNDS = 200


@pytest.mark.parametrize("qos", [0, 1])
async def test_subscribe_during_retained_storm(redis_cluster, open_bus, qos) -> None:
    """Subscribing (exact, narrow pattern, broad pattern) while retained topics on two shard keys
    are rewritten: per topic, one unbroken run ending with the last value, no gap, no repeat."""
    uid = uuid.uuid4().hex[:12]
    publisher = await open_bus(redis_cluster.url)
    buses = [await open_bus(redis_cluster.url) for _ in range(2)]
    firsts = [f"stormA-{uid}", f"stormB-{uid}"]
    topics = [f"{first}/r-{uid}/{i}" for first in firsts for i in range(2)]
    for topic in topics:
        await publisher.publish(topic, {"v": 0}, retain=True)
    await publisher.flush()
    milestones = [asyncio.Event() for _ in range(10)]

    runs: list[tuple[RetainedRuns, list[str]]] = []

    async def subscriber(i: int) -> None:
        await milestones[i // 3].wait()
        kind = i % 3
        if kind == 0:
            pattern, wanted = topics[i % len(topics)], [topics[i % len(topics)]]
        elif kind == 1:
            pattern, wanted = f"{firsts[i % 2]}/r-{uid}/+", topics[2 * (i % 2) : 2 * (i % 2) + 2]
        else:
            pattern, wanted = f"+/r-{uid}/+", topics
        sub_qos = 0 if kind == 2 else qos  # a broad pattern cannot have a stream
        rec = RetainedRuns(f"sub{i} {pattern!r} qos={sub_qos}", ROUNDS)
        runs.append((rec, wanted))
        await buses[i % 2].subscribe(pattern, rec, qos=sub_qos)

    async with asyncio.timeout(60):
        await asyncio.gather(
            retained_storm(publisher, topics, ROUNDS, milestones, qos),
            *(subscriber(i) for i in range(3 * len(milestones) - 3)),
        )
        await publisher.flush()
        for rec, wanted in runs:
            while not rec.complete(wanted):
                rec.changed.clear()
                await rec.changed.wait()
    problems = [p for rec, wanted in runs for p in rec.problems(wanted)]
    assert not problems, "\n".join(problems)
    for topic in topics:
        await publisher.publish(topic, b"", retain=True)


# -- faults ----------------------------------------------------------------------------------------


@pytest.mark.fault
async def test_cut_links_reconnect_resubscribe_and_resync(redis_cluster, open_bus, kit):
    """Every pub/sub link of a subscriber and of a publisher is cut: both reconnect; exact,
    narrow and broad subscriptions work again, a retained change made meanwhile is delivered
    once, and QoS 1 publishes in flight all arrive."""
    uid = uuid.uuid4().hex[:12]
    url = redis_cluster.url
    publisher = await open_bus(url, **kit.FAST_RECONNECT)
    subscriber = await open_bus(url, **kit.FAST_RECONNECT)
    first, state = f"cut-{uid}", f"cut-{uid}/state-{uid}"
    await publisher.publish(state, {"v": 1}, retain=True)
    exact, narrow, broad, durable = kit.Inbox(), kit.Inbox(), kit.Inbox(), kit.Inbox()
    await subscriber.subscribe(state, exact)
    await subscriber.subscribe(f"{first}/+", narrow)
    await subscriber.subscribe(f"+/state-{uid}", broad)
    await subscriber.subscribe(f"jobs-{uid}/+", durable, qos=1)
    assert exact.payloads == narrow.payloads == broad.payloads == [{"v": 1}]

    def cut(bus: Any) -> None:
        for link in links_of(bus)._masters.values():
            assert link.conn is not None
            link.conn.abort()

    cut(subscriber)
    await kit.wait_disconnected(subscriber)
    await publisher.publish(state, {"v": 2}, retain=True)  # while it is away (or just back)
    await kit.wait_connected(subscriber, reconnects=1)
    # The resync delivers the change before anything newer is published: a newer value
    # arriving during the resync would rightly supersede it (retained = the latest value).
    for inbox in (exact, narrow, broad):
        await inbox.wait_until(lambda inbox=inbox: {"v": 2} in inbox.payloads, "the change")
    jobs = asyncio.gather(*(publisher.publish(f"jobs-{uid}/{i % 5}", i, qos=1) for i in range(500)))
    cut(publisher)
    await jobs
    await kit.wait_connected(publisher, reconnects=1)
    await publisher.publish(state, {"v": 3}, retain=True)
    for inbox in (exact, narrow, broad):
        await inbox.wait_until(lambda inbox=inbox: {"v": 3} in inbox.payloads, "the live value")
        assert inbox.payloads == [{"v": 1}, {"v": 2}, {"v": 3}]  # the change once, in order
    await durable.wait_until(lambda: set(range(500)) <= set(durable.payloads), "500 jobs")
    await publisher.publish(state, b"", retain=True)


@pytest.mark.fault
async def test_password_protected_cluster(private_redis_cluster, open_bus, kit):
    """``requirepass`` on every node: the cluster client and the pub/sub links authenticate; a
    wrong or missing password is a ConnectError that never shows the password."""
    secret = "s3cr/et@pw"
    cluster = private_redis_cluster(
        ("--requirepass", secret, "--masterauth", secret), ("-a", secret, "--no-auth-warning")
    )
    url = cluster.url.replace("redis+cluster://", f"redis+cluster://:{quote(secret, safe='')}@")
    bus = await open_bus(url)
    assert secret not in repr(bus)
    await bus.publish("auth/kept", {"kept": True}, retain=True)
    exact, broad, durable = kit.Inbox(), kit.Inbox(), kit.Inbox()
    await bus.subscribe("auth/kept", exact)
    await bus.subscribe("+/kept", broad)
    await bus.subscribe("auth/#", durable, qos=1)
    assert exact.payloads == broad.payloads == durable.payloads == [{"kept": True}]
    await bus.publish("auth/kept", {"live": 1}, qos=1)
    for inbox in (exact, broad, durable):
        assert await inbox.wait_for(2) == [{"kept": True}, {"live": 1}]
    for wrong in (cluster.url.replace("redis+cluster://", "redis+cluster://:wrong@"), cluster.url):
        with pytest.raises(ConnectError) as info:
            await connect(wrong).open()
        assert "wrong" not in str(info.value)
        assert "refused the credentials" in str(info.value)


@pytest.fixture
def certificate(tmp_path) -> tuple[Any, Any]:
    """A self-signed certificate for 127.0.0.1 (its own CA) and its key."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl not found; install Debian's openssl to test rediss+cluster://")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


@pytest.mark.fault
async def test_tls_cluster(private_redis_cluster, open_bus, kit, certificate):
    """``rediss+cluster://`` against a cluster that speaks TLS only (clients and cluster bus)."""
    cert, _ = certificate
    cluster = private_redis_cluster(tls=certificate)
    url = cluster.url.replace("redis+cluster://", "rediss+cluster://")
    bus = await open_bus(f"{url}?ca_file={cert}")
    await bus.publish("tls/kept", {"kept": True}, retain=True)
    exact, broad, durable = kit.Inbox(), kit.Inbox(), kit.Inbox()
    await bus.subscribe("tls/kept", exact)
    await bus.subscribe("+/kept", broad)
    await bus.subscribe("tls/#", durable, qos=1)
    await bus.publish("tls/kept", {"live": 1}, qos=1)
    for inbox in (exact, broad, durable):
        assert await inbox.wait_for(2) == [{"kept": True}, {"live": 1}]
    with pytest.raises(ConnectError):
        await connect(url).open()  # the system CAs do not know our certificate
