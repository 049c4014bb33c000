"""The Cascade commands: ``watch`` (a live table of runs and tasks) and ``demo``.

Thin click wrappers over `_watch` and `cascade_bus.demo`; the demo's defaults come from the
demo's own argument parser, so they are written down once.
"""

from __future__ import annotations

import asyncio

import click

from cascade_bus import demo as demo_module
from cascade_bus import validate_pattern

from . import _watch
from ._output import make_console
from ._runtime import parse_url

__all__ = ["demo", "watch"]

_DEMO = demo_module._parser().parse_args([])  # the demo's own defaults, kept in one place


# -- watch -------------------------------------------------------------------------------------


@click.command()
@click.argument("url")
@click.argument("pattern", default="cascade/#")
@click.option(
    "--once",
    is_flag=True,
    help="No live display: print the tables once at the end (right after the retained "
    "messages when neither --duration nor --count is given).",
)
@click.option(
    "-d",
    "--duration",
    type=click.FloatRange(min=0, min_open=True),
    metavar="SECONDS",
    help="Stop after this long.",
)
@click.option("-n", "--count", type=click.IntRange(min=1), help="Stop after N messages.")
@click.option("-q", "--quiet", is_flag=True, help="No 'watching' line on stderr.")
def watch(
    url: str,
    pattern: str,
    once: bool,
    duration: float | None,
    count: int | None,
    quiet: bool,
) -> int:
    """A live table of Cascade runs and tasks (default PATTERN: cascade/#).

    Telemetry on cascade/telemetry/<run>/<task>/<attempt>/events becomes one row per run
    (status, tasks by state, events, rate, pause) and one per task (latest attempt and
    state); retained pauses on cascade/constraints/<run> are shown with their reason, and
    engines announcing themselves on cascade/status/<id> as online or offline. Any
    other message goes to a log. On a pipe, or with --once, there is no live display: other
    messages are printed as they arrive and the tables at the end (also after Ctrl-C).

    \b
    cascade-bus watch mqtt://127.0.0.1
    cascade-bus watch mqtt://127.0.0.1 --once            # the retained state, now
    cascade-bus watch mqtt://127.0.0.1 --once --duration 10
    """  # noqa: D301 - click's \b marks a paragraph it must not rewrap
    validate_pattern(pattern)
    parsed = parse_url(url)
    console = make_console()
    return asyncio.run(
        _watch.watch(
            parsed,
            pattern,
            console=console,
            once=once,
            duration=duration,
            count=count,
            quiet=quiet,
        )
    )


# -- demo --------------------------------------------------------------------------------------


@click.command()
@click.option(
    "--url", default=_DEMO.url, show_default=True, help="Bus URL (any installed transport)."
)
@click.option(
    "--runs", type=click.IntRange(min=1), default=_DEMO.runs, show_default=True, help="Runs."
)
@click.option(
    "--tasks",
    type=click.IntRange(min=1),
    default=_DEMO.tasks,
    show_default=True,
    help="Tasks per run.",
)
@click.option(
    "--seconds",
    type=click.FloatRange(min=0, max=3600, min_open=True),
    default=_DEMO.seconds,
    show_default=True,
    help="About how long to run.",
)
@click.option(
    "--seed",
    type=int,
    default=_DEMO.seed,
    show_default=True,
    help="Seed for the simulated task failures.",
)
def demo(url: str, runs: int, tasks: int, seconds: float, seed: int) -> int:
    """A simulated Cascade workflow: telemetry, a retained pause and resume, a live watcher.

    An engine runs the workflow runs and publishes every task state change, a controller
    pauses one run with a retained constraint and releases it, and a watcher prints each
    event, then a summary with the bus counters. memory:// needs no broker.
    """
    parse_url(url)
    return asyncio.run(demo_module.run_demo(url, runs, tasks, seconds, seed))
