"""A child process's output pipe read line by line, every wait bounded (CLI and process tests)."""

from __future__ import annotations

import os
import selectors
import time
from typing import IO

__all__ = ["Lines"]


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
