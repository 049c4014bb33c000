r"""Portable patterns as Redis pub/sub subscriptions: SUBSCRIBE for exact names, PSUBSCRIBE globs.

Redis channels are flat byte strings and its glob ``*`` crosses ``/``, so a portable pattern maps
to one or two native subscriptions whose glob *over-approximates* it, each paired with an exact
portable filter that the adapter applies to every message (`topic_matches`):

========================  =========================================  ====================
portable pattern          native subscription(s)                     exact filter
========================  =========================================  ====================
``a/b``                   ``SUBSCRIBE a/b``                          none (exact)
``a/+/c``                 ``PSUBSCRIBE a/*/c``                       ``a/+/c``
``a/#``                   ``SUBSCRIBE a`` + ``PSUBSCRIBE a/*``       none; ``a/+/#``
``+/#``                   ``PSUBSCRIBE *`` + ``PSUBSCRIBE */*``      ``+``; ``+/+/#``
``#``                     ``PSUBSCRIBE *``                           ``#``
========================  =========================================  ====================

``a/#`` also matches ``a`` (MQTT), hence the second subscription; the two filters are disjoint
(``Q`` and ``Q/+/#``), so a message reaching both native subscriptions is delivered once. Literal
levels are glob-escaped (``?*[]\\`` get a backslash), so ``star*in`` matches only itself; the
``$`` rule (a leading wildcard never matches a ``$`` topic) is enforced by the exact filter.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

__all__ = [
    "NativeSub",
    "escape_glob",
    "hash_tag",
    "native_subscriptions",
    "pattern_glob",
    "scan_glob",
    "shard_key",
]

_ESCAPES = str.maketrans({c: "\\" + c for c in "?*[]\\"})


class NativeSub(NamedTuple):
    """One Redis subscription that (with its filter) covers part of a portable pattern."""

    kind: Literal["s", "p"]
    """``s``: SUBSCRIBE to an exact channel; ``p``: PSUBSCRIBE to a glob."""
    name: str
    """The channel name or the glob."""
    filter: str | None
    """The portable pattern every message must match exactly, or None when exact already."""


def escape_glob(text: str) -> str:
    r"""Escape Redis glob metacharacters (``? * [ ] \\``) so ``text`` matches only itself."""
    return text.translate(_ESCAPES)


def _glob(levels: list[str]) -> str:
    return "/".join("*" if level == "+" else escape_glob(level) for level in levels)


def pattern_glob(pattern: str) -> str:
    """Return the glob for a pattern without ``#`` (``+`` becomes ``*``, the rest escaped)."""
    return _glob(pattern.split("/"))


def native_subscriptions(pattern: str) -> tuple[NativeSub, ...]:
    """Return the native subscriptions (with exact filters) that cover a portable pattern."""
    if "+" not in pattern and "#" not in pattern:
        return (NativeSub("s", pattern, None),)
    levels = pattern.split("/")
    if levels[-1] != "#":
        return (NativeSub("p", _glob(levels), pattern),)
    head = levels[:-1]
    if not head:
        return (NativeSub("p", "*", "#"),)
    head_pattern = "/".join(head)
    if "+" in head:
        parent = NativeSub("p", _glob(head), head_pattern)
    else:
        parent = NativeSub("s", head_pattern, None)
    return (parent, NativeSub("p", _glob(head) + "/*", head_pattern + "/+/#"))


def scan_glob(pattern: str) -> str:
    """Return one glob matching (at least) every topic the pattern matches, for HSCAN MATCH."""
    levels = pattern.split("/")
    if levels[-1] == "#":
        return _glob(levels[:-1]) + "*"
    return _glob(levels)


def shard_key(name: str, levels: int) -> str | None:
    """Return the shard key of a topic or pattern (its first ``levels`` levels), or None.

    Redis Cluster keeps everything of one shard key in one hash slot. A topic shorter than
    ``levels`` is its own key. A pattern has a key only when no wildcard falls inside those
    levels (``a/b/#`` with 2 levels: ``a/b``); otherwise (``+/x``, ``#``, ``a/#`` with 2
    levels, which also matches ``a``) its topics may live in any slot and None is returned.
    """
    head = name.split("/", levels)[:levels]
    if "+" in head or "#" in head:
        return None
    return "/".join(head)


_TAG_ESCAPES = str.maketrans({"%": "%25", "}": "%7D"})


def hash_tag(key: str) -> str:
    """Return ``{key}`` as a Redis Cluster hash tag (``%`` and ``}`` percent-escaped).

    Redis hashes only what lies between the first ``{`` and the next ``}``, so a ``}`` inside
    the shard key would cut the tag short (and ``}x`` would leave it empty); escaping keeps every
    key built from one shard key in one slot, and distinct shard keys distinct.
    """
    return "{" + key.translate(_TAG_ESCAPES) + "}"
