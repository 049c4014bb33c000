"""The ``cascade-bus`` commands (click) and the group that turns failures into one line."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Sequence
from typing import Any

import click

import cascade_bus
from cascade_bus import demo as demo_module
from cascade_bus import validate_pattern, validate_topic

from . import _bench, _doctor, _watch
from ._output import (
    FAILED,
    PROG,
    CliError,
    echo_error,
    envelope_record,
    fail,
    json_line,
    make_console,
    parse_headers,
    parse_json,
    print_full,
    render_payload,
)
from ._runtime import guarded, open_bus, parse_url
from ._transports import installed_transports, missing_packages

__all__ = ["cli"]

_DEMO = demo_module._parser().parse_args([])  # the demo's own defaults, kept in one place


class CascadeGroup(click.Group):
    """A click group whose errors are one line on stderr and an exit status, never a traceback.

    Exit statuses: 0 ok, 1 failed (unreachable broker, timeout, ...), 2 bad input (usage, URL,
    scheme, JSON, topic), 130 interrupted (Ctrl-C).
    """

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        """Run the command line; with ``standalone_mode`` exit, else return the status."""
        argv = list(sys.argv[1:] if args is None else args)
        command = next((a for a in argv if a in self.commands), None)
        where = f"{PROG} {command}" if command else PROG
        run = super().main
        status = guarded(
            lambda: run(argv, prog_name or PROG, complete_var, standalone_mode=False, **extra),
            where,
        )
        if standalone_mode:
            sys.exit(status)
        return status


@click.group(
    cls=CascadeGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(cascade_bus.__version__, "-V", "--version", prog_name=PROG)
def cli() -> None:
    """Publish, subscribe, watch Cascade telemetry and diagnose brokers, over any bus URL.

    URL is a bus URL: memory://[name] (in-process; only useful within one command, e.g. demo
    or bench), mqtt://[user:password@]host[:port], nats://..., redis://... once the adapter is
    installed (see `cascade-bus transports`). Bus options go in the query, e.g.
    mqtt://host?format=raw.

    \b
    Exit status: 0 ok, 1 failed (unreachable broker, timeout, lost messages),
    2 bad input (usage, URL, scheme, JSON, topic), 130 interrupted (Ctrl-C).
    """  # noqa: D301 - click's \b marks a paragraph it must not rewrap


# -- pub ---------------------------------------------------------------------------------------


def _read_stdin() -> bytes:
    return sys.stdin.buffer.read()


def _payload(text: str | None, raw: bool) -> Any:
    """The payload to publish: parsed JSON, bytes with ``--raw``, ``b""`` when omitted."""
    if text is None:
        return b""
    if text == "-":
        data = _read_stdin()
        if raw:
            return data
        try:
            decoded = data.decode()
        except UnicodeDecodeError as exc:
            fail(f"stdin is not UTF-8 text ({exc.reason} at byte {exc.start}); use --raw")
        return parse_json(decoded, "stdin")
    if raw:
        return text.encode()
    return parse_json(text, "PAYLOAD")


@cli.command()
@click.argument("url")
@click.argument("topic")
@click.argument("payload", required=False)
@click.option("--retain", is_flag=True, help="Keep it as the topic's last value.")
@click.option("--qos", type=click.IntRange(0, 2), default=0, show_default=True, help="QoS.")
@click.option(
    "-H",
    "--header",
    "headers",
    multiple=True,
    metavar="KEY=VALUE",
    help="A header (repeatable).",
)
@click.option("--type", "event_type", metavar="TYPE", help="The CloudEvents type.")
@click.option(
    "-n",
    "--count",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Publish the message N times.",
)
@click.option(
    "--rate",
    type=click.FloatRange(min=0, min_open=True),
    metavar="R",
    help="At most R messages per second (default: as fast as possible).",
)
@click.option(
    "--raw",
    is_flag=True,
    help="Send PAYLOAD (or stdin) as-is, as bytes: no JSON parsing, no envelope.",
)
@click.option("-q", "--quiet", is_flag=True, help="Print nothing on success.")
def pub(
    url: str,
    topic: str,
    payload: str | None,
    retain: bool,
    qos: int,
    headers: tuple[str, ...],
    event_type: str | None,
    count: int,
    rate: float | None,
    raw: bool,
    quiet: bool,
) -> int:
    """Publish PAYLOAD (JSON; - reads stdin) to TOPIC.

    Without PAYLOAD an empty message is sent: with --retain that clears the topic's retained
    message. With --raw the bytes go on the wire as they are (the bus's format=raw).

    \b
    cascade-bus pub mqtt://127.0.0.1 sensors/kitchen/temperature '{"celsius": 21.5}'
    echo '{"paused": true}' | cascade-bus pub mqtt://127.0.0.1 cascade/constraints/run-1 - --retain
    """  # noqa: D301 - click's \b marks a paragraph it must not rewrap
    validate_topic(topic)
    header_map = parse_headers(headers)
    body = _payload(payload, raw)
    parsed = parse_url(url)
    options: dict[str, Any] = {"format": "raw"} if raw else {}

    async def publish() -> None:
        async with open_bus(parsed, **options) as bus:
            start = time.monotonic()
            for number in range(count):
                if rate is not None and number:
                    delay = start + number / rate - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                await bus.publish(
                    topic,
                    body,
                    qos=qos,
                    retain=retain,
                    headers=header_map or None,
                    type=event_type,
                )

    started = time.monotonic()
    asyncio.run(publish())
    if not quiet:
        took = time.monotonic() - started
        what = "1 message" if count == 1 else f"{count} messages"
        echo_error(f"published {what} to {topic!r} on {parsed.redacted()} in {took:.2f}s")
    return 0


# -- sub ---------------------------------------------------------------------------------------


@cli.command()
@click.argument("url")
@click.argument("pattern")
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="One JSON object per message, with the envelope's fields.",
)
@click.option("-n", "--count", type=click.IntRange(min=1), help="Exit after N messages.")
@click.option(
    "-t",
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    metavar="SECONDS",
    help="Stop after this long (with --count: fail if fewer arrived).",
)
@click.option("--qos", type=click.IntRange(0, 2), default=0, show_default=True, help="QoS.")
@click.option("--queue", metavar="NAME", help="Share the messages with a queue group.")
@click.option("-q", "--quiet", is_flag=True, help="No 'subscribed' line on stderr.")
def sub(
    url: str,
    pattern: str,
    as_json: bool,
    count: int | None,
    timeout: float | None,
    qos: int,
    queue: str | None,
    quiet: bool,
) -> int:
    """Print the messages matching PATTERN, one line each: `topic payload`.

    Retained messages come first. Runs until Ctrl-C, --count or --timeout.

    \b
    cascade-bus sub mqtt://127.0.0.1 'sensors/+/temperature'
    cascade-bus sub mqtt://127.0.0.1 'cascade/#' --json --count 10 --timeout 5
    """  # noqa: D301 - click's \b marks a paragraph it must not rewrap
    validate_pattern(pattern)
    parsed = parse_url(url)

    async def subscribe() -> int:
        received = 0
        loop = asyncio.get_running_loop()
        async with (
            open_bus(parsed) as bus,
            bus.subscribe(pattern, qos=qos, queue=queue) as subscription,
        ):
            deadline = None if timeout is None else loop.time() + timeout
            if not quiet:
                echo_error(f"subscribed to {pattern!r} on {parsed.redacted()}; Ctrl-C to stop")
            while count is None or received < count:
                left = None if deadline is None else deadline - loop.time()
                if left is not None and left <= 0:
                    break
                try:
                    env = await subscription.get(timeout=left)
                except TimeoutError:
                    break
                text = json_line(envelope_record(env)) if as_json else None
                click.echo(text or f"{env.topic} {render_payload(env.payload)}")
                received += 1
        if count is not None and received < count:  # only a --timeout ends the loop early
            within = f" within {timeout:g}s" if timeout is not None else ""
            raise CliError(
                f"received {received} of {count} message(s) on {pattern!r}{within}", FAILED
            )
        return 0

    return asyncio.run(subscribe())


# -- request -----------------------------------------------------------------------------------


@cli.command()
@click.argument("url")
@click.argument("topic")
@click.argument("payload")
@click.option(
    "-t",
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=5.0,
    show_default=True,
    metavar="SECONDS",
    help="How long to wait for the reply.",
)
@click.option("-H", "--header", "headers", multiple=True, metavar="KEY=VALUE", help="A header.")
@click.option("--json", "as_json", is_flag=True, help="Print the whole reply envelope as JSON.")
def request(
    url: str, topic: str, payload: str, timeout: float, headers: tuple[str, ...], as_json: bool
) -> int:
    """Send a request with PAYLOAD (JSON; - reads stdin) to TOPIC and print the reply.

    A responder answers by publishing to the request's reply_to (Bus.reply). Exits 1 when no
    reply arrives within --timeout.

    \b
    cascade-bus request mqtt://127.0.0.1 calc/add '{"a": 2, "b": 3}'
    """  # noqa: D301 - click's \b marks a paragraph it must not rewrap
    validate_topic(topic)
    header_map = parse_headers(headers)
    body = _payload(payload, raw=False)
    parsed = parse_url(url)

    async def ask() -> None:
        async with open_bus(parsed) as bus:
            reply = await bus.request(topic, body, timeout=timeout, headers=header_map or None)
        click.echo(json_line(envelope_record(reply)) if as_json else render_payload(reply.payload))

    asyncio.run(ask())
    return 0


# -- watch -------------------------------------------------------------------------------------


@cli.command()
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
    state); retained pauses on cascade/constraints/<run> are shown with their reason. Any
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


# -- bench -------------------------------------------------------------------------------------


@cli.command()
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


@cli.command()
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


@cli.command()
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
        console.print(f"not installed: {listed} (pip install {package})")
    return 0


# -- demo --------------------------------------------------------------------------------------


@cli.command()
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
