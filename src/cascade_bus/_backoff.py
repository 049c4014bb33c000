"""Jittered exponential backoff for reconnect loops (shared by every adapter)."""

from __future__ import annotations

import random
from collections.abc import Iterator

__all__ = ["backoff_delays"]


def backoff_delays(
    initial: float = 0.1, maximum: float = 10.0, factor: float = 2.0, jitter: float = 0.5
) -> Iterator[float]:
    """Yield reconnect delays: ``initial``, growing by ``factor`` up to ``maximum``, jittered.

    Each delay is drawn uniformly from ``[d * (1 - jitter), d]`` ("equal jitter"), so a fleet of
    clients that lost the same broker does not reconnect in lock-step.

    Args:
        initial: The first delay in seconds.
        maximum: The largest delay in seconds.
        factor: How much each delay grows over the previous one.
        jitter: The fraction (0..1) of each delay that is randomised away.
    """
    delay = max(initial, 0.0)
    while True:
        yield delay * (1.0 - jitter * random.random())
        delay = min(maximum, delay * factor if delay else initial)
