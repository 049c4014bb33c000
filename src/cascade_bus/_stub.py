"""Deferred envelopes for in-process publishes: built only by the subscriptions that need one.

Through the `Connector` on memory://, subscribers want just ``(topic, payload)``, and building an
envelope (id, time, struct) per publish costs more than the delivery itself. Such a publish
hands over a `Stub` in `Message.local` instead of the envelope; a subscription that needs the
envelope builds it with `envelope_of`, from the id and time fixed at publish, so every
subscriber sees the same ones.
"""

from __future__ import annotations

import itertools
import os
from datetime import UTC, datetime
from typing import Any

from ._envelope import DEFAULT_TYPE, Envelope

__all__ = ["Stub", "envelope_of", "next_seq"]

Stub = tuple[str, str, "int | str", "float | datetime"]
"""``(topic, source, sequence number or id, publish time)``.

The `Connector`'s publishes take the cheapest (a sequence number, a UNIX timestamp) and leave
the envelope's id and datetime to the rare subscriber that needs one; `Bus.publish` takes the
id and datetime themselves, since every subscriber builds an envelope from them."""


def _reseed() -> None:
    # Ids are unique across processes by their random prefix; a forked child draws its own.
    global _prefix, next_seq
    _prefix = f"{os.urandom(6).hex()}-s"
    next_seq = itertools.count(1).__next__


_prefix = ""
next_seq = itertools.count(1).__next__
"""The next stub sequence number (hot paths read it as a module attribute)."""
_reseed()
os.register_at_fork(after_in_child=_reseed)


def envelope_of(stub: Stub, payload: Any) -> Envelope[Any]:
    """The envelope a stub stands for, carrying this subscriber's copy of the payload."""
    topic, source, seq, when = stub
    return Envelope(
        id=seq if type(seq) is str else f"{_prefix}{seq}",
        source=source,
        type=DEFAULT_TYPE,
        time=when if type(when) is datetime else datetime.fromtimestamp(when, UTC),  # type: ignore[arg-type]
        topic=topic,
        payload=payload,
        headers={},
    )
