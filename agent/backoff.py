"""Jittered, capped exponential backoff: the one retry schedule (MQTT, modem reconnects, task
restarts, data contexts)."""

from __future__ import annotations

import random
from collections.abc import Callable


def backoff_delay(
    attempt: int, initial: float, maximum: float, rand: Callable[[], float] = random.random
) -> float:
    """Seconds to wait before retry `attempt` (0-based): initial * 2**attempt capped at maximum,
    then jittered to [50 %, 100 %] of that step so that many clients do not retry in lockstep."""
    step = min(maximum, initial * (2.0 ** min(max(attempt, 0), 32)))
    return step * (0.5 + rand() / 2)


class Backoff:
    """A retry schedule with its attempt counter: `next()` for each wait, `reset()` on success."""

    def __init__(
        self, initial: float, maximum: float, rand: Callable[[], float] = random.random
    ) -> None:
        if initial <= 0 or maximum < initial:
            raise ValueError(f"backoff needs 0 < initial <= maximum, got {initial}, {maximum}")
        self.initial = initial
        self.maximum = maximum
        self.attempt = 0
        self._rand = rand

    def next(self) -> float:
        """The delay before the next retry; each call doubles the step until the cap."""
        delay = backoff_delay(self.attempt, self.initial, self.maximum, self._rand)
        self.attempt += 1
        return delay

    def reset(self) -> None:
        """Start again from `initial` (after a success, or a run long enough to count as one)."""
        self.attempt = 0
