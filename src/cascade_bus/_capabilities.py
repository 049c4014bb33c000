"""What a transport can do, declared as data so the bus and the conformance suite can ask."""

from __future__ import annotations

import msgspec

__all__ = ["Capabilities"]


class Capabilities(msgspec.Struct, frozen=True, kw_only=True):
    """The features a transport declares; the bus refuses what is not declared.

    Attributes:
        max_qos: Highest QoS the transport honours (0 at most once, 1 at least once,
            2 exactly once).
        retain: Retained messages (last value per topic, replayed to new subscribers).
        retain_emulated: Retained messages are emulated by the adapter, not native.
        wildcards: ``+`` and ``#`` patterns.
        headers: Native message headers (metadata outside the body).
        queue_groups: Competing consumers sharing one named subscription.
        request_reply: `Bus.request` with per-request reply inboxes.
        no_responders: The transport can tell that a request reached no subscriber, so
            `Bus.request` raises `NoResponders` at once instead of waiting out its timeout.
        will: A last-will message the broker publishes when the client vanishes.
        presence: The bus's ``presence`` option: a retained online/offline status that turns
            offline after a crash (natively or emulated; each transport documents how, and
            how fast).
        persistence: Messages survive a broker restart.
        ordering: Messages from one publisher to one subscription arrive in order.
        max_payload: Largest message body in bytes, or None when unbounded.
        emulated: Names of features the adapter emulates (say so in its docs).
    """

    max_qos: int = 0
    retain: bool = False
    retain_emulated: bool = False
    wildcards: bool = True
    headers: bool = False
    queue_groups: bool = False
    request_reply: bool = True
    no_responders: bool = False
    will: bool = False
    presence: bool = False
    persistence: bool = False
    ordering: bool = True
    max_payload: int | None = None
    emulated: frozenset[str] = frozenset()

    def supports(self, feature: str) -> bool:
        """Tell whether a named boolean feature (e.g. ``"retain"``) is declared."""
        value = getattr(self, feature, False)
        return bool(value) if isinstance(value, bool) else False
