"""Publishing without nats-py's per-message coroutines: PUB/HPUB frames queued on its buffer.

`Writer` appends commands to the client's pending buffer and wakes its flusher task exactly as
``Client.publish`` does, without a coroutine (it returns one only when the buffer is over
``pending_size`` and the caller must wait for the socket). `PublicWriter` is the same
interface over ``Client.publish``, for clients whose internals differ (see
`_fastpath.supported`).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Mapping
from types import MappingProxyType
from typing import Any

from nats.aio.client import Client as NatsClient

from ._wire import MSG_ID, WithMsgId

__all__ = ["PublicWriter", "TooLarge", "Writer"]

_HEADER_KEY = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_NEWLINES = str.maketrans({"\r": " ", "\n": " "})
_CRLF = b"\r\n"
_MSG_ID = MSG_ID.encode()


class TooLarge(ValueError):
    """The body with its headers is larger than the server's max_payload."""

    def __init__(self, size: int) -> None:
        super().__init__(f"{size} bytes with the headers")
        self.size = size


def _header_block(headers: Mapping[str, str], checked: set[str]) -> bytes:
    if type(headers) is WithMsgId:  # constant headers, framed once, and a QoS-1 message's id
        base = _header_block(headers.base, checked)
        return b"%s%s: %s\r\n\r\n" % (base[:-2], _MSG_ID, headers.msg_id.encode())
    constant = type(headers) is MappingProxyType
    if constant:
        hit = _BLOCKS.get(id(headers))
        if hit is not None and hit[0] is headers:
            return hit[1]
    parts = ["NATS/1.0\r\n"]
    for key, value in headers.items():
        if key not in checked:  # names repeat: check each once (no CR/LF injection)
            if not _HEADER_KEY.fullmatch(key):
                raise ValueError(f"header name {key!r} cannot travel in NATS headers")
            checked.add(key)
        if "\r" in value or "\n" in value:
            value = value.translate(_NEWLINES)
        parts.append(f"{key}: {value}\r\n")  # receivers trim values
    parts.append("\r\n")
    block = "".join(parts).encode()
    if constant:
        if len(_BLOCKS) >= 64:
            _BLOCKS.clear()
        _BLOCKS[id(headers)] = (headers, block)
    return block


# Blocks of read-only header mappings passed again and again (the bus's constant ones: a
# structured body's content-type, raw format's attributes): built once, found by identity.
_BLOCKS: dict[int, tuple[Mapping[str, str], bytes]] = {}


class Writer:
    """Queues PUB/HPUB commands on a nats-py client's pending buffer, like ``Client.publish``."""

    __slots__ = ("checked", "kick", "limit", "nc")

    def __init__(self, nc: NatsClient) -> None:
        self.nc = nc
        self.limit = nc.max_payload or 1_048_576  # the transport updates it on reconnect
        self.checked: set[str] = set()
        # The flusher sets the result of what it takes from its queue unless done already:
        # one finished future can wake it every time.
        self.kick: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.kick.set_result(None)

    def publish(
        self,
        subject: str,
        data: bytes,
        headers: Mapping[str, str] | None = None,
        reply: str = "",
    ) -> Awaitable[Any] | None:
        """Queue one message; return an awaitable only when the caller must wait for room.

        Raises:
            TooLarge: body and headers exceed the server's max_payload.
            ValueError: a header name NATS cannot carry.
        """
        size = len(data)
        if headers:
            block = _header_block(headers, self.checked)
            if len(block) + size > self.limit:
                raise TooLarge(len(block) + size)
            line = b"HPUB %s %s %d %d\r\n%s" % (
                subject.encode(),
                reply.encode(),
                len(block),
                len(block) + size,
                block,
            )
        elif reply:
            line = b"PUB %s %s %d\r\n" % (subject.encode(), reply.encode(), size)
        else:
            line = b"PUB %s %d\r\n" % (subject.encode(), size)
        return self.queue(line, data)

    def constant_head(
        self, subject: bytes, headers: Mapping[str, str]
    ) -> tuple[Mapping[str, str], bytes, bytes, bytes]:
        """The frame parts of `publish_constant` and `publish_with_id` for one subject.

        ``(headers, b"HPUB <subject> <block size> ", block, b"HPUB <subject> ")``.

        Raises:
            ValueError: a header name NATS cannot carry.
        """
        block = _header_block(headers, self.checked)
        return headers, b"HPUB %s %d " % (subject, len(block)), block, b"HPUB %s " % subject

    def publish_with_id(
        self, head: tuple[Mapping[str, str], bytes, bytes, bytes], msg_id: str, data: bytes
    ) -> Awaitable[Any] | None:
        """`publish_constant` with one more header, ``ce-id`` (an ASCII id of the bus's).

        Raises:
            TooLarge: body and headers exceed the server's max_payload.
        """
        block = b"%sce-id: %s\r\n\r\n" % (head[2][:-2], msg_id.encode())
        size = len(block) + len(data)
        if size > self.limit:
            raise TooLarge(size)
        return self.queue(head[3] + b"%d %d\r\n" % (len(block), size) + block, data)

    def publish_constant(
        self, head: tuple[Mapping[str, str], bytes, bytes, bytes], data: bytes
    ) -> Awaitable[Any] | None:
        """`publish` with constant headers and no reply, framed by a `constant_head`.

        Raises:
            TooLarge: body and headers exceed the server's max_payload.
        """
        block = head[2]
        size = len(block) + len(data)
        if size > self.limit:
            raise TooLarge(size)
        return self.queue(head[1] + b"%d\r\n" % size + block, data)

    def publish_plain(self, prefix: bytes, data: bytes) -> Awaitable[Any] | None:
        """`publish` of a body without headers or reply; ``prefix`` is ``b"PUB <subject> "``."""
        return self.queue(prefix + b"%d\r\n" % len(data), data)

    def queue(self, line: bytes, data: bytes) -> Awaitable[Any] | None:
        """Append a framed command line and its body to the client's pending buffer.

        Returns the client's flush when the buffer is over its limit (to be awaited), else
        None once the flusher has been woken.
        """
        nc = self.nc
        # The flusher hands the whole list to writelines(): the body is never copied.
        pending = nc._pending
        pending.append(line)
        pending.append(data)
        pending.append(_CRLF)
        nc._pending_data_size += len(line) + len(data) + 2
        if nc._pending_data_size > nc._max_pending_size > 0:
            return nc._flush_pending(force_flush=True)
        queue = nc._flush_queue
        assert queue is not None
        if not queue._queue:  # type: ignore[attr-defined]  # `empty()`, no call (see `supported`)
            queue.put_nowait(self.kick)
        return None


class PublicWriter:
    """`Writer`'s interface over ``Client.publish`` (when the internals are not as expected)."""

    __slots__ = ("nc",)

    def __init__(self, nc: NatsClient) -> None:
        self.nc = nc

    def publish(
        self,
        subject: str,
        data: bytes,
        headers: Mapping[str, str] | None = None,
        reply: str = "",
    ) -> Awaitable[Any] | None:
        """Return the client's publish coroutine (to be awaited)."""
        return self.nc.publish(
            subject, data, reply=reply, headers=dict(headers) if headers else None
        )
