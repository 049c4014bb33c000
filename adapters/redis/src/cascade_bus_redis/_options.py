"""Redis URL options, parsed and checked once: ``redis://user:pass@host:6379/0?prefix=...``.

``redis+cluster://host:port,host:port/?shard_levels=1`` (Redis Cluster) takes the same options,
except ``db`` (a cluster has database 0 only), plus ``shard_levels``.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cascade_bus import InvalidURL, UnsupportedFeature
from cascade_bus.spi import (
    NETWORK_OPTIONS,
    BusURL,
    NetworkOptions,
    parse_bool,
    parse_float,
    parse_int,
)

__all__ = ["RedisOptions"]

KNOWN = NETWORK_OPTIONS | frozenset(
    {
        "db",
        "username",
        "password",
        "prefix",
        "client_id",
        "stream_maxlen",
        "stream_ttl",
        "claim_idle",
        "read_count",
        "queue_prefetch",
        "health_check_interval",
        "max_payload",
        "max_inflight",
    }
)
#: Options only ``redis+cluster://`` understands.
CLUSTER_ONLY = frozenset({"shard_levels", "address_map"})
#: Last-will options (the MQTT transport's): refused, Redis has no last will.
WILL = ("will_topic", "will_payload", "will_qos", "will_retain", "presence_topic")

#: Default largest body. Redis disconnects a pub/sub client whose output buffer passes 32 MiB
#: (``client-output-buffer-limit pubsub``), so far smaller messages are the sane ceiling.
DEFAULT_MAX_PAYLOAD = 8 * 1024 * 1024


@dataclass(frozen=True, slots=True, repr=False)
class RedisOptions:
    """Every option the Redis transport understands, with its default.

    Reconnect, offline-buffer and TLS settings are the kit's shared `NetworkOptions` (``net``);
    ``tls`` is ``net.tls``.
    """

    host: str
    port: int
    username: str | None
    password: str | None
    db: int
    tls: ssl.SSLContext | None
    prefix: str
    client_id: str
    client_id_given: bool
    stream_maxlen: int
    stream_ttl: float
    claim_idle: float
    read_count: int
    queue_prefetch: int
    """The least a queue-group member may hold unhandled (read ahead); see ``_prefetch``."""
    net: NetworkOptions
    health_check_interval: float
    max_payload: int
    max_inflight: int
    hosts: tuple[tuple[str, int], ...] = ()
    """Every host given (the cluster's seed nodes); standalone: just ``(host, port)``."""
    cluster: bool = False
    shard_levels: int = 1
    """Redis Cluster: how many leading topic levels form the shard key."""
    tls_files: tuple[str | None, str | None, str | None, bool] = (None, None, None, True)
    """``(ca_file, certfile, keyfile, tls_verify)`` as given, for clients that take paths."""
    address_map: Mapping[tuple[str, int], tuple[str, int]] = field(default_factory=dict)
    """Redis Cluster, for tests: node address as announced -> address to connect to instead."""

    def __repr__(self) -> str:
        return (
            f"RedisOptions(host={self.host!r}, port={self.port}, db={self.db}, "
            f"username={self.username!r}, password={'[secure]' if self.password else None}, "
            f"tls={self.tls is not None}, prefix={self.prefix!r}, client_id={self.client_id!r})"
        )

    @classmethod
    def parse(
        cls, url: BusURL, options: Mapping[str, Any], *, cluster: bool = False
    ) -> RedisOptions:
        """Read the URL and options (keyword options already laid over the query).

        Args:
            url: The bus URL.
            options: Its options.
            cluster: Parse for ``redis+cluster://`` (several seed hosts, ``shard_levels``).

        Raises:
            InvalidURL: an unknown option or a bad value, naming the option.
            UnsupportedFeature: a last-will option (Redis has no last will; not emulated).
        """
        opts = dict(options)
        will = [key for key in WILL if key in opts]
        if will:
            raise UnsupportedFeature(
                url.scheme,
                "last will",
                "Redis has nothing that publishes for a client that vanished, and the adapter "
                f"does not emulate a last will ({', '.join(will)})",
            )
        known = (KNOWN - {"db"}) | CLUSTER_ONLY if cluster else KNOWN
        unknown = sorted(set(opts) - known)
        if unknown:
            hint = ""
            if not cluster and set(unknown) & CLUSTER_ONLY:
                names = " and ".join(sorted(set(unknown) & CLUSTER_ONLY))
                hint = f" ({names}: for redis+cluster:// URLs only)"
            elif cluster and "db" in unknown:
                hint = " (a Redis Cluster has database 0 only)"
            raise InvalidURL(
                f"unknown Redis option(s) {', '.join(unknown)}{hint}; "
                f"known: {', '.join(sorted(known))}"
            )
        if len(url.hosts) > 1 and not cluster:
            raise InvalidURL(
                f"{url.scheme}:// takes one server; for Redis Cluster use "
                f"{url.scheme}+cluster://host:port,host:port (Sentinel is not supported; "
                f"got {len(url.hosts)} hosts in {url.redacted()!r})"
            )
        net = NetworkOptions.parse(opts, scheme=url.scheme, tls=url.scheme.startswith("rediss"))
        db_text = url.path.strip("/")
        if cluster:
            if db_text not in ("", "0"):
                raise InvalidURL(
                    f"{url.redacted()!r}: a Redis Cluster has database 0 only (no path needed)"
                )
            db = 0
        elif "db" in opts:
            db = parse_int("db", opts["db"])
        elif db_text:
            if not db_text.isdigit():
                raise InvalidURL(f"the path of {url.redacted()!r} must be a database number")
            db = int(db_text)
        else:
            db = 0
        prefix = str(opts.get("prefix", "cascade_bus:"))
        # A cluster key's hash tag must be the first pair of braces in it: none in the prefix.
        forbidden = "*?[]\\ \x00{}" if cluster else "*?[]\\ \x00"
        if not prefix or any(c in prefix for c in forbidden):
            raise InvalidURL(
                f"prefix={prefix!r}: use a non-empty key prefix without glob characters or spaces"
                + (" (nor braces: Redis Cluster hash tags)" if cluster else "")
            )
        shard_levels = parse_int("shard_levels", opts.get("shard_levels", 1))
        if shard_levels < 1:
            raise InvalidURL(f"shard_levels={shard_levels}: use at least 1")
        client_id = opts.get("client_id")
        if client_id is not None and (not str(client_id) or "/" in str(client_id)):
            raise InvalidURL(f"client_id={client_id!r} must be non-empty and contain no '/'")
        stream_ttl = parse_float("stream_ttl", opts.get("stream_ttl", 300.0))
        if stream_ttl < 1.0:
            raise InvalidURL(f"stream_ttl={stream_ttl}: use at least 1 second")
        read_count = parse_int("read_count", opts.get("read_count", 256))
        queue_prefetch = parse_int("queue_prefetch", opts.get("queue_prefetch", 8))
        max_inflight = parse_int("max_inflight", opts.get("max_inflight", 1024))
        if read_count < 1 or queue_prefetch < 1 or max_inflight < 2:
            raise InvalidURL("read_count and queue_prefetch must be >= 1, max_inflight >= 2")
        hosts = tuple((h or "127.0.0.1", p or 6379) for h, p in url.hosts) or (("127.0.0.1", 6379),)
        return cls(
            host=hosts[0][0],
            port=hosts[0][1],
            username=opts.get("username", url.username),
            password=opts.get("password", url.password),
            db=db,
            tls=net.tls,
            prefix=prefix,
            client_id=str(client_id) if client_id is not None else os.urandom(8).hex(),
            client_id_given=client_id is not None,
            stream_maxlen=parse_int("stream_maxlen", opts.get("stream_maxlen", 100_000)),
            stream_ttl=stream_ttl,
            claim_idle=parse_float("claim_idle", opts.get("claim_idle", 30.0)),
            read_count=read_count,
            queue_prefetch=queue_prefetch,
            net=net,
            health_check_interval=parse_float(
                "health_check_interval", opts.get("health_check_interval", 10.0)
            ),
            max_payload=parse_int("max_payload", opts.get("max_payload", DEFAULT_MAX_PAYLOAD)),
            max_inflight=max_inflight,
            hosts=hosts,
            cluster=cluster,
            shard_levels=shard_levels,
            address_map=_address_map(opts.get("address_map", "")),
            tls_files=(
                opts.get("ca_file"),
                opts.get("certfile"),
                opts.get("keyfile"),
                parse_bool("tls_verify", opts.get("tls_verify", True)),
            ),
        )


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit():
        raise InvalidURL(f"address_map: {text!r} is not host:port")
    return host.strip("[]"), int(port)


def _address_map(value: Any) -> dict[tuple[str, int], tuple[str, int]]:
    """``address_map``: ``host:port=host:port,...`` (or a mapping of such strings).

    Maps each cluster node's announced address to the one this bus connects to instead (a test
    puts a TCP proxy in front of every node and cuts only this bus's connections).
    """
    if isinstance(value, Mapping):
        pairs = [(str(k), str(v)) for k, v in value.items()]
    else:
        pairs = []
        for item in str(value).split(","):
            if item.strip():
                announced, sep, reached = item.partition("=")
                if not sep:
                    raise InvalidURL(f"address_map: {item!r} is not announced=reached")
                pairs.append((announced, reached))
    return {_address(announced): _address(reached) for announced, reached in pairs}
