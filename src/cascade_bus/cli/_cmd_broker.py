"""The commands about a broker and the transports: ``bench``, ``doctor`` and ``transports``.

Thin click wrappers: the work and the output live in `_bench`, `_doctor` and `_transports`.
"""

from __future__ import annotations

import asyncio

import click

from cascade_bus._install import install_command

from . import _bench, _doctor
from ._output import FAILED, CliError, json_line, make_console, print_full
from ._runtime import parse_url
from ._transports import installed_transports, missing_packages

__all__ = ["bench", "doctor", "transports"]


# -- bench -------------------------------------------------------------------------------------


@click.command()
@click.argument("url")
@click.option(
    "-n",
    "--messages",
    type=click.IntRange(min=1),
    default=10_000,
    show_default=True,
    help="How many messages.",
)
@click.option("--qos", type=click.IntRange(0, 2), default=0, show_default=True, help="QoS.")
@click.option(
    "--size",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    metavar="BYTES",
    help="Extra payload bytes.",
)
@click.option(
    "--rate",
    type=click.FloatRange(min=0, min_open=True),
    metavar="R",
    help="Publish at most R messages per second (default: as fast as possible).",
)
@click.option(
    "-t",
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=30.0,
    show_default=True,
    metavar="SECONDS",
    help="How long to wait for the last messages.",
)
def bench(url: str, messages: int, qos: int, size: int, rate: float | None, timeout: float) -> int:
    """Throughput and round-trip latency through the broker at URL.

    One bus publishes --messages messages to a unique topic, another receives them; every
    message's round trip (publish to delivery) is timed. Exits 1 when messages were lost.

    \b
    cascade-bus bench memory://
    cascade-bus bench mqtt://127.0.0.1 --messages 20000 --qos 1
    """  # noqa: D301 - click's \b marks a paragraph it must not rewrap
    parsed = parse_url(url)
    console = make_console()
    bar, update = _bench.progress_bar(console, messages)
    with bar:
        result = asyncio.run(
            _bench.run_bench(
                parsed,
                messages=messages,
                qos=qos,
                size=size,
                rate=rate,
                timeout=timeout,
                progress=update,
            )
        )
    _bench.show_result(console, result)
    if result.lost:
        raise CliError(
            f"{result.lost} of {result.published} message(s) did not come back within {timeout:g}s",
            FAILED,
        )
    return 0


# -- doctor ------------------------------------------------------------------------------------


@click.command()
@click.argument("url")
@click.option(
    "-t",
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=5.0,
    show_default=True,
    metavar="SECONDS",
    help="Bound for connecting and for each round trip.",
)
def doctor(url: str, timeout: float) -> int:
    """Check URL: transport, connection, a message round trip, retained messages, request/reply.

    Prints each check with what failed and a hint, and the transport's capabilities. Exits 1
    when a check failed.
    """
    report = asyncio.run(_doctor.diagnose(url, timeout=timeout))
    console = make_console()
    _doctor.show_report(console, report)
    failed = report.failed
    if failed:
        first = failed[0]
        hint = f" ({first.hint})" if first.hint else ""
        raise CliError(f"{first.name} failed: {first.detail}{hint}", FAILED)
    console.print(f"all {len(report.checks)} checks passed")
    return 0


# -- transports --------------------------------------------------------------------------------


@click.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object per scheme.")
def transports(as_json: bool) -> int:
    """List the installed URL schemes, the class serving each, and its package."""
    found = installed_transports()
    missing = missing_packages()
    if as_json:
        for info in found:
            click.echo(
                json_line(
                    {
                        "scheme": info.scheme,
                        "transport": info.target,
                        "package": info.package,
                        "version": info.version,
                    }
                )
            )
        return 0
    from rich.table import Table

    table = Table()
    for column in ("scheme", "transport", "package", "version"):
        table.add_column(column, no_wrap=True)
    for info in found:
        table.add_row(f"{info.scheme}://", info.target, info.package, info.version or "")
    console = make_console()
    print_full(console, table)
    for package, schemes in sorted(missing.items()):
        listed = ", ".join(f"{s}://" for s in schemes)
        console.print(f"not installed: {listed} ({install_command(package)})")
    return 0
