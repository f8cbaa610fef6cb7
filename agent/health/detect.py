"""Evidence-driven outage detection: a pure state machine, no clock and no I/O.

Every input carries `at` (monotonic seconds, chosen by the caller). The monitor asks
`plan_round(state, now)` what to do when `state.next_round` comes, runs the probes if told to,
and feeds every outcome and every piece of passive evidence through `observe(state, evidence)`.

Rules (docs/health.md has the arithmetic behind the defaults):

* One negative piece of evidence is a *strike*. The first strike puts the layer in
  confirmation: the next probe round comes `failure_interval` after it instead of `interval`
  (mwan3's failure_interval). `down_after` strikes in a row make the layer down.
* Positive evidence (a probe round with at least one answer, received bytes growing) ends a
  confirmation; while down, `up_after` positive rounds in a row bring the layer back.
* Kernel link state (carrier, address) is a *condition*: while it holds, a due round fails
  without sending anything, so a lost carrier is down after `(down_after - 1) * failure_interval`
  without any probe traffic.
* A modem-state reading (an ERROR to AT+CPIN?, searching, no context) is one strike, never an
  outage by itself: it is confirmed like a failed probe (issue 8).
* Traffic-aware: a regular round is skipped (counted as positive) when the interface received at
  least `traffic_min_bytes` since the previous round. Received bytes that stop while sent bytes
  grow by `stall_tx_bytes` for `stall_after` seconds are a strike.
"""

from __future__ import annotations

import math
from typing import Literal

import msgspec
from msgspec.structs import replace

SECONDS_PER_DAY = 86_400.0

EvidenceKind = Literal[
    "probe_ok",
    "probe_failed",
    "carrier_lost",
    "carrier_up",
    "address_lost",
    "address_added",
    "pdn_deactivated",
    "pdn_activated",
    "registration_lost",
    "registration_ok",
    "modem_bad",
    "modem_ok",
    "counters",
]

#: Evidence that starts (or continues) a confirmation and counts one strike.
NEGATIVE: frozenset[str] = frozenset(
    {"probe_failed", "pdn_deactivated", "registration_lost", "modem_bad"}
)
#: Kernel link state that holds until its opposite arrives; value: the condition's reason.
CONDITIONS: dict[str, str] = {"carrier_lost": "carrier_lost", "address_lost": "address_lost"}
CLEARS: dict[str, str] = {"carrier_up": "carrier_lost", "address_added": "address_lost"}
#: Evidence that only says the modem side is fine again; it does not prove the data path.
NEUTRAL: frozenset[str] = frozenset({"pdn_activated", "registration_ok", "modem_ok"})

RoundPlan = Literal["probe", "skip_traffic", "fail_condition"]


class Evidence(msgspec.Struct, frozen=True, kw_only=True):
    """One observation about a layer's data path.

    kind: see EvidenceKind. at: monotonic seconds. reason: a stable snake_case code reported when
    this evidence makes the layer down (defaults to the kind). rx_bytes/tx_bytes: the interface's
    counters, only for kind="counters".
    """

    kind: EvidenceKind
    at: float
    reason: str = ""
    rx_bytes: int | None = None
    tx_bytes: int | None = None


class DetectConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Timing and counting of detection; times in seconds."""

    interval: float = 5.0
    failure_interval: float = 0.5
    down_after: int = 3
    up_after: int = 3
    traffic_aware: bool = True
    #: Received bytes per interval that prove the link (above ARP/RA chatter from the modem).
    traffic_min_bytes: int = 1024
    stall_after: float = 2.0
    stall_tx_bytes: int = 2048

    def __post_init__(self) -> None:
        if not (self.interval > 0 and self.failure_interval > 0):
            raise ValueError("interval and failure_interval must be > 0")
        if self.down_after < 1 or self.up_after < 1:
            raise ValueError("down_after and up_after must be >= 1")


class DetectState(msgspec.Struct, frozen=True, kw_only=True):
    """Where detection stands; `down` with `reason` is the verdict."""

    next_round: float
    last_round: float | None = None
    strikes: int = 0
    successes: int = 0
    down: bool = False
    reason: str = ""
    conditions: frozenset[str] = frozenset()
    rx: int | None = None
    tx: int | None = None
    rx_grew_at: float | None = None
    #: When we first sent since received traffic last grew (None: nothing sent since).
    sending_since: float | None = None
    tx_at_rx: int | None = None
    stall_reported: bool = False

    @property
    def confirming(self) -> bool:
        """True while a failure (or, when down, a recovery) awaits confirmation."""
        return self.successes > 0 if self.down else self.strikes > 0


def initial(now: float) -> DetectState:
    """Nothing known; the first round is due at once."""
    return DetectState(next_round=now)


def _schedule(state: DetectState, cfg: DetectConfig, now: float) -> DetectState:
    if state.confirming:
        return replace(state, next_round=now + min(cfg.failure_interval, cfg.interval))
    # Regular rounds keep a fixed cadence from round start: a slow round eats into the pause.
    start = state.last_round if state.last_round is not None else now
    return replace(state, next_round=max(now, start + cfg.interval))


def _negative(state: DetectState, cfg: DetectConfig, at: float, reason: str) -> DetectState:
    strikes = state.strikes + 1
    down = state.down or strikes >= cfg.down_after
    new = replace(state, strikes=strikes, successes=0, down=down, reason=reason)
    if not state.confirming and not down:
        # First strike: confirm soon instead of waiting for the next regular round.
        new = replace(new, next_round=min(state.next_round, at + cfg.failure_interval))
    return new


def _positive(state: DetectState, cfg: DetectConfig, at: float) -> DetectState:
    if state.conditions:
        return state  # the kernel says the link is gone; a stray reply does not overrule it
    if state.down:
        successes = state.successes + 1
        if successes >= cfg.up_after:
            return replace(state, down=False, strikes=0, successes=0, reason="")
        new = replace(state, successes=successes, reason="recovering")
        if successes == 1:
            new = replace(new, next_round=min(state.next_round, at + cfg.failure_interval))
        return new
    return replace(state, strikes=0, successes=0, reason="")


def observe(state: DetectState, cfg: DetectConfig, ev: Evidence) -> DetectState:
    """Fold one piece of evidence into the state."""
    kind = ev.kind
    if kind == "probe_ok":
        return _schedule(_positive(state, cfg, ev.at), cfg, ev.at)
    if kind == "probe_failed":
        return _schedule(_negative(state, cfg, ev.at, ev.reason or kind), cfg, ev.at)
    if kind in NEGATIVE:
        return _negative(state, cfg, ev.at, ev.reason or kind)
    if kind in CONDITIONS:
        reason = CONDITIONS[kind]
        held = replace(state, conditions=state.conditions | {reason})
        return _negative(held, cfg, ev.at, ev.reason or reason)
    if kind in CLEARS:
        return replace(state, conditions=state.conditions - {CLEARS[kind]})
    if kind == "counters":
        return _counters(state, cfg, ev)
    return state  # NEUTRAL: the modem side is fine, which says nothing about the data path


def _counters(state: DetectState, cfg: DetectConfig, ev: Evidence) -> DetectState:
    rx, tx = ev.rx_bytes, ev.tx_bytes
    if rx is None or tx is None or rx < 0 or tx < 0:
        return state
    if state.rx is None or state.tx is None or rx < state.rx or tx < state.tx:
        # First reading, or the counters restarted (interface re-created): a new baseline.
        return replace(state, rx=rx, tx=tx, sending_since=None, tx_at_rx=tx, stall_reported=False)
    if rx - state.rx >= cfg.traffic_min_bytes:
        new = replace(
            state,
            rx=rx,
            tx=tx,
            rx_grew_at=ev.at,
            sending_since=None,
            tx_at_rx=tx,
            stall_reported=False,
        )
        return _positive(new, cfg, ev.at)
    # Small rx growth is not traffic: keep the old rx baseline so it can add up.
    since = state.sending_since
    if since is None and tx > state.tx:
        # Sending starts now (an idle hour before it is no stall: the answer may be on its way).
        since = ev.at
    new = replace(state, tx=tx, sending_since=since)
    sent = tx - (state.tx_at_rx if state.tx_at_rx is not None else tx)
    if (
        since is not None
        and not state.stall_reported
        and not state.confirming
        and not state.down
        and ev.at - since >= cfg.stall_after
        and sent >= cfg.stall_tx_bytes
    ):
        return _negative(replace(new, stall_reported=True), cfg, ev.at, "rx_stalled")
    return new


def plan_round(state: DetectState, cfg: DetectConfig, now: float) -> tuple[DetectState, RoundPlan]:
    """What to do with the round due now: probe, skip it (traffic seen), or fail it (condition)."""
    last = state.last_round
    state = replace(state, last_round=now)
    if state.conditions:
        reason = sorted(state.conditions)[0]
        failed = _negative(state, cfg, now, reason)
        return _schedule(failed, cfg, now), "fail_condition"
    if (
        cfg.traffic_aware
        and not state.confirming
        and not state.down
        and last is not None
        and state.rx_grew_at is not None
        and state.rx_grew_at > last
    ):
        # The network sent us traffic since the last round: the link is proven without a probe.
        return _schedule(state, cfg, now), "skip_traffic"
    return state, "probe"


def round_done(
    state: DetectState, cfg: DetectConfig, ok: bool, now: float, reason: str
) -> DetectState:
    """A probe round finished at `now`: at least one answer (ok) or none (reason says why)."""
    kind: EvidenceKind = "probe_ok" if ok else "probe_failed"
    return observe(state, cfg, Evidence(kind=kind, at=now, reason=reason))


def worst_case_detection(cfg: DetectConfig, timeout: float) -> float:
    """Seconds from a silent outage (no traffic, probes time out) to down, at worst.

    The outage starts just after a round passed: the next round is `interval` away and times out
    after `timeout`; each of the `down_after - 1` confirmations waits `failure_interval` and times
    out again.
    """
    gap = min(cfg.failure_interval, cfg.interval)
    return cfg.interval + timeout + (cfg.down_after - 1) * (gap + timeout)


def budget_interval(interval: float, bytes_per_round: int, budget_per_day: int) -> float:
    """The idle interval stretched so that probing costs at most `budget_per_day` bytes."""
    if budget_per_day <= 0 or bytes_per_round <= 0:
        return interval
    return max(interval, math.ceil(10 * bytes_per_round * SECONDS_PER_DAY / budget_per_day) / 10)
