"""Redis Cluster: pattern leases, retained snapshots across namespaces, the classic barrier.

A pattern subscription leases its pattern in its namespace's ``patterns`` hash (the publish
script fans matches out to ``<ns>p:<pattern>``); a *broad* pattern leases itself in every slot's
``broad`` hash (one `BROAD_SCRIPT` call per master, or slot by slot through pipelines). Leases
are renewed every ``stream_ttl / 3`` and after every reconnect. A broad pattern's snapshot reads
every namespace that holds retained messages; its barrier is a classic PUBLISH on every master.
"""

from __future__ import annotations

import asyncio
from typing import Any

from cascade_bus import ConnectionLost

from . import _errors as errors
from ._cluster_client import (
    _LEASE_BATCH,
    _TRANSIENT,
    SLOTS,
    ClusterClient,
    NoScriptError,
    ResponseError,
    _Channel,
)
from ._connection import log
from ._resp import ReplyError, RespLost

__all__ = ["ClusterLeases"]


class ClusterLeases(ClusterClient):
    """Pattern leases, snapshots over namespaces, the barrier for broad patterns."""

    async def _lease(self, ch: _Channel) -> None:
        ttl = str(self._ttl_ms).encode()
        await self.script(b"a", ch.ns + b"patterns", ch.field, ch.pattern.encode(), ttl, ns=ch.ns)

    async def _lease_broad(
        self, fields: list[bytes], patterns: list[bytes], *, drop: bool = False
    ) -> None:
        """Write (or drop) broad-pattern leases in every slot's ``broad`` hash.

        One call per master (`BROAD_SCRIPT` over the slots the slot map says it owns); a master
        that refuses it (a slot migrating) gets the slower per-slot pipeline instead.
        """
        rc = self._client()
        by_node: dict[str, list[int]] = {}
        for slot, nodes in rc.nodes_manager.slots_cache.items():
            if nodes:
                by_node.setdefault(nodes[0].name, []).append(slot)
        head: list[bytes] = [b"d" if drop else b"a", str(self._ttl_ms).encode()]
        head.append(b"%d" % len(fields))
        for field, pattern in zip(fields, patterns, strict=True):
            head += [field, pattern]

        async def per_node(name: str, slots: list[int]) -> list[int]:
            node = rc.get_node(node_name=name)
            try:
                if node is None:
                    raise ReplyError(f"NODE {name} left the slot map")
                keys = [self._slot_ns(slot) + b"broad" for slot in slots]
                await self._rc_call(b"EVALSHA", self._broad_sha, 0, *head, *keys, target_nodes=node)
                return []
            except (ReplyError, RespLost) as exc:
                log.info("broad leases on %s: %s; writing them slot by slot", name, exc)
                return slots

        done = [s for slots in by_node.values() for s in slots]
        left = sorted(set(range(SLOTS)) - set(done))
        for slots in await asyncio.gather(*(per_node(n, s) for n, s in by_node.items())):
            left += slots
        if left:
            await self._lease_slots(sorted(left), fields, patterns, drop=drop)

    async def _lease_slots(
        self, slots: list[int], fields: list[bytes], patterns: list[bytes], *, drop: bool
    ) -> None:
        """Broad leases slot by slot through cluster pipelines (redirects followed)."""
        ttl = str(self._ttl_ms).encode()
        calls: list[tuple[Any, ...]] = []
        for slot in slots:
            ns = self._slot_ns(slot)
            key = ns + b"broad"
            for field, pattern in zip(fields, patterns, strict=True):
                if drop:
                    calls.append((b"EVALSHA", self._sha, 1, key, b"d", ns, key, field))
                else:
                    calls.append(
                        (b"EVALSHA", self._sha, 1, key, b"a", ns, key, field, pattern, ttl)
                    )
        for start in range(0, len(calls), _LEASE_BATCH):
            chunk = calls[start : start + _LEASE_BATCH]
            results = await self._pipeline(chunk)
            if any(isinstance(r, NoScriptError) for r in results):
                await self.reload_script()
                results = await self._pipeline(chunk)
            for result in results:
                if isinstance(result, ResponseError) and not isinstance(result, _TRANSIENT):
                    raise ReplyError(str(result))
                if isinstance(result, BaseException):
                    raise ConnectionLost(f"leasing a broad pattern failed: {result}")

    async def _renew_leases(self, *, connected: bool = True) -> None:
        """Write every lease of this bus again (after a reconnect, and every stream_ttl / 3)."""
        if connected and not self.t._connected:
            return
        narrow = [ch for ch in self._chans.values() if ch.kind == "p"]
        await asyncio.gather(*(self._lease(ch) for ch in narrow))
        broad = list(self._classic.values())
        if broad:
            await self._lease_broad(
                [ch.field for ch in broad], [ch.pattern.encode() for ch in broad]
            )

    async def _renew_leases_logged(self) -> None:
        try:
            await self._renew_leases()
        except (ConnectionLost, ReplyError) as exc:
            log.info("renewing the pattern leases on %s failed: %s", self.url.endpoint(), exc)

    async def snapshot(self, pattern: str) -> dict[str, tuple[int, bytes]]:
        """Retained messages matching ``pattern``: its namespace's, or (broad) every one's."""
        read = self.t._read_retained
        kind, ns, _ = self._plan(pattern)
        if kind != "b":
            return await read(pattern, ns)
        # A broad pattern: every namespace that holds retained messages, on every master.
        out: dict[str, tuple[int, bytes]] = {}
        for key in await self._retained_keys():
            out.update(await read(pattern, key[: -len(b"retained")]))
        return out

    async def _retained_keys(self) -> list[bytes]:
        """Every ``<prefix>{...}retained`` hash in the cluster (SCAN on every master)."""
        rc = self._client()
        glob = self._prefix + b"{*}retained"
        keys: list[bytes] = []
        for node in rc.get_primaries():
            cursor: Any = 0
            while True:
                reply = await self._rc_call(
                    b"SCAN", cursor, b"MATCH", glob, b"COUNT", 1000, b"TYPE", b"hash",
                    target_nodes=node,
                )  # fmt: skip
                cursor, page = reply
                if isinstance(cursor, dict):  # redis-py keys the cursor by node name
                    cursor = next(iter(cursor.values()))
                keys.extend(page)
                if int(cursor) == 0:
                    break
        return keys

    async def _classic_barrier(self) -> None:
        """PUBLISH a token on every master; all of them arriving means all earlier ones did."""
        rc = self._client()
        tokens: list[tuple[Any, bytes, asyncio.Future[None]]] = []
        for node in rc.get_primaries():
            token, fut = self._sync.expect(self._sync.barriers)
            tokens.append((node, token, fut))
        try:
            await asyncio.gather(
                *(
                    self._rc_call(b"PUBLISH", self._barrier_channel, token, target_nodes=node)
                    for node, token, _ in tokens
                )
            )
            await asyncio.gather(*(fut for _, _, fut in tokens))
        except RespLost as exc:
            raise errors.lost(exc) from exc
        finally:
            for _, token, _ in tokens:
                self._sync.barriers.discard(token)
