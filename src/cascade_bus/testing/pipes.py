"""A child process's output pipe read line by line, every wait bounded (CLI and process tests)."""

from __future__ import annotations

import os
import selectors
import subprocess
import time
from collections.abc import Sequence
from typing import IO

__all__ = ["Lines", "finish", "spawn"]


class Lines:
    """The lines a child wrote to one pipe so far; `wait_for` reads more until one matches."""

    def __init__(self, stream: IO[bytes], timeout: float = 20.0) -> None:
        self.stream = stream
        self.timeout = timeout
        self.buffer = b""
        self.seen: list[str] = []
        self.selector = selectors.DefaultSelector()
        self.selector.register(stream, selectors.EVENT_READ)

    def wait_for(self, needle: str, timeout: float | None = None) -> str:
        """The first line containing ``needle``, reading (bounded) until it comes.

        Raises:
            AssertionError: not seen within the timeout, or the pipe closed first.
        """
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while True:
            for line in self.seen:
                if needle in line:
                    return line
            left = deadline - time.monotonic()
            if left <= 0 or not self.selector.select(left):
                raise AssertionError(f"{needle!r} not seen within {timeout}s: {self.seen}")
            chunk = os.read(self.stream.fileno(), 65536)
            if not chunk:
                raise AssertionError(f"stream closed before {needle!r}: {self.seen}")
            *complete, self.buffer = (self.buffer + chunk).split(b"\n")
            self.seen += [line.decode() for line in complete]

    def rest(self) -> str:
        """Everything the child wrote (call once it has exited); closes the pipe."""
        data = self.buffer + self.stream.read()
        self.selector.close()
        self.stream.close()
        return "\n".join([*self.seen, data.decode()])


def spawn(
    command: Sequence[str], timeout: float = 20.0
) -> tuple[subprocess.Popen[bytes], Lines, Lines]:
    """Start ``command`` with its stdout and stderr as `Lines` (waits bounded by ``timeout``)."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stderr is not None
    return proc, Lines(proc.stdout, timeout), Lines(proc.stderr, timeout)


def finish(
    proc: subprocess.Popen[bytes], out: Lines, err: Lines, timeout: float = 20.0
) -> tuple[int, str, str]:
    """Wait (bounded; killed after) for the child to exit: its status, stdout and stderr."""
    try:
        code = proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=timeout)
    return code, out.rest(), err.rest()
