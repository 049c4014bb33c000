"""NaN and infinity in payloads: refused with `EncodeError`, one rule on every format.

msgspec writes a non-finite float as ``null`` in JSON and as an IEEE float in MessagePack, so
a NaN would silently arrive as None on one wire format and as NaN on the other (and the
command line already refuses them). The check costs one substring search of the body already
encoded; the payload is walked only when the body could hold one (it contains ``null``, or a
MessagePack float64 whose exponent is all ones).
"""

from __future__ import annotations

import math
from typing import Any

import msgspec

from ._errors import EncodeError

__all__ = ["check_finite", "find_non_finite", "suspect"]

_JSON_SUSPECT = b"null"
# A MessagePack float64 (0xcb) whose first byte is 0x7f or 0xff: inf, -inf, NaN (or a huge one).
_MSGPACK_SUSPECTS = (b"\xcb\x7f", b"\xcb\xff")


def suspect(body: bytes, msgpack: bool = False) -> bool:
    """True when ``body`` (an encoded payload or envelope) could carry a NaN or infinity."""
    # ``partition``, not ``find`` (which parses its arguments the slow way: twice the cost on a
    # small body) nor ``in`` (which first tries the argument as an int and clears a TypeError).
    if msgpack:
        plus, minus = _MSGPACK_SUSPECTS
        return bool(body.partition(plus)[1] or body.partition(minus)[1])
    return bool(body.partition(_JSON_SUSPECT)[1])


def find_non_finite(value: Any) -> str | None:
    """Where the first NaN or infinity in ``value`` is (``payload['a'][2]``), or None."""
    if isinstance(value, float):
        return None if math.isfinite(value) else "payload"
    try:
        plain = msgspec.to_builtins(value)
    except (TypeError, ValueError):
        return None  # not encodable at all: the encoder says so
    stack: list[tuple[str, Any]] = [("payload", plain)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, float):
            if not math.isfinite(item):
                return path
        elif isinstance(item, dict):
            stack.extend((f"{path}[{key!r}]", sub) for key, sub in item.items())
        elif isinstance(item, list | tuple):
            stack.extend((f"{path}[{index}]", sub) for index, sub in enumerate(item))
    return None


def check_finite(payload: Any, body: bytes, *, msgpack: bool = False, topic: str = "") -> None:
    """Raise when ``payload`` (encoded as ``body``) holds a NaN or an infinity.

    Raises:
        EncodeError: naming the topic and where in the payload the value is.
    """
    if not suspect(body, msgpack):
        return
    where = find_non_finite(payload)
    if where is not None:
        on = f" for topic {topic!r}" if topic else ""
        raise EncodeError(
            f"cannot encode the payload{on}: {where} is NaN or infinite, which JSON cannot "
            "carry (it would arrive as null); send None or a string instead"
        )
