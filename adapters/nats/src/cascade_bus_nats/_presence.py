"""Presence on NATS: leases in a JetStream KV bucket, swept by surviving buses.

NATS has no last will, and nats-server 2.9 no per-message TTL, so each bus with ``presence``
keeps one KV entry per presence topic (``<retain_bucket>_presence``), renewed every
``presence_interval``; any bus with presence (or ``presence_sweep``) claims an entry that was
not renewed for its lease life (a delete that only succeeds at the revision it saw) and
publishes the entry's offline body, retained. The timing is the core's (`cascade_bus._presence`).
"""

from __future__ import annotations

import base64
import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import nats.errors as nats_errors
import nats.js.errors as js_errors
from nats.js.api import KeyValueConfig
from nats.js.kv import KeyValue

from cascade_bus import ConnectionLost, PublishError

if TYPE_CHECKING:
    from cascade_bus.spi import PresenceLeases

    from ._transport import NatsTransport

__all__ = ["NatsLeases", "NatsPresence"]


def _key(topic: str) -> str:
    """A KV key for any topic (KV keys allow only ``[-/_=.a-zA-Z0-9]``)."""
    return base64.urlsafe_b64encode(topic.encode()).decode().rstrip("=")


def _topic(key: str) -> str:
    return base64.urlsafe_b64decode(key + "=" * (-len(key) % 4)).decode()


@contextlib.contextmanager
def _translated(where: str) -> Iterator[None]:
    """nats-py errors of a lease operation as the bus's errors (chained)."""
    try:
        yield
    except (nats_errors.ConnectionClosedError, nats_errors.NoRespondersError) as exc:
        raise ConnectionLost(f"presence leases on {where}: {exc!r}") from exc
    except (nats_errors.Error, TimeoutError) as exc:
        raise PublishError(f"presence leases on {where}: {exc!r}") from exc


class NatsLeases:
    """The lease table (`cascade_bus._presence.PresenceLeases`) in a KV bucket."""

    def __init__(self, transport: NatsTransport) -> None:
        self.t = transport
        self.bucket = f"{transport._opts.retain_bucket}_presence"
        self._kv: KeyValue | None = None
        self._client: object = None

    async def _open(self) -> KeyValue:
        client = self.t.client
        if client is None:
            raise ConnectionLost(f"presence leases on {self.t.url.endpoint()}: not connected")
        if self._kv is None or self._client is not client:
            js = client.jetstream(timeout=self.t._opts.ack_timeout)
            try:
                kv = await js.key_value(self.bucket)
            except js_errors.BucketNotFoundError:
                config = KeyValueConfig(
                    bucket=self.bucket,
                    history=1,
                    description="cascade-bus presence leases",
                    replicas=self.t._js.replicas(),  # as the retained bucket's
                )
                kv = await js.create_key_value(config)
            self._kv, self._client = kv, client
        return self._kv

    async def put(self, topic: str, record: bytes) -> int:
        """Create or overwrite the lease; its revision is the stream sequence (never reused)."""
        with _translated(self.t.url.endpoint()):
            return await (await self._open()).put(_key(topic), record)

    async def refresh(self, topic: str, record: bytes, revision: int) -> int | None:
        """Renew at ``revision`` only; None when it was claimed or replaced."""
        with _translated(self.t.url.endpoint()):
            kv = await self._open()
            try:
                return await kv.update(_key(topic), record, last=revision)
            except js_errors.KeyWrongLastSequenceError:
                return None

    async def remove(self, topic: str) -> None:
        """Delete the lease (a clean close)."""
        with _translated(self.t.url.endpoint()):
            await (await self._open()).delete(_key(topic))

    async def scan(self) -> list[tuple[str, int, bytes]]:
        """Every live lease: a key listing, then one read per key."""
        found: list[tuple[str, int, bytes]] = []
        with _translated(self.t.url.endpoint()):
            kv = await self._open()
            try:
                keys = await kv.keys()
            except js_errors.NoKeysError:
                return found
            for key in keys:
                try:
                    entry = await kv.get(key)
                except (js_errors.KeyNotFoundError, js_errors.KeyDeletedError):
                    continue  # claimed or removed since the listing
                if entry.revision is not None and entry.value:
                    found.append((_topic(key), entry.revision, entry.value))
        return found

    async def claim(self, topic: str, revision: int) -> bool:
        """Delete at ``revision`` only: True for the one bus that wins."""
        with _translated(self.t.url.endpoint()):
            kv = await self._open()
            try:
                return await kv.delete(_key(topic), last=revision)
            except js_errors.KeyWrongLastSequenceError:
                return False


class NatsPresence:
    """Mixed into `NatsTransport`: declares `cascade_bus._presence.LeasedPresence`."""

    _presence_leases: NatsLeases | None = None

    def presence_leases(self) -> PresenceLeases:
        """The KV lease table of this transport's server (created on first use)."""
        if self._presence_leases is None:
            self._presence_leases = NatsLeases(self)  # type: ignore[arg-type]
        return self._presence_leases
