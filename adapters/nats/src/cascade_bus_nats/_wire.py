"""NATS wire details the transport shares: header names, subjects, JetStream replies.

Plain functions and msgspec decoders only; no state.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from types import MappingProxyType

import msgspec

from cascade_bus import InvalidTopic, validate_topic

from ._mapper import subject_from_topic

#: Header of a retained message's live copy: the revision of its KV entry (stripped on receipt).
REVISION_HEADER = "Cascade-Bus-Rev"
MSG_ID = "Nats-Msg-Id"
KV_OP = "KV-Operation"
STATUS = "Status"
# Headers a direct get or JetStream adds to a stored message; not the publisher's.
STORED_HEADERS = (
    "Nats-Stream",
    "Nats-Subject",
    "Nats-Sequence",
    "Nats-Time-Stamp",
    "Nats-Last-Sequence",
    KV_OP,
    MSG_ID,
)
ACK = b"+ACK"
INBOX = "_INBOX."
JS_ACK = "$JS.ACK."
# nats-server's default max_control_line is 4 KiB; the subject shares that line.
MAX_SUBJECT_BYTES = 3_800
DEFAULT_MAX_PAYLOAD = 1_048_576
#: Room a JetStream publish needs for the headers the transport adds (id, revision).
JS_HEADROOM = {MSG_ID: "x" * 40, REVISION_HEADER: "0" * 12}


class ApiError(msgspec.Struct):
    """The ``error`` of a JetStream API answer."""

    code: int = 0
    err_code: int = 0
    description: str = ""


class PubAck(msgspec.Struct):
    """A JetStream publish acknowledgement."""

    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    error: ApiError | None = None


pub_ack = msgspec.json.Decoder(PubAck)


class _SubjectsState(msgspec.Struct):
    subjects: dict[str, int] | None = None


class SubjectsInfo(msgspec.Struct):
    """The part of a ``STREAM.INFO`` answer (with ``subjects_filter``) the snapshot reads."""

    state: _SubjectsState = msgspec.field(default_factory=_SubjectsState)
    error: ApiError | None = None
    limit: int = 0  # set when the server paged the subjects


subjects_info = msgspec.json.Decoder(SubjectsInfo)


def reply_subject(reply_to: str) -> str:
    """The NATS reply subject for a request's portable ``reply_to``, or "" if it cannot be one.

    Sent as the NATS reply subject, it lets the server answer "no responders" (a 503 status
    on that subject) when nothing is subscribed to the request's subject.
    """
    try:
        validate_topic(reply_to)
    except InvalidTopic:
        return ""
    subject = subject_from_topic(reply_to)
    return subject if len(subject.encode()) <= MAX_SUBJECT_BYTES else ""


def is_no_responders(data: bytes, headers: Mapping[str, str]) -> bool:
    """Tell whether a received message is the server's "no responders" status (503, no body)."""
    return not data and headers.get(STATUS) == "503"


class WithMsgId(Mapping[str, str]):
    """A shared, parsed header block plus one message's ``Nats-Msg-Id`` (its last line).

    What a QoS-1 publisher sends: its constant headers, then a fresh id. The parser keeps
    the constant part once (see `_fastpath.cached_headers`).
    """

    __slots__ = ("base", "msg_id")

    def __init__(self, base: Mapping[str, str], msg_id: str) -> None:
        self.base = base
        self.msg_id = msg_id

    def __getitem__(self, key: str) -> str:
        if key == MSG_ID:
            return self.msg_id
        return self.base[key]

    def __iter__(self) -> Iterator[str]:
        yield from self.base
        yield MSG_ID

    def __len__(self) -> int:
        return len(self.base) + 1


def split_headers(
    headers: Mapping[str, str], own_ids: str
) -> tuple[Mapping[str, str] | None, str | None]:
    """The received headers without the adapter's own, and the retained revision if any.

    ``headers`` is never changed (it may be a parsed block shared by many messages).
    """
    if type(headers) is WithMsgId and REVISION_HEADER not in headers.base:
        if headers.msg_id.startswith(own_ids):
            return (headers.base or None), None  # the shared block as it is: no copy
        return headers, None  # another publisher's id: theirs to see
    rev = headers.get(REVISION_HEADER)
    msg_id = headers.get(MSG_ID)
    own_id = msg_id is not None and msg_id.startswith(own_ids)
    if rev is None and not own_id:
        return headers, None
    kept = {
        k: v for k, v in headers.items() if k != REVISION_HEADER and (k != MSG_ID or not own_id)
    }
    return (kept or None), rev


def stored_headers(headers: dict[str, str] | None) -> dict[str, str] | None:
    """The publisher's headers of a stored KV entry (without what JetStream added)."""
    if not headers:
        return None
    kept = {k: v for k, v in headers.items() if k not in STORED_HEADERS}
    kept.pop(REVISION_HEADER, None)
    return kept or None


def ack_reply_fields(reply: str) -> tuple[int, int, int]:
    """(delivered count, stream sequence, pending) from a ``$JS.ACK...`` reply subject."""
    tokens = reply.split(".")
    if len(tokens) == 9:  # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>
        return int(tokens[4]), int(tokens[5]), int(tokens[8])
    # $JS.ACK.<domain>.<account>.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>...
    return int(tokens[6]), int(tokens[7]), int(tokens[10])


def header_bytes(headers: Mapping[str, str]) -> int:
    """The size of a header block on the wire (close enough to check max_payload).

    A read-only mapping (the bus's constant headers) is measured once.
    """
    if type(headers) is MappingProxyType:
        hit = _SIZES.get(id(headers))
        if hit is not None and hit[0] is headers:
            return hit[1]
    size = 12 + sum(len(k) + len(v.encode()) + 4 for k, v in headers.items())
    if type(headers) is MappingProxyType:
        if len(_SIZES) >= 64:
            _SIZES.clear()
        _SIZES[id(headers)] = (headers, size)
    return size


_SIZES: dict[int, tuple[Mapping[str, str], int]] = {}
#: What the headers a JetStream publish may gain (`JS_HEADROOM`) add to a block.
JS_HEADROOM_BYTES = header_bytes(JS_HEADROOM) - 12
