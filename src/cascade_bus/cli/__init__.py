"""The ``cascade-bus`` command line: publish, subscribe, watch Cascade telemetry, diagnose.

It needs the ``cli`` extra (click and rich): ``pip install 'cascade-bus[cli]'``. The library
itself depends on msgspec only, so this package imports click and rich lazily, in `main`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from cascade_bus._install import install_command

__all__ = ["EXTRA_HINT", "main"]

#: The one line printed when click or rich is missing (the command that works here).
EXTRA_HINT = f"the cascade-bus command needs its extra: {install_command('cascade-bus[cli]')}"

_EXTRA_MODULES = ("click", "rich")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return its exit status (the console script's entry point).

    Args:
        argv: Arguments without the program name (default: ``sys.argv[1:]``).

    Returns:
        0 on success, 1 when something failed, 2 for bad input, 130 when interrupted.
    """
    try:
        from ._app import cli
    except ImportError as exc:
        missing = (exc.name or "").split(".")[0]
        if missing not in _EXTRA_MODULES:
            raise
        print(EXTRA_HINT, file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C while importing: as quiet as later on
        print(file=sys.stderr)
        return 130
    status: int = cli.main(
        args=list(argv) if argv is not None else None,
        prog_name="cascade-bus",
        standalone_mode=False,
    )
    return status
