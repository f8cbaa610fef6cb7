"""The agent's one retry delay: capped exponential backoff with jitter (MQTT, data contexts)."""

from __future__ import annotations

import random
from collections.abc import Callable


def backoff_delay(
    attempt: int, initial: float, maximum: float, rand: Callable[[], float] = random.random
) -> float:
    """Capped exponential backoff with jitter in [50 %, 100 %] of the step, for attempt >= 0."""
    step = min(maximum, initial * (2.0 ** min(attempt, 32)))
    return step * (0.5 + rand() / 2)
