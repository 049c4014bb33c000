"""The commands that move messages: ``pub``, ``sub`` and ``request``.

Each opens one bus for the command, validates topics and JSON before connecting, and reports
on stderr so that stdout carries only the messages.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

import click

from cascade_bus import validate_pattern, validate_topic

from ._output import (
    FAILED,
    RETAINED_MARK,
    CliError,
    echo_error,
    envelope_record,
    fail,
    json_line,
    parse_headers,
    parse_json,
    render_payload,
)
from ._runtime import open_bus, parse_url

__all__ = ["pub", "request", "sub"]


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


@click.command()
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


@click.command()
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

    Retained messages come first, marked `topic [retained] payload` (--json: "retained": true);
    text is printed as text, binary as hex. Runs until Ctrl-C, --count or --timeout.

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
                mark = RETAINED_MARK if env.retained else " "
                click.echo(text or f"{env.topic}{mark}{render_payload(env.payload)}")
                received += 1
        if count is not None and received < count:  # only a --timeout ends the loop early
            within = f" within {timeout:g}s" if timeout is not None else ""
            raise CliError(
                f"received {received} of {count} message(s) on {pattern!r}{within}", FAILED
            )
        return 0

    return asyncio.run(subscribe())


# -- request -----------------------------------------------------------------------------------


@click.command()
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
