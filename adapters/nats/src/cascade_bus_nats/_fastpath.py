"""Per-message paths into nats-py that skip its per-message objects, queues and coroutines.

nats-py turns every received message into a `Msg`, parses its headers with a generic parser,
puts it on a per-subscription `asyncio.Queue` and wakes a per-subscription task to run the
callback; every publish goes through three coroutines. For a bus whose own subscriptions
already queue and dispatch, that is most of the per-message cost, so when the client looks as
expected (`supported`) the transport uses:

- `Router`: replaces the client's ``_process_msg`` (the parser's hand-off, called with the raw
  ``sid, subject, reply, payload, headers`` of every MSG/HMSG) for the adapter's own
  subscription ids, calling a plain function per message; other ids go to nats-py as before.
- `Writer`: appends PUB/HPUB commands to the client's pending buffer and wakes its flusher task
  exactly as ``Client.publish`` does, without a coroutine (it returns one only when the buffer
  is over ``pending_size`` and the caller must wait for the socket).
- `install_parser`: nats-py's protocol parser deletes every frame from the front of its read
  buffer as it goes (a memmove of the rest of a 32 KiB read per message, 2.6 µs per message);
  this one walks MSG/HMSG frames with an offset and compacts once per read. Anything else
  (PING, INFO, -ERR, a frame cut by the read) goes to nats-py's own parser, unchanged.

When a nats-py release changes these internals, `supported` says so and the transport uses the
public API (`PublicWriter`, subscription callbacks) instead: slower, same behaviour.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from types import MappingProxyType
from typing import Any

from nats.aio.client import Client as NatsClient
from nats.protocol import parser as nats_parser

from ._wire import MSG_ID, REVISION_HEADER, STATUS

__all__ = [
    "PublicWriter",
    "Route",
    "Router",
    "TooLarge",
    "Writer",
    "install_parser",
    "parse_headers",
    "supported",
]

log = logging.getLogger("cascade_bus.nats")

#: ``route(subject, reply, payload, headers)`` for one subscription id; never raises.
Route = Callable[[str, str, bytes, "Mapping[str, str] | None"], None]

_HEADER_KEY = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# One "Name: value" line: a printable ASCII name without ':' or spaces, the value trimmed.
_HEADER_LINE = re.compile(r"(?m)^([!-9;-~]+)[ \t]*:[ \t]*([^\r\n]*?)[ \t]*\r\n")
_NEWLINES = str.maketrans({"\r": " ", "\n": " "})
_PROCESS_MSG = ["self", "sid", "subject", "reply", "data", "headers"]
_AWAITING_CONTROL_LINE = 1
_AWAITING_MSG_PAYLOAD = 2
_MSG = re.compile(rb"MSG[ \t]+(\S+)[ \t]+(\S+)[ \t]+(?:(\S+)[ \t]+)?(\d+)\r\n")
_HMSG = re.compile(rb"HMSG[ \t]+(\S+)[ \t]+(\S+)[ \t]+(?:(\S+)[ \t]+)?(\d+)[ \t]+(\d+)\r\n")
_CRLF = b"\r\n"


def supported(nc: NatsClient) -> bool:
    """Tell whether this nats-py client has the internals the fast paths rely on."""
    try:
        params = list(inspect.signature(type(nc)._process_msg).parameters)
    except (AttributeError, TypeError, ValueError):
        return False
    ps = getattr(nc, "_ps", None)
    return (
        params == _PROCESS_MSG
        and all(hasattr(ps, a) for a in ("buf", "state", "needed", "header_needed", "msg_arg"))
        and callable(getattr(ps, "parse", None))
        and getattr(nats_parser, "AWAITING_CONTROL_LINE", None) == _AWAITING_CONTROL_LINE
        and getattr(nats_parser, "AWAITING_MSG_PAYLOAD", None) == _AWAITING_MSG_PAYLOAD
        and isinstance(getattr(nc, "_pending", None), list)
        and isinstance(getattr(nc, "_pending_data_size", None), int)
        and isinstance(getattr(nc, "_max_pending_size", None), int)
        and isinstance(getattr(nc, "_flush_queue", None), asyncio.Queue)
        and isinstance(getattr(nc, "_sid", None), int)
        and isinstance(getattr(nc, "stats", None), dict)
        and callable(getattr(nc, "_flush_pending", None))
    )


def parse_headers(raw: bytes) -> dict[str, str]:
    """Parse a NATS header block: ``NATS/1.0[ status [text]]``, then ``Key: Value`` lines.

    Names are ASCII tokens (others are skipped, as nats-py does); values are trimmed.
    """
    text = raw.decode("utf-8", "replace")
    first, _, rest = text.partition("\r\n")
    out = dict(_HEADER_LINE.findall(rest))
    if len(first) > 9:  # an inline status: "NATS/1.0 503" or "NATS/1.0 404 No Messages"
        status, _, description = first[9:].strip().partition(" ")
        if status.isdigit():
            out["Status"] = status
        if description:
            out["Description"] = description
    return out


# Header blocks seen again and again (a structured body's content type, a raw publisher's
# constant attributes), parsed once: read-only mappings shared by the messages that carry them.
_PARSED: dict[bytes, Mapping[str, str]] = {}
#: Ids of the shared blocks (alive in ``_PARSED``) that hold no status and none of the
#: adapter's own headers: a route hands them on as they are, without looking inside.
PLAIN: set[int] = set()
OWN_HEADERS = (STATUS, MSG_ID, REVISION_HEADER)


def cached_headers(raw: bytes) -> Mapping[str, str]:
    """`parse_headers` of a block, read-only, parsed once per distinct short block."""
    hit = _PARSED.get(raw)
    if hit is not None:
        return hit
    parsed = parse_headers(raw)
    if len(raw) > 512:  # long blocks are rarely repeated: do not keep them
        return parsed
    if len(_PARSED) >= 256:
        _PARSED.clear()
        PLAIN.clear()
    frozen = _PARSED[raw] = MappingProxyType(parsed)
    if not any(name in parsed for name in OWN_HEADERS):
        PLAIN.add(id(frozen))
    return frozen


def install_parser(nc: NatsClient) -> None:
    """Give this client's protocol parser the offset-walking `parse` (see the module doc)."""
    ps = nc._ps
    original: Callable[..., Awaitable[None]] = ps.parse

    async def parse(data: bytes = b"") -> None:
        await _parse(ps, original, data)

    ps.parse = parse  # type: ignore[method-assign]


async def _parse(ps: Any, original: Callable[..., Awaitable[None]], data: bytes) -> None:
    buf: bytearray = ps.buf
    buf.extend(data)
    process = ps.nc._process_msg
    pos = 0
    try:
        while pos < len(buf):
            if ps.state == _AWAITING_MSG_PAYLOAD:  # a frame whose body came in a later read
                needed = ps.needed
                if len(buf) - pos < needed + 2:
                    return
                arg = ps.msg_arg
                hsize = ps.header_needed
                hdr = bytes(buf[pos : pos + hsize]) if hsize else None
                payload = bytes(buf[pos + hsize : pos + needed])
                ps.header_needed = 0
                ps.state = _AWAITING_CONTROL_LINE
                pos += needed + 2
                await process(arg["sid"], arg["subject"], arg["reply"], payload, hdr)
            else:
                first = buf[pos]
                match = None
                if first == 77:  # M
                    match = _MSG.match(buf, pos)
                elif first == 72:  # H
                    match = _HMSG.match(buf, pos)
                elif buf.startswith(b"PING\r\n", pos):
                    pos += 6
                    await ps.nc._process_ping()
                    if ps.buf is not buf:
                        return
                    continue
                elif buf.startswith(b"PONG\r\n", pos):
                    pos += 6
                    await ps.nc._process_pong()
                    if ps.buf is not buf:
                        return
                    continue
                if match is None:
                    # Another operation, a line cut by the read, or garbage: nats-py decides.
                    del buf[:pos]
                    pos = 0
                    await original()
                    return
                if first == 72:
                    subject, sid, reply, hsize_text, size_text = match.groups()
                    hsize = int(hsize_text)
                else:
                    subject, sid, reply, size_text = match.groups()
                    hsize = 0
                needed = int(size_text)
                start = match.end()
                if len(buf) - start < needed + 2:  # the body is still on its way
                    ps.msg_arg = {"subject": subject, "sid": int(sid), "reply": reply or b""}
                    ps.needed = needed
                    ps.header_needed = hsize
                    ps.state = _AWAITING_MSG_PAYLOAD
                    pos = start
                    continue
                hdr = bytes(buf[start : start + hsize]) if hsize else None
                payload = bytes(buf[start + hsize : start + needed])
                pos = start + needed + 2
                await process(int(sid), subject, reply or b"", payload, hdr)
            if ps.buf is not buf:
                return  # the client reset the parser (a reconnect) while the message ran
    finally:
        if pos and ps.buf is buf:
            del buf[:pos]


class Router:
    """Hands the MSG frames of registered subscription ids to plain functions."""

    __slots__ = ("done", "original", "routes")

    def __init__(self, nc: NatsClient) -> None:
        self.routes: dict[int, Route] = {}
        self.original: Callable[..., Awaitable[None]] = nc._process_msg
        # The parser awaits what process() returns: a finished future costs less than a
        # coroutine per message.
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.done.set_result(None)
        nc._process_msg = self.process  # type: ignore[method-assign,assignment]

    @staticmethod
    def next_sid(nc: NatsClient) -> int:
        """The id nats-py gives the next subscription (register the route before SUB)."""
        return nc._sid + 1

    def process(
        self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes | None
    ) -> Awaitable[None]:
        """The parser's hand-off: our subscriptions' messages to their routes, others on."""
        route = self.routes.get(sid)
        if route is None:
            return self.original(sid, subject, reply, data, headers)
        try:
            route(
                subject.decode(),
                reply.decode() if reply else "",
                data,
                cached_headers(headers) if headers else None,
            )
        except Exception:  # never let one message stop the connection's read loop
            log.exception("dropped a message on %r that could not be handed over", subject)
        return self.done


class TooLarge(ValueError):
    """The body with its headers is larger than the server's max_payload."""

    def __init__(self, size: int) -> None:
        super().__init__(f"{size} bytes with the headers")
        self.size = size


def _header_block(headers: Mapping[str, str], checked: set[str]) -> bytes:
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
        return self._queue(line, data)

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
        return self._queue(head[3] + b"%d %d\r\n" % (len(block), size) + block, data)

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
        return self._queue(head[1] + b"%d\r\n" % size + block, data)

    def publish_plain(self, prefix: bytes, data: bytes) -> Awaitable[Any] | None:
        """`publish` of a body without headers or reply; ``prefix`` is ``b"PUB <subject> "``."""
        return self._queue(prefix + b"%d\r\n" % len(data), data)

    def _queue(self, line: bytes, data: bytes) -> Awaitable[Any] | None:
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
        if queue.empty():
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
