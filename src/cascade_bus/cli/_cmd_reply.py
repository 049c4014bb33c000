"""The ``reply`` command: a responder, the other half of ``request``.

It answers every request on a topic with a fixed JSON payload, or with what a command prints
when given the request's payload on stdin (``--exec``).
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

import click
import msgspec

from cascade_bus import Envelope, validate_pattern

from ._output import FAILED, CliError, echo_error, parse_json, render_payload
from ._runtime import open_bus, parse_url

__all__ = ["reply"]


def _reply_from_output(output: bytes) -> Any:
    """What ``--exec`` printed, as the reply: JSON when it parses, else its text."""
    text = output.decode(errors="replace").strip()
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


async def _run_exec(command: str, env: Envelope[Any], timeout: float) -> Any:
    """Run ``command`` (a shell command line) with the request's payload as JSON on stdin.

    The request's topic is in ``$CASCADE_BUS_TOPIC``.

    Raises:
        CliError: the command failed, or ran longer than ``timeout`` seconds.
    """
    payload = env.payload
    stdin = payload if isinstance(payload, bytes) else msgspec.json.encode(payload)
    proc = await asyncio.create_subprocess_shell(
        command,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=None,  # the command's own complaints go straight to our stderr
        env={**os.environ, "CASCADE_BUS_TOPIC": env.topic},
    )
    try:
        async with asyncio.timeout(timeout):
            out, _ = await proc.communicate(stdin)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise CliError(f"--exec command ran longer than {timeout:g}s", FAILED) from None
    if proc.returncode:
        raise CliError(f"--exec command exited with status {proc.returncode}", FAILED)
    return _reply_from_output(out)


@click.command()
@click.argument("url")
@click.argument("topic")
@click.argument("payload", required=False)
@click.option(
    "--exec",
    "command",
    metavar="CMD",
    help="Reply with what CMD prints (JSON, else text); it reads the request's JSON on stdin.",
)
@click.option("-n", "--count", type=click.IntRange(min=1), help="Exit after N replies.")
@click.option(
    "-t",
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    metavar="SECONDS",
    help="Stop after this long (with --count: fail if fewer requests came).",
)
@click.option(
    "--exec-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=30.0,
    show_default=True,
    metavar="SECONDS",
    help="How long --exec CMD may run for one request.",
)
@click.option("--queue", metavar="NAME", help="Share the requests with other responders.")
@click.option("-q", "--quiet", is_flag=True, help="No 'replying' line on stderr.")
def reply(
    url: str,
    topic: str,
    payload: str | None,
    command: str | None,
    count: int | None,
    timeout: float | None,
    exec_timeout: float,
    queue: str | None,
    quiet: bool,
) -> int:
    """Answer requests on TOPIC (a pattern) with PAYLOAD (JSON) or with --exec CMD's output.

    The responder for `cascade-bus request`: each request is printed as `topic payload` and
    answered on its reply_to. Runs until Ctrl-C, --count or --timeout. A request without a
    reply_to, or one --exec CMD failed on, gets no reply (a warning on stderr).

    \b
    cascade-bus reply mqtt://127.0.0.1 calc/add '{"sum": 5}'
    cascade-bus reply mqtt://127.0.0.1 calc/add --exec "jq '{sum: (.a + .b)}'"
    """  # noqa: D301 - click's \b marks a paragraph it must not rewrap
    validate_pattern(topic)
    if (payload is None) == (command is None):
        raise click.UsageError("give either PAYLOAD or --exec CMD")
    fixed = None if payload is None else parse_json(payload, "PAYLOAD")
    parsed = parse_url(url)

    async def serve() -> int:
        replied = 0
        loop = asyncio.get_running_loop()
        async with open_bus(parsed) as bus, bus.subscribe(topic, queue=queue) as requests:
            deadline = None if timeout is None else loop.time() + timeout
            if not quiet:
                echo_error(f"replying to {topic!r} on {parsed.redacted()}; Ctrl-C to stop")
            while count is None or replied < count:
                left = None if deadline is None else deadline - loop.time()
                if left is not None and left <= 0:
                    break
                try:
                    env = await requests.get(timeout=left)
                except TimeoutError:
                    break
                click.echo(f"{env.topic} {render_payload(env.payload)}")
                if not env.reply_to:
                    echo_error(f"{env.topic}: not a request (no reply_to); not answered")
                    continue
                try:
                    answer = (
                        fixed if command is None else await _run_exec(command, env, exec_timeout)
                    )
                except CliError as exc:
                    echo_error(f"{env.topic}: {exc.message}; not answered")
                    continue
                await bus.reply(env, answer)
                replied += 1
            await bus.flush(timeout=5.0)
        if count is not None and replied < count:
            within = f" within {timeout:g}s" if timeout is not None else ""
            raise CliError(f"answered {replied} of {count} request(s){within}", FAILED)
        return 0

    return asyncio.run(serve())
