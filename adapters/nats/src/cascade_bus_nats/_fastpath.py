"""Per-message paths into nats-py that skip its per-message objects, queues and coroutines.

nats-py turns every received message into a `Msg`, parses its headers with a generic parser,
puts it on a per-subscription `asyncio.Queue` and wakes a per-subscription task to run the
callback; every publish goes through three coroutines. For a bus whose own subscriptions
already queue and dispatch, that is most of the per-message cost, so when the client looks as
expected (`supported`) the transport uses:

- `Router`: replaces the client's ``_process_msg`` (the parser's hand-off, called with the raw
  ``sid, subject, reply, payload, headers`` of every MSG/HMSG) for the adapter's own
  subscription ids, calling a plain function per message; other ids go to nats-py as before.
- `Writer` (in `_writer`): appends PUB/HPUB commands to the client's pending buffer.
- `install_parser`: nats-py's protocol parser deletes every frame from the front of its read
  buffer as it goes (a memmove of the rest of a 32 KiB read per message, 2.6 µs per message);
  this one walks MSG/HMSG frames with an offset and compacts once per read. Anything else
  (PING, INFO, -ERR, a frame cut by the read) goes to nats-py's own parser, unchanged.

When a nats-py release changes these internals, `supported` says so and the transport uses the
public API (`_writer.PublicWriter`, subscription callbacks) instead: slower, same behaviour.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from types import MappingProxyType
from typing import Any

from nats.aio.client import Client as NatsClient
from nats.protocol import parser as nats_parser

from cascade_bus.spi import WithId

from ._wire import MSG_ID, REVISION_HEADER, STATUS, WithMsgId

__all__ = [
    "Route",
    "Router",
    "install_parser",
    "parse_headers",
    "supported",
]

log = logging.getLogger("cascade_bus.nats")

#: ``route(subject, reply, payload, headers)`` for one subscription id; never raises.
Route = Callable[[str, str, bytes, "Mapping[str, str] | None"], None]

# One "Name: value" line: a printable ASCII name without ':' or spaces, the value trimmed.
_HEADER_LINE = re.compile(r"(?m)^([!-9;-~]+)[ \t]*:[ \t]*([^\r\n]*?)[ \t]*\r\n")
_PROCESS_MSG = ["self", "sid", "subject", "reply", "data", "headers"]
_AWAITING_CONTROL_LINE = 1
_AWAITING_MSG_PAYLOAD = 2
# The optional reply comes last in these patterns, so that a match never backtracks: with one
# more field, the fields shift (see `_parse`).
_MSG = re.compile(rb"MSG[ \t]+(\S+)[ \t]+(\S+)[ \t]+(\S+)(?:[ \t]+(\S+))?\r\n")
_HMSG = re.compile(rb"HMSG[ \t]+(\S+)[ \t]+(\S+)[ \t]+(\S+)[ \t]+(\S+)(?:[ \t]+(\S+))?\r\n")


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
        and isinstance(getattr(nc._flush_queue, "_queue", None), collections.deque)
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
# Last lines that vary per message (a raw publisher's id, a QoS-1 publisher's Nats-Msg-Id):
# the block before them is kept once.
_ID_LINE = b"\r\nce-id:"
_CE_ID = b"ce-id:"
_MSG_ID = MSG_ID.encode() + b":"


def cached_headers(raw: bytes) -> Mapping[str, str]:
    """`parse_headers` of a block, read-only, parsed once per distinct short block.

    A block that ends with a ``ce-id`` line (a raw-format publisher's constant headers and
    its message id) is a `WithId` over the cached rest, one that ends with ``Nats-Msg-Id``
    (a QoS-1 publish) a `WithMsgId`: the rest is parsed once.
    """
    hit = _PARSED.get(raw)
    if hit is not None:
        return hit
    cut = raw.rfind(b"\r\n", 0, len(raw) - 4)  # where the last header line starts
    if cut > 0 and raw.endswith(b"\r\n\r\n"):
        last = raw[cut + 2 : -4]
        name = MSG_ID if last.startswith(_MSG_ID) else "ce-id" if last.startswith(_CE_ID) else ""
        if name and b"\n" not in last and b"\r" not in last:
            fixed = _constant_part(raw, cut)
            if fixed is not None and name not in fixed:
                value = last[len(name) + 1 :].decode("utf-8", "replace").strip(" \t")
                return WithMsgId(fixed, value) if name == MSG_ID else WithId(fixed, value)
    parsed = parse_headers(raw)
    if len(raw) > 512 or _MSG_ID in raw:  # long or per-message blocks: not kept
        return parsed
    return _keep(raw, parsed)


def _constant_part(raw: bytes, cut: int) -> Mapping[str, str] | None:
    """The parsed block before the last line (at ``cut``), the last one's again if equal."""
    prefix, fixed = _LAST_PART
    if len(prefix) == cut + 2 and raw.startswith(prefix):
        return fixed  # type: ignore[no-any-return]
    base = raw[: cut + 2] + b"\r\n"
    fixed = _PARSED.get(base)
    if fixed is None:
        if len(base) > 512 or _ID_LINE in base:
            return None
        fixed = _keep(base, parse_headers(base))
    _LAST_PART[:] = [raw[: cut + 2], fixed]
    return fixed


#: The constant part of the last block split by `cached_headers` (without its closing CRLF),
#: and its parse: the next message of the same publisher has the same.
_LAST_PART: list[Any] = [b"", None]


def _keep(raw: bytes, parsed: dict[str, str]) -> Mapping[str, str]:
    if len(_PARSED) >= 256:
        _PARSED.clear()
        PLAIN.clear()
    frozen = _PARSED[raw] = MappingProxyType(parsed)
    if not any(name in parsed for name in OWN_HEADERS):
        PLAIN.add(id(frozen))
    return frozen


def install_parser(nc: NatsClient, routes: dict[int, Route] | None = None) -> None:
    """Give this client's protocol parser the offset-walking `parse` (see the module doc).

    Complete frames of the subscription ids in ``routes`` (a `Router`'s) go straight to
    their routes; the others to the client's ``_process_msg``.
    """
    ps = nc._ps
    original: Callable[..., Awaitable[None]] = ps.parse
    last = [b""]  # the last header block: the same one again is not copied or hashed anew
    by_sid = {} if routes is None else routes

    async def parse(data: bytes = b"") -> None:
        await _parse(ps, original, data, last, by_sid)

    ps.parse = parse  # type: ignore[method-assign]


async def _parse(
    ps: Any,
    original: Callable[..., Awaitable[None]],
    data: bytes,
    last: list[bytes],
    routes: dict[int, Route],
) -> None:
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
                size_text = hsize_text = b"0"
                reply = b""
                if match is not None:
                    fields: tuple[Any, ...] = match.groups()
                    if first == 72:
                        subject, sid, one, two, three = fields
                        if three is None:  # no reply subject: the fields shift
                            hsize_text, size_text = one, two
                        else:
                            reply, hsize_text, size_text = one, two, three
                    else:
                        subject, sid, one, two = fields
                        if two is None:
                            size_text = one
                        else:
                            reply, size_text = one, two
                    if not (size_text.isdigit() and hsize_text.isdigit()):
                        match = None
                if match is None:
                    # Another operation, a line cut by the read, or garbage: nats-py decides.
                    del buf[:pos]
                    pos = 0
                    await original()
                    return
                hsize = int(hsize_text) if first == 72 else 0
                needed = int(size_text)
                start = match.end()
                if len(buf) - start < needed + 2:  # the body is still on its way
                    ps.msg_arg = {"subject": subject, "sid": int(sid), "reply": reply}
                    ps.needed = needed
                    ps.header_needed = hsize
                    ps.state = _AWAITING_MSG_PAYLOAD
                    pos = start
                    continue
                hdr = None
                if hsize:
                    hdr = last[0]
                    if len(hdr) != hsize or not buf.startswith(hdr, start):
                        hdr = last[0] = bytes(buf[start : start + hsize])
                payload = bytes(buf[start + hsize : start + needed])
                pos = start + needed + 2
                route = routes.get(int(sid))
                if route is None:
                    await process(int(sid), subject, reply, payload, hdr)
                else:  # `Router.process` inline: no call and no await per message
                    parsed = None
                    if hdr is not None:
                        parsed = _PARSED.get(hdr)
                        if parsed is None:
                            parsed = cached_headers(hdr)
                    try:
                        route(subject.decode(), reply.decode() if reply else "", payload, parsed)
                    except Exception:  # never let one message stop the connection's read loop
                        log.exception("dropped a message on %r that could not be handed over",
                                      subject)  # fmt: skip
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
        try:  # (`_parse` hands over whole frames itself: this is for the others)
            route(
                subject.decode(),
                reply.decode() if reply else "",
                data,
                cached_headers(headers) if headers else None,
            )
        except Exception:  # never let one message stop the connection's read loop
            log.exception("dropped a message on %r that could not be handed over", subject)
        return self.done
