"""Adapter kit: the options every network transport shares, parsed once, with one name each.

``reconnect``, ``reconnect_min``, ``reconnect_max``, ``offline_buffer`` and the TLS files
(``ca_file``, ``certfile``, ``keyfile``, ``tls_verify``) mean the same on every transport;
adapters read them through `NetworkOptions.parse` instead of parsing them again.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ._errors import InvalidURL
from ._url import parse_bool, parse_float, parse_int

__all__ = ["NETWORK_OPTIONS", "NetworkOptions", "tls_context"]

#: The option names `NetworkOptions.parse` reads (add them to an adapter's known options).
NETWORK_OPTIONS = frozenset(
    {
        "reconnect",
        "reconnect_min",
        "reconnect_max",
        "offline_buffer",
        "ca_file",
        "certfile",
        "keyfile",
        "tls_verify",
    }
)

_RECONNECT_MIN = 0.05
_RECONNECT_MAX = 5.0
_OFFLINE_BUFFER = 10_000


@dataclass(frozen=True, slots=True)
class NetworkOptions:
    """Reconnect, offline-buffer and TLS settings of one network transport.

    Attributes:
        reconnect: Reconnect after a lost connection (False: the loss is final).
        reconnect_min: First backoff delay in seconds (doubling, jittered).
        reconnect_max: Largest backoff delay in seconds.
        offline_buffer: Publishes held while disconnected (QoS 0 beyond it: counted drops;
            QoS >= 1 beyond it: `PublishError`).
        tls: The TLS context, or None for a plain connection.
    """

    reconnect: bool = True
    reconnect_min: float = _RECONNECT_MIN
    reconnect_max: float = _RECONNECT_MAX
    offline_buffer: int = _OFFLINE_BUFFER
    tls: ssl.SSLContext | None = None

    @classmethod
    def parse(
        cls,
        opts: Mapping[str, Any],
        *,
        scheme: str,
        tls: bool,
        sslsocket_class: type[ssl.SSLSocket] | None = None,
    ) -> NetworkOptions:
        """Read the shared options from ``opts``; ``tls`` says whether the scheme wants TLS.

        Raises:
            InvalidURL: a bad value, naming the option.
        """
        low = parse_float("reconnect_min", opts.get("reconnect_min", _RECONNECT_MIN))
        high = parse_float("reconnect_max", opts.get("reconnect_max", max(low, _RECONNECT_MAX)))
        if low <= 0 or high < low:
            raise InvalidURL(
                f"reconnect_min={low}, reconnect_max={high}: need 0 < reconnect_min <= "
                "reconnect_max"
            )
        buffer = parse_int("offline_buffer", opts.get("offline_buffer", _OFFLINE_BUFFER))
        if buffer < 0:
            raise InvalidURL(f"offline_buffer={buffer}: must be >= 0")
        return cls(
            reconnect=parse_bool("reconnect", opts.get("reconnect", True)),
            reconnect_min=low,
            reconnect_max=high,
            offline_buffer=buffer,
            tls=tls_context(opts, scheme, sslsocket_class) if tls else None,
        )


def tls_context(
    opts: Mapping[str, Any], scheme: str, sslsocket_class: type[ssl.SSLSocket] | None = None
) -> ssl.SSLContext:
    """Build a client TLS context from ``ca_file`` / ``certfile`` / ``keyfile`` / ``tls_verify``.

    Raises:
        InvalidURL: the files cannot be loaded (the message names the scheme, not the paths'
            contents).
    """
    verify = parse_bool("tls_verify", opts.get("tls_verify", True))
    try:
        context = ssl.create_default_context(cafile=opts.get("ca_file"))
        if sslsocket_class is not None:
            context.sslsocket_class = sslsocket_class
        if opts.get("certfile"):
            context.load_cert_chain(opts["certfile"], opts.get("keyfile"))
    except (OSError, ssl.SSLError) as exc:
        raise InvalidURL(f"cannot load the TLS files for {scheme}://: {exc}") from None
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context
