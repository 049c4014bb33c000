"""MQTT URL options, parsed and checked once: ``mqtt://user:pass@host:1883?client_id=...``."""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from cascade_bus import InvalidTopic, InvalidURL, validate_topic
from cascade_bus.spi import BusURL, NetworkOptions, parse_bool, parse_int

__all__ = ["MqttOptions"]

_VERSIONS = {"5": 5, "5.0": 5, "3.1.1": 4, "311": 4, "3": 4, "4": 4}
# The older, generic names of the websocket schemes.
_ALIASES = {"ws": "mqtt+ws", "wss": "mqtt+wss"}


@dataclass(frozen=True, slots=True, repr=False)
class MqttOptions:
    """Every option the MQTT transport understands, with its default."""

    host: str
    port: int
    username: str | None
    password: str | None
    client_id: str
    version: int  # paho's numbering: 5 = MQTT 5, 4 = MQTT 3.1.1
    keepalive: int
    clean_start: bool
    tls: ssl.SSLContext | None
    will_topic: str | None
    will_payload: bytes
    will_qos: int
    will_retain: bool
    reconnect: bool
    reconnect_min: float
    reconnect_max: float
    offline_buffer: int
    max_inflight: int
    tcp_nodelay: bool
    # Re-arm TCP_QUICKACK after reads (Linux): no 40 ms stall behind a broker's Nagle.
    tcp_quickack: bool
    transport: Literal["tcp", "websockets"]  # websockets for mqtt+ws:// and mqtt+wss://
    ws_path: str
    presence_topic: str | None
    # Persistent sessions: received messages held for a subscribe() not made yet (0: none).
    unclaimed_buffer: int
    # MQTT 5 Receive Maximum announced in CONNECT (0: not announced, the broker's window).
    receive_maximum: int
    # The shared reconnect / offline-buffer / TLS settings as parsed (for the Supervisor).
    network: NetworkOptions

    def __repr__(self) -> str:
        return (
            f"MqttOptions(host={self.host!r}, port={self.port}, username={self.username!r}, "
            f"password={'[secure]' if self.password else None}, client_id={self.client_id!r}, "
            f"version={'5' if self.version == 5 else '3.1.1'})"
        )

    @classmethod
    def parse(cls, url: BusURL, options: Mapping[str, Any]) -> MqttOptions:
        """Read the URL and options (keyword options already laid over the query).

        Raises:
            InvalidURL: an unknown option or a bad value, naming the option.
        """
        opts = dict(options)
        known = {
            "client_id", "version", "keepalive", "clean_start", "ca_file", "certfile",
            "keyfile", "tls_verify", "will_topic", "will_payload", "will_qos", "will_retain",
            "reconnect", "reconnect_min", "reconnect_max", "offline_buffer", "max_inflight",
            "tcp_nodelay", "tcp_quickack", "username", "password", "presence_topic", "ws_path",
            "unclaimed_buffer", "receive_maximum",
        }  # fmt: skip
        unknown = sorted(set(opts) - known)
        if unknown:
            raise InvalidURL(
                f"unknown MQTT option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        if len(url.hosts) > 1:
            raise InvalidURL("mqtt:// takes one broker host (MQTT has no client-side clusters)")
        if not url.host:
            raise InvalidURL(
                f"{url.scheme}:// needs the broker's host, e.g. {url.scheme}://127.0.0.1:1883"
            )
        if url.path not in ("", "/") and url.scheme in ("mqtt", "mqtts"):
            raise InvalidURL(
                f"{url.scheme}:// URLs have no path (got {url.path!r}); options go in the query"
            )
        scheme = _ALIASES.get(url.scheme, url.scheme)
        tls_wanted = scheme in ("mqtts", "mqtt+wss")
        websockets = scheme in ("mqtt+ws", "mqtt+wss")
        default_port = {"mqtts": 8883, "mqtt+ws": 80, "mqtt+wss": 443}.get(scheme, 1883)
        version_text = str(opts.get("version", "5"))
        if version_text not in _VERSIONS:
            raise InvalidURL(f"version={version_text!r}: use 5 or 3.1.1")
        will_qos = parse_int("will_qos", opts.get("will_qos", 0))
        if will_qos > 2:
            raise InvalidURL(f"will_qos={will_qos}: QoS is 0, 1 or 2")
        will_payload = opts.get("will_payload", b"")
        presence_topic = opts.get("presence_topic") or None
        if presence_topic is not None:
            if opts.get("will_topic"):
                raise InvalidURL(
                    "presence_topic sets the will itself; do not combine it with will_topic"
                )
            try:
                validate_topic(str(presence_topic))
            except InvalidTopic as exc:
                raise InvalidURL(f"presence_topic={presence_topic!r}: {exc}") from None
        if isinstance(will_payload, str):
            will_payload = will_payload.encode()
        version = _VERSIONS[version_text]
        clean_start = parse_bool("clean_start", opts.get("clean_start", True))
        unclaimed = parse_int("unclaimed_buffer", opts.get("unclaimed_buffer", 1024))
        if "receive_maximum" in opts:
            receive_maximum = parse_int("receive_maximum", opts["receive_maximum"])
            if receive_maximum > 65_535:
                raise InvalidURL(
                    f"receive_maximum={receive_maximum}: MQTT allows 1 to 65535 (0: not sent)"
                )
        else:
            # A resumed session's backlog then waits at the broker (unacknowledged, safe from
            # a crash) instead of overflowing the unclaimed buffer before subscribe().
            persistent = not clean_start and version == 5
            receive_maximum = min(unclaimed, 65_535) if persistent else 0
        net = NetworkOptions.parse(
            opts, scheme=url.scheme, tls=tls_wanted, sslsocket_class=_ClosingSSLSocket
        )
        return cls(
            host=url.host or "127.0.0.1",
            port=url.port or default_port,
            username=opts.get("username", url.username),
            password=opts.get("password", url.password),
            client_id=str(opts.get("client_id") or f"cascade-bus-{os.urandom(6).hex()}"),
            version=version,
            keepalive=parse_int("keepalive", opts.get("keepalive", 60)),
            clean_start=clean_start,
            tls=net.tls,
            will_topic=opts.get("will_topic"),
            will_payload=bytes(will_payload),
            will_qos=will_qos,
            will_retain=parse_bool("will_retain", opts.get("will_retain", False)),
            reconnect=net.reconnect,
            reconnect_min=net.reconnect_min,
            reconnect_max=net.reconnect_max,
            offline_buffer=net.offline_buffer,
            max_inflight=parse_int("max_inflight", opts.get("max_inflight", 20)),
            tcp_nodelay=parse_bool("tcp_nodelay", opts.get("tcp_nodelay", True)),
            tcp_quickack=parse_bool("tcp_quickack", opts.get("tcp_quickack", True)),
            transport="websockets" if websockets else "tcp",
            # ws://host:port/path: the path is the WebSocket endpoint (as ws_path= says).
            ws_path=str(opts.get("ws_path", url.path if url.path not in ("", "/") else "/mqtt")),
            presence_topic=None if presence_topic is None else str(presence_topic),
            unclaimed_buffer=unclaimed,
            receive_maximum=receive_maximum,
            network=net,
        )


class _ClosingSSLSocket(ssl.SSLSocket):
    """An SSLSocket that closes itself when its handshake fails.

    paho does the TLS handshake inside ``connect()`` and drops the socket without closing it
    when the handshake fails (e.g. an unknown CA), which leaks the descriptor until garbage
    collection (with a ResourceWarning).
    """

    def do_handshake(self, block: bool = False) -> None:
        """Handshake; on failure close the socket before raising."""
        try:
            super().do_handshake(block)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise  # non-blocking: not a failure
        except BaseException:
            self.close()
            raise
