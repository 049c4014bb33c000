"""NATS URL options, parsed and checked once: ``nats://user:pass@host:4222?name=...``."""

from __future__ import annotations

import os
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgspec

from cascade_bus import InvalidURL, UnsupportedFeature
from cascade_bus.spi import (
    BusURL,
    Capabilities,
    NetworkOptions,
    parse_bool,
    parse_float,
    parse_int,
)

__all__ = ["CAPABILITIES", "DEFAULT_PORT", "NatsOptions", "capabilities"]

DEFAULT_PORT = 4222
_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
_KNOWN = frozenset(
    {
        "user", "password", "token", "name", "ca_file", "certfile", "keyfile", "tls_verify",
        "tls_hostname", "reconnect", "reconnect_min", "reconnect_max", "reconnect_wait",
        "connect_attempt_timeout",
        "ping_interval", "max_outstanding_pings", "offline_buffer", "jetstream", "retain",
        "stream", "qos1_prefix", "stream_max_age", "stream_storage", "retain_bucket",
        "stream_retention", "stream_max_bytes",
        "ack_wait", "max_ack_pending", "consumer_inactive", "ack_timeout", "qos1_timeout",
        "drain_timeout", "randomize", "client_id", "replicas",
    }
)  # fmt: skip
_WILL = ("will_topic", "will_payload", "will_qos", "will_retain", "presence_topic")


@dataclass(frozen=True, slots=True, repr=False)
class NatsOptions:
    """Every option the NATS transport understands, with its default."""

    servers: tuple[str, ...]
    user: str | None
    password: str | None
    token: str | None
    name: str
    tls: ssl.SSLContext | None
    tls_hostname: str | None
    reconnect: bool
    reconnect_min: float
    """The first wait between reconnect attempts (jittered, doubling up to `reconnect_max`)."""
    reconnect_max: float
    connect_attempt_timeout: float
    ping_interval: float
    max_outstanding_pings: int
    offline_buffer: int
    jetstream: bool
    retain: bool
    stream: str
    qos1_prefix: str
    stream_max_age: float
    stream_storage: str
    stream_retention: str
    stream_max_bytes: int
    retain_bucket: str
    ack_wait: float
    max_ack_pending: int
    consumer_inactive: float
    ack_timeout: float
    qos1_timeout: float
    drain_timeout: float
    randomize: bool
    client_id: str | None
    replicas: int
    """Replicas of the stream and the bucket when the adapter creates them; 0 = auto."""

    def __repr__(self) -> str:
        return (
            f"NatsOptions(servers={list(self.servers)!r}, user={self.user!r}, "
            f"password={'[secure]' if self.password else None}, "
            f"token={'[secure]' if self.token else None}, name={self.name!r}, "
            f"tls={self.tls is not None}, jetstream={self.jetstream}, retain={self.retain})"
        )

    @classmethod
    def parse(cls, url: BusURL, options: Mapping[str, Any]) -> NatsOptions:
        """Read the URL and options (keyword options already laid over the query).

        Raises:
            InvalidURL: an unknown option or a bad value, naming the option.
            UnsupportedFeature: a last-will option (NATS has no last will).
        """
        opts = dict(options)
        will = [key for key in _WILL if key in opts]
        if will:
            raise UnsupportedFeature(
                url.scheme,
                "last will",
                f"NATS has no last will and the adapter does not emulate one ({', '.join(will)})",
            )
        unknown = sorted(set(opts) - _KNOWN)
        if unknown:
            raise InvalidURL(
                f"unknown NATS option(s) {', '.join(unknown)}; known: {', '.join(sorted(_KNOWN))}"
            )
        if url.path not in ("", "/"):
            raise InvalidURL(
                f"{url.scheme}:// URLs have no path (got {url.path!r}); NATS has no "
                "databases or vhosts, options go in the query"
            )
        tls_files = any(opts.get(key) for key in ("ca_file", "certfile", "keyfile"))
        tls_wanted = url.scheme in ("nats+tls", "tls") or tls_files  # tls: the older name
        scheme = "tls" if tls_wanted else "nats"
        hosts = url.hosts or (("127.0.0.1", None),)
        servers = tuple(f"{scheme}://{_host(host)}:{port or DEFAULT_PORT}" for host, port in hosts)
        # nats://user:pass@host is user/password; nats://:token@host (masked in every repr,
        # like a password) and nats://token@host (shown: prefer the first) are token auth.
        user, password, token = url.username, url.password, None
        if user is not None and password is None:
            user, token = None, user
        elif user is None and password is not None:
            password, token = None, password
        user = opts.get("user", user)
        password = opts.get("password", password)
        token = opts.get("token", token)
        if token and (user or password):
            raise InvalidURL("give either a token or a user and password, not both")
        stream = str(opts.get("stream", "CASCADE_BUS"))
        bucket = str(opts.get("retain_bucket", "cascade_retained"))
        client_id = opts.get("client_id") or None
        names = [("stream", stream), ("retain_bucket", bucket)]
        if client_id is not None:
            client_id = str(client_id)
            names.append(("client_id", client_id))
        for key, value in names:
            if not _NAME.match(value):
                raise InvalidURL(f"option {key}={value!r}: use letters, digits, '_' and '-'")
        prefix = str(opts.get("qos1_prefix", "$CASCADE.Q1")).strip(".")
        if not prefix or any(not t or t in ("*", ">") or " " in t for t in prefix.split(".")):
            raise InvalidURL(f"option qos1_prefix={prefix!r} is not a literal NATS subject")
        storage = str(opts.get("stream_storage", "file")).lower()
        if storage not in ("file", "memory"):
            raise InvalidURL(f"option stream_storage={storage!r}: use file or memory")
        retention = str(opts.get("stream_retention", "limits")).lower()
        if retention not in ("limits", "interest"):
            raise InvalidURL(f"option stream_retention={retention!r}: use limits or interest")
        jetstream = parse_bool("jetstream", opts.get("jetstream", True))
        max_ack_pending = parse_int("max_ack_pending", opts.get("max_ack_pending", 1000))
        if max_ack_pending < 1:
            raise InvalidURL("option max_ack_pending must be at least 1")
        replicas = _replicas(opts.get("replicas", "auto"))
        net = NetworkOptions.parse(_backoff(opts), scheme=scheme, tls=bool(tls_wanted))
        return cls(
            servers=servers,
            user=None if user is None else str(user),
            password=None if password is None else str(password),
            token=None if token is None else str(token),
            name=str(opts.get("name") or f"cascade-bus-{os.urandom(6).hex()}"),
            tls=net.tls,
            tls_hostname=opts.get("tls_hostname") or None,
            reconnect=net.reconnect,
            reconnect_min=net.reconnect_min,
            reconnect_max=net.reconnect_max,
            connect_attempt_timeout=parse_float(
                "connect_attempt_timeout", opts.get("connect_attempt_timeout", 2.0)
            ),
            ping_interval=parse_float("ping_interval", opts.get("ping_interval", 20.0)),
            max_outstanding_pings=parse_int(
                "max_outstanding_pings", opts.get("max_outstanding_pings", 2)
            ),
            offline_buffer=net.offline_buffer,
            jetstream=jetstream,
            retain=jetstream and parse_bool("retain", opts.get("retain", True)),
            stream=stream,
            qos1_prefix=prefix,
            stream_max_age=parse_float("stream_max_age", opts.get("stream_max_age", 3600.0)),
            stream_storage=storage,
            stream_retention=retention,
            stream_max_bytes=parse_int(
                "stream_max_bytes", opts.get("stream_max_bytes", 1024 * 1024 * 1024)
            ),
            retain_bucket=bucket,
            ack_wait=parse_float("ack_wait", opts.get("ack_wait", 30.0)),
            max_ack_pending=max_ack_pending,
            consumer_inactive=parse_float(
                "consumer_inactive", opts.get("consumer_inactive", 3600.0)
            ),
            ack_timeout=parse_float("ack_timeout", opts.get("ack_timeout", 5.0)),
            qos1_timeout=parse_float("qos1_timeout", opts.get("qos1_timeout", 30.0)),
            drain_timeout=parse_float("drain_timeout", opts.get("drain_timeout", 5.0)),
            randomize=parse_bool("randomize", opts.get("randomize", False)),
            client_id=client_id,
            replicas=replicas,
        )


def _backoff(opts: Mapping[str, Any]) -> Mapping[str, Any]:
    """Read the deprecated ``reconnect_wait`` (the former fixed wait) as both backoff bounds.

    Only where ``reconnect_min`` / ``reconnect_max`` (the names every adapter uses) are not
    given: the same fixed wait as before.
    """
    wait = opts.get("reconnect_wait")
    if wait is None:
        return opts
    fixed = parse_float("reconnect_wait", wait)
    return {"reconnect_min": fixed, "reconnect_max": fixed, **opts}


def _replicas(value: Any) -> int:
    """``auto`` (0) or a replica count JetStream accepts (1 to 5)."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return 0
    count = parse_int("replicas", value)
    if not 1 <= count <= 5:
        raise InvalidURL(f"option replicas={value!r}: use auto or 1 to 5")
    return count


def _host(host: str) -> str:
    if ":" in host:
        return f"[{host}]"  # an IPv6 literal
    return host or "127.0.0.1"


CAPABILITIES = Capabilities(
    max_qos=1,
    retain=True,
    retain_emulated=True,
    wildcards=True,
    headers=True,
    queue_groups=True,
    request_reply=True,
    no_responders=True,
    will=False,
    presence=True,  # leases in a KV bucket, swept by surviving buses (_presence.py)
    persistence=True,
    ordering=True,
    max_payload=1_048_576,
    emulated=frozenset({"retain", "presence"}),
)
_NO_RETAIN = msgspec.structs.replace(
    CAPABILITIES, retain=False, retain_emulated=False, presence=False, emulated=frozenset()
)
_CORE = msgspec.structs.replace(_NO_RETAIN, max_qos=0, persistence=False)


def capabilities(opts: NatsOptions) -> Capabilities:
    """What a transport with these options can do (no JetStream: QoS 0, nothing retained)."""
    if not opts.jetstream:
        return _CORE
    if not opts.retain:
        return _NO_RETAIN
    return CAPABILITIES
