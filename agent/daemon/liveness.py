"""What the systemd watchdog is told: the daemon makes progress, not only that its loop turns."""

from __future__ import annotations

from collections.abc import Iterable

#: The policy loop handles a tick every TICK_S; this long without one means it is stuck.
POLICY_STALL_S = 30.0
#: Beyond a modem's own poll interval (or a switch's timeout) before its loop counts as stuck:
#: room for a reconnect backoff (30 s at most) and a slow AT exchange.
SESSION_STALL_MARGIN_S = 90.0
#: A profile download holds the modem's lock (its polls wait) while a bound profile package
#: loads: over AT that can take minutes (agent/euicc/download.py, BPP_SEGMENT_TIMEOUT_S).
DOWNLOAD_STALL_S = 1200.0


def session_bound(
    poll_interval: float, switching: bool, switch_timeout: float, downloading: bool = False
) -> float:
    """How long a modem's run loop may go without a tick."""
    base = max(poll_interval, switch_timeout if switching else 0.0)
    if downloading:
        base = max(base, DOWNLOAD_STALL_S)
    return base + SESSION_STALL_MARGIN_S


def stalled(
    now: float,
    policy_beat: float | None,
    sessions: Iterable[tuple[str, float, float]],
) -> str | None:
    """Which part stopped making progress, or None.

    policy_beat: when the policy loop last handled an event (None before it started);
    sessions: (modem id, last tick, allowed gap) per modem.
    """
    if policy_beat is not None and now - policy_beat > POLICY_STALL_S:
        return f"policy loop idle for {now - policy_beat:.0f} s"
    for modem, last_tick, bound in sessions:
        if now - last_tick > bound:
            return f"modem {modem} loop idle for {now - last_tick:.0f} s"
    return None
