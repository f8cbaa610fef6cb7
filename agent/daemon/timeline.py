"""Transition records for people and tools: wall-clock times and per-phase durations."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from agent.policy.engine import TransitionEvent


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
