"""Transition records for people and tools: wall-clock times and per-phase durations."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import structlog

from agent.policy.engine import TransitionEvent

log = structlog.get_logger(__name__)


def wall(monotonic_s: float | None) -> str | None:
    """A monotonic timestamp as ISO 8601 UTC wall-clock time."""
    if monotonic_s is None:
        return None
    at = time.time() - (time.monotonic() - monotonic_s)
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _ms(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round((b - a) * 1000.0, 1)


def describe(ev: TransitionEvent) -> dict[str, Any]:
    """The JSON form of a transition used in MQTT events, `status` and the demo's timeline."""
    return {
        "id": ev.id,
        "kind": ev.kind,
        "outcome": ev.outcome,
        "from_layer": ev.from_layer,
        "to_layer": ev.to_layer,
        "from_profile": ev.from_profile,
        "to_profile": ev.to_profile,
        "reason": ev.reason,
        "detected_at": wall(ev.detected_at),
        "decided_at": wall(ev.decided_at),
        "switched_at": wall(ev.switched_at),
        "verified_at": wall(ev.verified_at),
        "timings_ms": {
            "detect_to_decide": _ms(ev.detected_at, ev.decided_at),
            "decide_to_switch": _ms(ev.decided_at, ev.switched_at),
            "switch_to_verify": _ms(ev.switched_at, ev.verified_at),
            "total": _ms(ev.detected_at, ev.verified_at),
        },
    }


class Timeline:
    """The last transitions, for `status`; each finished one is also published and handed to
    the hooks (in order), and answers whoever waits for it (a manual switch, a drill)."""

    def __init__(
        self,
        publish: Callable[[str, dict[str, Any]], None],
        hooks: Callable[[dict[str, Any]], None],
        keep: int = 200,
    ) -> None:
        self._publish = publish
        self._hooks = hooks
        self.records: deque[dict[str, Any]] = deque(maxlen=keep)
        self._waiters: dict[str, asyncio.Future[dict[str, Any]]] = {}

    def record(self, event: TransitionEvent) -> None:
        """Log and publish one transition record (started or finished)."""
        record = describe(event)
        log.info("transition", **record)
        if event.outcome == "pending":
            self._publish("transition_started", record)
            return
        self.records.append(record)
        waiter = self._waiters.pop(event.id, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(record)
        self._publish("transition", record)
        self._hooks(record)

    def recent(self, n: int = 20) -> list[dict[str, Any]]:
        """The last n records, oldest first."""
        return list(self.records)[-n:]

    async def wait_for(self, transition_id: str, timeout: float) -> dict[str, Any]:
        """The finished record of a transition that started (TimeoutError after timeout)."""
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiters[transition_id] = fut
        try:
            async with asyncio.timeout(timeout):
                return await fut
        finally:
            self._waiters.pop(transition_id, None)
