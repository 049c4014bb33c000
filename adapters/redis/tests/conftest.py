"""Shared helpers for the Redis adapter's own tests (streams, races, faults, auth/TLS, interop).

Every wait here is event-driven and bounded: a helper waits for a handler call or a transport
state change, never for time to pass.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from cascade_bus_redis import RedisTransport

from cascade_bus import Bus, connect
from cascade_bus.testing.brokers import (
    BrokerNotFoundError,
    BrokerProcess,
    find_executable,
    free_port,
    start_redis,
)
from cascade_bus.testing.pytest_plugin import broker_unavailable
from cascade_bus.testing.waits import (
    WAIT,
    fault_kit,
)


def redis_transport(bus: Bus) -> RedisTransport:
    """The bus's transport, as the Redis transport."""
    assert isinstance(bus.transport, RedisTransport)
    return cast(RedisTransport, bus.transport)


@pytest.fixture
def kit() -> SimpleNamespace:
    """This module's helpers (tests run with --import-mode=importlib and cannot import it)."""
    return fault_kit(redis_transport=redis_transport)


@pytest.fixture
def prefix() -> str:
    """A unique topic prefix for this test."""
    return f"rt/{uuid.uuid4().hex}"


@pytest.fixture
async def open_bus() -> AsyncIterator[Callable[..., Any]]:
    """``await open_bus(url, **options)``: open a bus; all are closed after the test."""
    opened: list[Bus] = []

    async def make(url: str, **options: Any) -> Bus:
        bus = connect(url, **options)
        opened.append(bus)
        async with asyncio.timeout(WAIT):
            await bus.open()
        return bus

    yield make
    async with asyncio.timeout(WAIT * 2):
        await asyncio.gather(*(bus.close() for bus in reversed(opened)), return_exceptions=True)


# -- a private Redis Cluster -------------------------------------------------------------------

#: Bound for the cluster to form (three servers started, slots assigned, gossip settled).
CLUSTER_READY_TIMEOUT = 30.0


@dataclass
class RedisClusterNodes:
    """A private 3-master Redis Cluster on loopback (no replicas)."""

    nodes: list[BrokerProcess]
    cli_args: tuple[str, ...] = ()
    """Extra ``redis-cli`` arguments (a password)."""

    @property
    def ports(self) -> list[int]:
        """Every master's client port."""
        return [node.port for node in self.nodes]

    @property
    def url(self) -> str:
        """``redis+cluster://`` with every master as a seed node."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{port}" for port in self.ports)

    def cli(self, port: int, *args: str) -> str:
        """Run ``redis-cli -p port args...`` and return its output."""
        return subprocess.run(
            [_redis_cli(), *self.cli_args, "-h", "127.0.0.1", "-p", str(port), *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout

    def close(self) -> None:
        """Stop every server and remove its directory."""
        for node in self.nodes:
            node.close()


def _redis_cli() -> str:
    exe = find_executable("redis-cli", "/usr/bin/redis-cli")
    if exe is None:
        broker_unavailable("redis", "`redis-cli` not found (it creates the Redis Cluster)")
    return str(exe)


def _start_cluster_node(
    extra_args: tuple[str, ...], tls: tuple[Path, Path] | None = None
) -> BrokerProcess:
    """One cluster-enabled redis-server; its bus port is chosen free too (port + 10000 may not).

    With ``tls`` (certificate, key): clients and the cluster bus speak TLS only.
    """
    for attempt in range(3):
        port = free_port()
        tls_args: tuple[str, ...] = ()
        if tls is not None:
            cert, key = tls
            tls_args = (
                "--port", "0", "--tls-port", str(port), "--tls-cluster", "yes",
                "--tls-cert-file", str(cert), "--tls-key-file", str(key),
                "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no",
            )  # fmt: skip
        try:
            return start_redis(
                port,
                extra_args=(
                    *tls_args,
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",  # in the server's private work dir
                    "--cluster-port",
                    str(free_port()),
                    "--cluster-node-timeout",
                    "5000",
                    *extra_args,
                ),
            )
        except RuntimeError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def start_redis_cluster(
    extra_args: tuple[str, ...] = (),
    cli_args: tuple[str, ...] = (),
    tls: tuple[Path, Path] | None = None,
) -> RedisClusterNodes:
    """Start three cluster-enabled servers in parallel and join them as a 3-master cluster.

    ``redis-cli --cluster create`` assigns the slots; then this waits (bounded) until every node
    reports ``cluster_state:ok``. The caller closes ``nodes`` (also on failure, done here).
    Skips (or fails, with CASCADE_BUS_REQUIRE_BROKERS=1) naming redis-server or redis-cli when
    one is missing.
    """
    cli = _redis_cli()
    if tls is not None:
        cli_args = ("--tls", "--cacert", str(tls[0]), *cli_args)
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(_start_cluster_node, extra_args, tls) for _ in range(3)]
        nodes: list[BrokerProcess] = []
        errors: list[BaseException] = []
        for future in futures:
            try:
                nodes.append(future.result())
            except BaseException as exc:
                errors.append(exc)
    cluster = RedisClusterNodes(nodes, cli_args)
    try:
        if errors:
            if isinstance(errors[0], BrokerNotFoundError):
                broker_unavailable("redis", str(errors[0]))
            raise errors[0]
        subprocess.run(
            [
                cli,
                *cli_args,
                "--cluster",
                "create",
                *(f"127.0.0.1:{port}" for port in cluster.ports),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            capture_output=True,
            text=True,
            timeout=CLUSTER_READY_TIMEOUT,
            check=True,
        )
        deadline = time.monotonic() + CLUSTER_READY_TIMEOUT
        while not all(
            "cluster_state:ok" in cluster.cli(port, "cluster", "info") for port in cluster.ports
        ):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the cluster on {cluster.ports} did not reach cluster_state:ok")
            time.sleep(0.05)  # polling the servers' gossip (no event to wait for)
    except BaseException:
        cluster.close()
        raise
    return cluster


@pytest.fixture(scope="module")
def redis_cluster() -> Iterator[RedisClusterNodes]:
    """A private 3-master Redis Cluster for this module; stopped and removed afterwards."""
    cluster = start_redis_cluster()
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def private_redis_cluster() -> Iterator[Callable[..., RedisClusterNodes]]:
    """``private_redis_cluster(extra_args, cli_args, tls)`` starts a cluster for one test."""
    started: list[RedisClusterNodes] = []

    def make(
        extra_args: tuple[str, ...] = (),
        cli_args: tuple[str, ...] = (),
        tls: tuple[Path, Path] | None = None,
    ) -> RedisClusterNodes:
        cluster = start_redis_cluster(extra_args, cli_args, tls)
        started.append(cluster)
        return cluster

    try:
        yield make
    finally:
        for cluster in started:
            cluster.close()
