"""Adapter kit: the background tasks one transport owns, named, tracked and stopped together.

No fire-and-forget tasks: every task a transport starts is in its `TaskSet`, named
``cascade_bus.<owner>.<what>`` (visible in ``asyncio.all_tasks()`` and debuggers), an unexpected
failure is logged once, and ``aclose`` cancels and awaits them all, bounded.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["TaskSet"]

log = logging.getLogger("cascade_bus")
_T = TypeVar("_T")


class TaskSet:
    """The tasks of one owner (a transport): ``spawn`` them, ``aclose`` stops them all.

    Args:
        owner: A short name for the owner (``mqtt``, ``redis``, ...), used in task names.
    """

    __slots__ = ("_tasks", "owner")

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self._tasks: set[asyncio.Task[Any]] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    def spawn(self, coro: Coroutine[Any, Any, _T], name: str) -> asyncio.Task[_T]:
        """Start ``coro`` as a task named ``cascade_bus.<owner>.<name>`` and track it."""
        task = asyncio.get_running_loop().create_task(coro, name=f"cascade_bus.{self.owner}.{name}")
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s failed", task.get_name(), exc_info=task.exception())

    async def aclose(self, timeout: float = 5.0) -> None:
        """Cancel every task and wait (at most ``timeout`` seconds) until they ended.

        Safe to call from one of the tasks itself (it is not cancelled or awaited then).
        """
        current = asyncio.current_task()
        tasks = [task for task in self._tasks if task is not current]
        for task in tasks:
            task.cancel()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout)
            for task in pending:
                log.warning("%s did not stop within %.1fs", task.get_name(), timeout)
