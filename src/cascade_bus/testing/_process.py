"""`BrokerProcess`: a broker subprocess on 127.0.0.1 that starts, stops and restarts on one port.

It owns a temporary work directory and the process log; brokers still running at interpreter
exit are closed.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from ._addresses import LOCALHOST, free_port, port_open

__all__ = ["START_TIMEOUT", "STOP_TIMEOUT", "BrokerProcess", "CommandBuilder"]

START_TIMEOUT = 10.0
"""Seconds to wait for a started broker to accept TCP connections."""

STOP_TIMEOUT = 5.0
"""Seconds to wait after SIGTERM (and again after SIGKILL) for a broker to exit."""

_LOG_TAIL_CHARS = 4000
_POLL_INTERVAL = 0.02


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
