"""Sliding window of probe outcomes: success ratio over the last N rounds plus run lengths."""

from __future__ import annotations

from collections import deque


class ProbeWindow:
    """The last `size` outcomes of one probe; run lengths count beyond the window."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError("window size must be at least 1")
        self.size = size
        self._outcomes: deque[bool] = deque(maxlen=size)
        self._successes = 0
        self.consecutive_failures = 0
        self.consecutive_successes = 0
        self.total = 0

    def add(self, ok: bool) -> None:
        """Record one round's outcome."""
        if len(self._outcomes) == self.size and self._outcomes[0]:
            self._successes -= 1
        self._outcomes.append(ok)
        self.total += 1
        if ok:
            self._successes += 1
            self.consecutive_successes += 1
            self.consecutive_failures = 0
        else:
            self.consecutive_failures += 1
            self.consecutive_successes = 0

    @property
    def samples(self) -> int:
        """How many outcomes the window holds now (at most `size`)."""
        return len(self._outcomes)

    @property
    def ratio(self) -> float | None:
        """Fraction of successes in the window; None before the first outcome."""
        if not self._outcomes:
            return None
        return self._successes / len(self._outcomes)

    @property
    def last(self) -> bool | None:
        """The most recent outcome; None before the first."""
        return self._outcomes[-1] if self._outcomes else None

    def clear(self) -> None:
        """Forget every outcome, as after a profile switch where the old history means nothing."""
        self._outcomes.clear()
        self._successes = 0
        self.consecutive_failures = 0
        self.consecutive_successes = 0
