"""Input parsing and output formatting shared by the commands; errors are one line, secret-free."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import sys
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import IO, Any, NoReturn
from urllib.parse import quote

import click
import msgspec
from rich.console import Console, RenderableType
from rich.measure import Measurement

from cascade_bus import BusURL, Envelope

__all__ = [
    "BAD_INPUT",
    "FAILED",
    "INTERRUPTED",
    "PROG",
    "RETAINED_MARK",
    "CliError",
    "echo_error",
    "envelope_record",
    "fail",
    "format_time",
    "json_line",
    "make_console",
    "parse_headers",
    "parse_json",
    "print_full",
    "remember_secret",
    "remember_secrets",
    "render_payload",
    "scrub",
]

PROG = "cascade-bus"
#: Exit statuses: something failed at run time / the input was wrong / Ctrl-C.
FAILED = 1
BAD_INPUT = 2
INTERRUPTED = 130

#: Between topic and payload in a ``sub``/``watch`` line: a retained replay, not a live message.
RETAINED_MARK = " [retained] "
_MASK = "[secure]"
#: Widest table printed to a pipe or file.
_MAX_PLAIN_WIDTH = 400
#: Passwords at least this long are masked wherever they appear, not only inside URLs.
_BARE_MIN = 4
_secrets: set[str] = set()


class CliError(Exception):
    """A failure to report as one line on stderr, with an exit status.

    Args:
        message: What went wrong, in plain words (shown after the command name).
        exit_code: The process exit status.
    """

    def __init__(self, message: str, exit_code: int = FAILED) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


def fail(message: str, exit_code: int = BAD_INPUT) -> NoReturn:
    """Raise a `CliError` (bad input unless ``exit_code`` says otherwise)."""
    raise CliError(message, exit_code)


def remember_secret(secret: str) -> None:
    """Note a password (and its URL-quoted form) so that no message printed can show it."""
    if secret:
        _secrets.add(secret)
        _secrets.add(quote(secret, safe=""))


def remember_secrets(url: BusURL) -> None:
    """Note the URL's password so that no message printed afterwards can show it."""
    if url.password:
        remember_secret(url.password)


def scrub(text: str) -> str:
    """Replace every password seen in a URL by ``[secure]``.

    In URL userinfo (``:secret@``) always; anywhere else when it is long enough not to be an
    ordinary word (a one-letter password must not mangle every message).
    """
    for secret in sorted(_secrets, key=len, reverse=True):
        text = text.replace(f":{secret}@", f":{_MASK}@")
        if len(secret) >= _BARE_MIN:
            text = text.replace(secret, _MASK)
    return text


def echo_error(text: str) -> None:
    """Print ``text`` to stderr as one line, passwords masked."""
    line = " ".join(scrub(text).split())
    with contextlib.suppress(OSError):  # stderr is gone too: nothing left to tell
        click.echo(line, err=True)


def make_console(*, stderr: bool = False, file: IO[str] | None = None) -> Console:
    """A rich console; on a pipe or file it is plain, 120 columns wide unless COLUMNS says."""
    stream = file or (sys.stderr if stderr else sys.stdout)
    terminal = hasattr(stream, "isatty") and stream.isatty()
    width: int | None = None
    if not terminal and "COLUMNS" not in os.environ:
        width = 120
    # markup=False: topics, payloads and "[secure]" in URLs are text, never rich markup.
    return Console(
        file=file, stderr=stderr, width=width, highlight=False, markup=False, soft_wrap=False
    )


def print_full(console: Console, *renderables: RenderableType) -> None:
    """Print tables whole: on a pipe or file, as wide as they need instead of truncated."""
    for renderable in renderables:
        if console.is_terminal:
            console.print(renderable)
            continue
        options = console.options.update(width=_MAX_PLAIN_WIDTH)
        needed = Measurement.get(console, options, renderable).maximum
        width = console.width
        console.width = max(width, min(needed, _MAX_PLAIN_WIDTH))  # print() caps at this
        try:
            console.print(renderable)
        finally:
            console.width = width


# -- input ---------------------------------------------------------------------------------------


def _no_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not valid JSON")


def parse_json(text: str, source: str) -> Any:
    """Parse a JSON payload; a mistake is reported with its line and column.

    Args:
        text: The JSON text.
        source: Where it came from, for the message (``PAYLOAD``, ``stdin``).

    Raises:
        CliError: the text is not valid JSON (exit status 2).
    """
    try:
        return json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        start = max(0, exc.pos - 12)
        near = text[start : exc.pos + 12]
        hint = "; quote text as a JSON string or use --raw" if exc.pos == 0 else ""
        fail(
            f"invalid JSON in {source} at line {exc.lineno}, column {exc.colno}: {exc.msg} "
            f"(near {near!r}){hint}"
        )
    except ValueError as exc:
        fail(f"invalid JSON in {source}: {exc}")


def parse_headers(items: Iterable[str]) -> dict[str, str]:
    """Turn repeated ``--header key=value`` options into a dict.

    Raises:
        CliError: an item has no ``=`` or an empty key (exit status 2).
    """
    headers: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            fail(f"invalid --header {item!r}: expected key=value")
        headers[key.strip()] = value
    return headers


# -- output --------------------------------------------------------------------------------------


def render_payload(payload: Any) -> str:
    """One-line text for a payload: compact JSON, or the text of a UTF-8 bytes payload."""
    if isinstance(payload, bytes):
        if not payload:
            return "(empty)"
        text = _as_text(payload)
        if text is None:  # binary: hex, so a line is never a Python literal like b'...'
            return f"({len(payload)} bytes) {payload.hex(' ')}"
        return text.replace("\r", "\\r").replace("\n", "\\n")
    try:
        return msgspec.json.encode(payload).decode()
    except (TypeError, ValueError):
        return repr(payload)


def format_time(when: datetime) -> str:
    """RFC 3339 with milliseconds and a ``Z``, as CloudEvents writes it."""
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def envelope_record(env: Envelope[Any]) -> dict[str, Any]:
    """The envelope's fields as a JSON-ready dict; a bytes payload becomes ``payload_base64``."""
    record: dict[str, Any] = {
        "topic": env.topic,
        "id": env.id,
        "source": env.source,
        "type": env.type,
        "time": format_time(env.time),
        "content_type": env.content_type,
        "headers": dict(env.headers),
        "correlation_id": env.correlation_id,
        "reply_to": env.reply_to,
        "retained": env.retained,
    }
    payload = env.payload
    if isinstance(payload, bytes):
        text = _as_text(payload)
        if text is None:
            record["payload_base64"] = base64.b64encode(payload).decode()
        else:  # a plain client's text: readable as text, not base64
            record["payload_text"] = text
    else:
        record["payload"] = payload
    return record


def _as_text(data: bytes) -> str | None:
    """The bytes as text when they are printable UTF-8 (tabs and newlines allowed), else None."""
    try:
        text = data.decode()
    except UnicodeDecodeError:
        return None
    return (
        text if text.replace("\n", "").replace("\t", "").replace("\r", "").isprintable() else None
    )


def json_line(record: Mapping[str, Any]) -> str:
    """Compact JSON for one output line."""
    return msgspec.json.encode(record).decode()
