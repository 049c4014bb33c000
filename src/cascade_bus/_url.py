"""Bus URLs parsed once into a value whose `repr` and `str` never show a password."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from ._errors import InvalidURL

__all__ = ["BusURL"]

_MASK = "[secure]"
#: Query options whose values are secrets: masked like the password.
SECRET_OPTIONS = frozenset(
    {"password", "pass", "passwd", "token", "auth_token", "access_token", "secret",
     "api_key", "apikey", "nkey", "seed", "jwt", "credentials"}
)  # fmt: skip
#: Schemes whose bare user name (``scheme://NAME@host``, no password) is a token (NATS).
SECRET_USERNAME_SCHEMES = frozenset({"nats", "nats+tls", "tls"})
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


class BusURL:
    """A parsed ``scheme://[user[:password]@]host[:port][,host2[:port2]...][/path][?options]``.

    Several comma-separated hosts are kept (broker clusters). The password is held but masked as
    ``[secure]`` in `repr`, `str` and `redacted`; only `unmasked` gives it back.

    Args:
        url: The URL text.

    Raises:
        InvalidURL: the text has no ``scheme://``, a port is not a number, or it has a
            ``#fragment`` (nothing would read it).
    """

    __slots__ = ("_password", "hosts", "options", "path", "scheme", "username")

    def __init__(self, url: str) -> None:
        if not isinstance(url, str):
            raise InvalidURL(f"a bus URL must be a str, not {type(url).__name__}")
        if "://" not in url:
            raise InvalidURL(f"not a bus URL (expected scheme://...): {self._mask_text(url)!r}")
        scheme, rest = url.split("://", 1)
        if not scheme or not scheme.replace("+", "").replace("-", "").replace(".", "").isalnum():
            raise InvalidURL(f"invalid URL scheme {scheme!r}")
        self.scheme = scheme.lower()
        where = self._mask_text(url)
        self.username: str | None = None
        self._password: str | None = None
        # Userinfo runs to the last '@', so an unescaped '/', '?' or '@' in a password still
        # parses (and stays masked) instead of being mistaken for the path or the host.
        at = rest.rfind("@")
        if at >= 0:
            userinfo, rest = rest[:at], rest[at + 1 :]
            user, sep, password = userinfo.partition(":")
            self.username = unquote(user) or None
            self._password = unquote(password) if sep else None
        try:
            # urlsplit handles one host; we split the netloc ourselves to allow a,b clusters.
            parts = urlsplit("x://" + rest)
        except ValueError as exc:
            raise InvalidURL(f"cannot parse {where!r}: {exc}") from None
        if "#" in rest:  # silently dropped otherwise: say it means nothing here
            raise InvalidURL(  # not echoed: the fragment may be the tail of a token
                f"the {self.scheme}:// URL has a #fragment, which means nothing in a bus URL; "
                "remove it (write a '#' inside an option value as %23)"
            )
        self.hosts: tuple[tuple[str, int | None], ...] = tuple(
            self._parse_host(h, where) for h in parts.netloc.split(",") if h
        )
        self.path = parts.path
        try:
            self.options: dict[str, str] = dict(
                parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
            )
        except ValueError as exc:
            raise InvalidURL(f"cannot parse the query of {where!r}: {exc}") from None

    @staticmethod
    def _mask_text(text: str) -> str:
        """Mask the password in URL-ish text that may not even parse."""
        scheme, sep, rest = text.rpartition("://")
        at = rest.rfind("@")
        if at >= 0:
            userinfo, host = rest[:at], rest[at + 1 :]
            if ":" in userinfo:
                userinfo = userinfo.split(":", 1)[0] + ":" + _MASK
            rest = userinfo + "@" + host
        return scheme + sep + rest

    @staticmethod
    def _parse_host(text: str, where: str) -> tuple[str, int | None]:
        if text.startswith("["):  # IPv6 literal
            host, _, port_text = text[1:].partition("]")
            port_text = port_text.lstrip(":")
        else:
            host, _, port_text = text.partition(":")
        if not port_text:
            return host, None
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise InvalidURL(f"invalid port {port_text!r} in {where!r}")
        return host, int(port_text)

    @property
    def password(self) -> str | None:
        """The password from the userinfo, if any (never shown in reprs)."""
        return self._password

    @property
    def host(self) -> str | None:
        """The first host, or None when the URL names none (``memory://``)."""
        return self.hosts[0][0] if self.hosts else None

    @property
    def port(self) -> int | None:
        """The first host's port, or None when not given."""
        return self.hosts[0][1] if self.hosts else None

    @property
    def name(self) -> str:
        """The path without its leading slash, or the bare host for ``memory://name``."""
        return self.path.lstrip("/")

    def _render(self, password: str | None, *, masked: bool = False) -> str:
        out = self.scheme + "://"
        if self.username is not None or password is not None:
            user = self.username or ""
            if masked and password is None and self.scheme in SECRET_USERNAME_SCHEMES:
                user = _MASK  # nats://TOKEN@host: the "user name" is the token
            out += quote(user, safe="[]") if user == _MASK else quote(user, safe="")
            if password is not None:
                out += ":" + password
            out += "@"
        out += ",".join(
            (f"[{h}]" if ":" in h else h) + (f":{p}" if p is not None else "")
            for h, p in self.hosts
        )
        out += self.path
        if self.options:
            out += "?" + "&".join(
                f"{quote(k, safe='')}="
                + (_MASK if masked and k.lower() in SECRET_OPTIONS else quote(v, safe=""))
                for k, v in self.options.items()
            )
        return out

    def redacted(self) -> str:
        """The URL with the password replaced by ``[secure]``; safe for logs and errors."""
        return self._render(_MASK if self._password is not None else None, masked=True)

    def unmasked(self) -> str:
        """The URL including the password; only for handing to a client library."""
        return self._render(quote(self._password, safe="") if self._password else None)

    def endpoint(self) -> str:
        """``scheme://host:port`` without credentials or options, for messages and logs."""
        hosts = ",".join(
            (f"[{h}]" if ":" in h else h) + (f":{p}" if p is not None else "")
            for h, p in self.hosts
        )
        return f"{self.scheme}://{hosts}{self.path}"

    def merged_options(self, overrides: Mapping[str, Any]) -> dict[str, Any]:
        """Return the query options with keyword options laid over them (keywords win)."""
        merged: dict[str, Any] = dict(self.options)
        merged.update(overrides)
        return merged

    def __repr__(self) -> str:
        return f"BusURL({self.redacted()!r})"

    def __str__(self) -> str:
        return self.redacted()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BusURL) and self.unmasked() == other.unmasked()

    def __hash__(self) -> int:
        return hash(self.unmasked())


def parse_bool(name: str, value: object) -> bool:
    """Read a boolean option given as a bool or as text (``1/true/yes/on``, ``0/false/...``).

    Raises:
        InvalidURL: the value is not a recognised boolean.
    """
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise InvalidURL(f"option {name}={value!r} is not a boolean (use true or false)")


def parse_float(name: str, value: object) -> float:
    """Read a number option given as a number or as text.

    Raises:
        InvalidURL: the value is not a number or is negative.
    """
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise InvalidURL(f"option {name}={value!r} is not a number") from None
    if number < 0 or number != number:
        raise InvalidURL(f"option {name}={value!r} must be a non-negative number")
    return number


def parse_int(name: str, value: object) -> int:
    """Read a whole-number option given as an int or as text.

    Raises:
        InvalidURL: the value is not a non-negative whole number.
    """
    if isinstance(value, bool):
        raise InvalidURL(f"option {name}={value!r} is not a whole number")
    try:
        number = int(str(value), 10) if not isinstance(value, int) else value
    except ValueError:
        raise InvalidURL(f"option {name}={value!r} is not a whole number") from None
    if number < 0:
        raise InvalidURL(f"option {name}={value!r} must not be negative")
    return number
