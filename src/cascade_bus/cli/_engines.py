"""The engines part of ``cascade-bus watch``: who is online, from ``cascade/status/<id>``.

Every Cascade engine (a `Connector`, or a bus with ``presence``) keeps a retained
``{"status": "online"}`` on ``cascade/status/<host>-<pid>`` while it runs and
``{"status": "offline"}`` once it closed or crashed (see docs/presence.md); `Engines` folds
those into one row per engine. An empty retained body (the status cleared) removes the row.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rich.console import RenderableType
from rich.table import Table
from rich.text import Text

__all__ = ["Engines"]

STATUS_STYLE = {"online": "green", "offline": "red"}


@dataclass
class EngineRow:
    """The latest known status of one engine."""

    engine: str
    status: str
    since: float
    changes: int = 1
    retained: bool = False


def _status(payload: Any) -> str | None:
    """``online``/``offline`` (or another word the engine chose) from a status body."""
    if not isinstance(payload, dict):
        return None
    if "status" in payload:
        return str(payload["status"])
    if "online" in payload:  # the MQTT transport's own presence_topic body
        return "online" if payload["online"] else "offline"
    return None


class Engines:
    """Engines seen on ``cascade/status/<id>``, with their status and since when.

    Args:
        clock: Monotonic time source (tests may replace it).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.rows: dict[str, EngineRow] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, levels: list[str], payload: Any, retained: bool = False) -> bool:
        """Fold one message; True when it was an engine status (so not a log line)."""
        if len(levels) != 3 or levels[:2] != ["cascade", "status"]:
            return False
        engine = levels[2]
        if payload in (b"", None, "", {}):  # cleared: the engine is forgotten
            self.rows.pop(engine, None)
            return True
        status = _status(payload)
        if status is None:
            return False
        row = self.rows.get(engine)
        if row is None:
            self.rows[engine] = EngineRow(engine, status, self.clock(), retained=retained)
        elif row.status != status:
            row.status, row.since, row.retained = status, self.clock(), retained
            row.changes += 1
        return True

    def online(self) -> int:
        """How many engines are online now."""
        return sum(1 for row in self.rows.values() if row.status == "online")

    def table(self) -> Table:
        """One row per engine: status, for how long (as seen by this watch), changes seen."""
        now = self.clock()
        table = Table(
            title=f"Engines ({self.online()} online of {len(self.rows)})",
            title_justify="left",
            expand=False,
        )
        table.add_column("engine", no_wrap=True)
        table.add_column("status", no_wrap=True)
        table.add_column("since", justify="right")
        table.add_column("changes", justify="right")
        for name in sorted(self.rows):
            row = self.rows[name]
            since = "before this watch" if row.retained else f"{now - row.since:.1f}s ago"
            table.add_row(
                name,
                Text(row.status, STATUS_STYLE.get(row.status, "")),
                since,
                str(row.changes),
            )
        return table

    def parts(self) -> list[RenderableType]:
        """The engines table, or nothing when no engine was seen."""
        return [self.table()] if self.rows else []
