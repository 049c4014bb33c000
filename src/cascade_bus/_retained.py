"""The retained state one subscription has seen, and the diff that resyncs it after an outage.

Written once for every transport: a transport only brackets its post-reconnect retained replay
with `MessageSink.resync_begin` / `resync_end`; this ledger drops replays of values the
subscriber already has and names the topics cleared while it was away.
"""

from __future__ import annotations

from ._transport import Message

__all__ = ["RetainedLedger"]


class RetainedLedger:
    """Per subscription: a digest of the last retained value seen per topic.

    Only topics that arrived as retained replays, or live with `Message.retain` set, are
    tracked (bounded by the broker's retained set); a live message on a tracked topic updates
    it, an empty body (a clear) forgets it.
    """

    __slots__ = ("_touched", "known")

    def __init__(self) -> None:
        self.known: dict[str, int] = {}
        """Topic -> hash of the last body seen (our own process only: ``hash`` is salted)."""
        self._touched: set[str] | None = None

    @property
    def resyncing(self) -> bool:
        """True between `begin` and `end`."""
        return self._touched is not None

    def note(self, message: Message) -> bool:
        """Record one received message; False when it is a replay of a value already seen.

        Call it for every retained replay, every live ``retain`` message and every live
        message on a known topic.
        """
        topic = message.topic
        data = message.data
        known = self.known
        touched = self._touched
        if touched is not None:
            touched.add(topic)
        if message.retained:
            digest = hash(data)
            if touched is not None and known.get(topic) == digest:
                return False  # unchanged while we were away: not a new message
        elif topic not in known and not message.retain:
            return True  # live, and not a retained topic as far as anyone can tell
        else:
            digest = hash(data)
        if data:
            known[topic] = digest
        else:
            known.pop(topic, None)
        return True

    def begin(self) -> None:
        """A full retained replay follows (after a reconnect); restarts one left unfinished."""
        self._touched = set()

    def end(self) -> list[str]:
        """The replay is complete: return (and forget) the known topics it did not contain.

        Those were cleared while the subscriber was away; it must receive a clear for each.
        Without a `begin` first, nothing was replayed and nothing is returned.
        """
        touched = self._touched
        if touched is None:
            return []
        self._touched = None
        gone = [topic for topic in self.known if topic not in touched]
        for topic in gone:
            del self.known[topic]
        return gone
