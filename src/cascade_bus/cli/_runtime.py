"""Opening buses for the commands and turning every failure into one line and an exit status."""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote

import click

import cascade_bus
from cascade_bus import (
    Bus,
    BusError,
    BusURL,
    ConnectError,
    EncodeError,
    Envelope,
    InvalidTopic,
    InvalidURL,
    PayloadTooLarge,
    UnsupportedFeature,
)

from ._hints import connect_hint
from ._output import (
    BAD_INPUT,
    FAILED,
    INTERRUPTED,
    CliError,
    echo_error,
    remember_secret,
    remember_secrets,
)

__all__ = ["DEBUG_ENV", "describe", "guarded", "open_bus", "parse_url"]

#: Set to 1 to print the traceback of an unexpected error (a bug) instead of just its line.
DEBUG_ENV = "CASCADE_BUS_DEBUG"

_BAD_INPUT_ERRORS = (InvalidURL, InvalidTopic, UnsupportedFeature, EncodeError, PayloadTooLarge)
_last_url: BusURL | None = None


def _remember_raw_password(text: str) -> None:
    """Mask a password even in a URL that does not parse."""
    _, sep, rest = text.rpartition("://")
    at = rest.rfind("@")
    if sep and at >= 0:
        _, colon, password = rest[:at].partition(":")
        if colon and password:
            remember_secret(password)
            remember_secret(unquote(password))


def parse_url(url: str) -> BusURL:
    """Parse a bus URL and remember its password so that it is never printed.

    Raises:
        InvalidURL: the URL cannot be parsed.
    """
    global _last_url
    _remember_raw_password(url)
    parsed = BusURL(url)
    remember_secrets(parsed)
    _last_url = parsed
    return parsed


def _warn(error: Exception, topic: str, env: Envelope[Any] | None) -> None:
    echo_error(f"cascade-bus: warning: a message on {topic!r} was dropped: {error}")


def open_bus(url: str | BusURL, **options: Any) -> Bus:
    """Create (not open) a bus whose absorbed errors are reported as warnings on stderr.

    Raises:
        UnknownScheme: no transport for the scheme.
        InvalidURL: the URL or an option is invalid.
    """
    parsed = url if isinstance(url, BusURL) else parse_url(url)
    return cascade_bus.connect(parsed, on_error=_warn, **options)


def describe(exc: BusError) -> tuple[str, int]:
    """The one-line message and exit status for a library error."""
    message = str(exc) or type(exc).__name__
    if isinstance(exc, ConnectError) and _last_url is not None:
        return f"{message} ({connect_hint(_last_url, message)})", FAILED
    if isinstance(exc, _BAD_INPUT_ERRORS):
        return message, BAD_INPUT
    return message, FAILED


def _leaf(exc: BaseException) -> BaseException:
    """The first real error inside (nested) exception groups from task groups."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def _silence_stdout() -> None:
    """The reader went away (``| head``): point stdout at devnull so the exit flush is quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # not a real file (a test runner's buffer)
        pass


def guarded(call: Callable[[], Any], where: str) -> int:
    """Run ``call`` and return an exit status; every failure becomes one line on stderr.

    Args:
        call: Runs the command (click's main in non-standalone mode).
        where: The command path for messages, e.g. ``cascade-bus pub``.

    Returns:
        The command's status: 0 ok, 1 failed, 2 bad input, 130 interrupted.
    """
    try:
        result = call()
    except SystemExit:
        raise
    except BaseException as raised:
        exc = _leaf(raised)
        if isinstance(exc, KeyboardInterrupt | click.exceptions.Abort):
            echo_error(f"{where}: interrupted")
            return INTERRUPTED
        if isinstance(exc, click.UsageError):
            path = exc.ctx.command_path if exc.ctx is not None else where
            echo_error(f"{path}: {exc.format_message()} (see '{path} --help')")
            return exc.exit_code
        if isinstance(exc, click.ClickException):
            echo_error(f"{where}: {exc.format_message()}")
            return exc.exit_code
        if isinstance(exc, CliError):
            echo_error(f"{where}: {exc.message}")
            return exc.exit_code
        if isinstance(exc, BusError):
            message, status = describe(exc)
            echo_error(f"{where}: {message}")
            return status
        if isinstance(exc, BrokenPipeError):
            _silence_stdout()
            return 0
        if not isinstance(exc, Exception):
            raise
        if os.environ.get(DEBUG_ENV, "").strip() not in ("", "0"):
            traceback.print_exception(raised)
        echo_error(
            f"{where}: unexpected error: {type(exc).__name__}: {exc} "
            f"(set {DEBUG_ENV}=1 to see the traceback)"
        )
        return FAILED
    if isinstance(result, bool) or not isinstance(result, int):
        return 0
    return result
