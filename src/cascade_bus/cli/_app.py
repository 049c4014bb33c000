"""The ``cascade-bus`` group: the commands, and failures turned into one line and a status.

The commands live in one module per group: messages (``pub``, ``sub``, ``request``), the
responder (``reply``), broker (``bench``, ``doctor``, ``transports``) and Cascade (``watch``,
``demo``).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import click

import cascade_bus

from ._cmd_broker import bench, doctor, transports
from ._cmd_cascade import demo, watch
from ._cmd_messages import pub, request, sub
from ._cmd_reply import reply
from ._output import PROG
from ._runtime import guarded

__all__ = ["cli"]


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


for _command in (pub, sub, request, reply, watch, bench, doctor, transports, demo):
    cli.add_command(_command)
