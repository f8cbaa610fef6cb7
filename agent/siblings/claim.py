"""The group emergency claim protocol: a pure machine, `step(state, event) -> (state, actions)`.

One instance runs on every device that holds the group's emergency layer. No I/O, no clock:
events carry `now` (monotonic seconds of this device). docs/siblings.md explains the model:

- need: this device is connected to the broker with a fresh view (Synced since the last
  connect), and neither its own higher layers nor any other listed device carries traffic
  (each is offline, or online without connectivity, or is itself a live claimant);
- turn: holders in wake order (priority, then device id), skipping offline ones and those that
  already failed in this episode; a holder whose turn it is and who does not claim within
  `switch_timeout` is skipped;
- claim: the holder whose turn it is publishes a retained claim and wakes only when the
  broker's echo of it arrives before anyone else's live claim (one broker orders all claims,
  so every device sees the same first claim); a claim is live for `ttl` after it was last
  received and is refreshed every ttl/3;
- a claimant without connectivity `switch_timeout` after waking gives up; an awake device
  sleeps when a higher layer has carried traffic for `failback_stable`, and at once when it
  loses the broker (it cannot refresh, and the others will move on after the ttl).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import TYPE_CHECKING

import msgspec
from msgspec.structs import replace

if TYPE_CHECKING:
    from agent.config import Config


class ClaimPhase(enum.StrEnum):
    """Where this holder is: asleep, claim published and awaiting its echo, or awake."""

    ASLEEP = "asleep"
    CLAIMING = "claiming"
    AWAKE = "awake"


class ClaimConfig(msgspec.Struct, frozen=True, kw_only=True):
    """The protocol's settings; `order` lists every holder in wake order (this one included)."""

    device: str
    group: str
    order: tuple[str, ...]
    #: Every other device of the group (holders included): all must be down for a wake.
    others: tuple[str, ...]
    ttl: float = 60.0
    switch_timeout: float = 180.0
    failback_stable: float = 120.0
    #: An online device that reports no connectivity still counts as carrying traffic for
    #: this long (`companion_grace`): a device in the middle of its own failover is not down.
    grace: float = 0.0

    @classmethod
    def from_config(cls, cfg: Config) -> ClaimConfig | None:
        """The protocol's settings for this device, or None when it holds no group emergency."""
        g = cfg.group
        if g is None or not any(layer.scope == "group" for layer in cfg.layers):
            return None
        return cls(
            device=cfg.device_id,
            group=g.name,
            order=tuple(g.wake_order(g.emergency_devices)),
            others=tuple(d for d in g.devices if d != cfg.device_id),
            ttl=g.claim_ttl,
            switch_timeout=cfg.timers.switch_timeout,
            failback_stable=cfg.timers.failback_stable,
            grace=cfg.timers.companion_grace,
        )


# --- events ---------------------------------------------------------------------------------


class BrokerUp(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """The MQTT session is up and subscribed; the view is not fresh until Synced."""

    now: float


class Synced(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """Every retained sibling message published before the subscription has arrived."""

    now: float


class BrokerDown(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """The MQTT session is lost: the view is stale from now on."""

    now: float


class SiblingSeen(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """A sibling's availability or state; None keeps the previous value."""

    device: str
    now: float
    online: bool | None = None
    connectivity: bool | None = None


class ClaimSeen(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """A claim (ours included) from the broker; ttl None means released."""

    device: str
    now: float
    ttl: float | None
    seq: int = 0


class LocalState(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """This device's own policy: whether a non-emergency layer of ours carries traffic, and
    whether we are connected at all (over the emergency layer, once awake)."""

    now: float
    higher_up: bool
    connected: bool


class ClaimTick(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """Time passes: claim expiry, turn and switch timeouts, refresh, failback."""

    now: float


ClaimEvent = BrokerUp | Synced | BrokerDown | SiblingSeen | ClaimSeen | LocalState | ClaimTick


# --- actions --------------------------------------------------------------------------------


class PublishClaim(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """Publish our claim, retained, with MQTT message expiry `ttl` (also a refresh)."""

    seq: int
    ttl: float


class ReleaseClaim(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """Clear our retained claim (an empty retained payload)."""


class Wake(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """Let the group emergency wake: feed `GroupWake(awake=True)` to the policy engine."""

    reason: str


class Sleep(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """Take the wake back: feed `GroupWake(awake=False)` to the policy engine."""

    reason: str


ClaimAction = PublishClaim | ReleaseClaim | Wake | Sleep


# --- state ----------------------------------------------------------------------------------


class Peer(msgspec.Struct, frozen=True, kw_only=True):
    """What we know of another device; None is "never heard"."""

    online: bool | None = None
    connectivity: bool | None = None
    #: Since when it has been without reported connectivity (None while it has some).
    quiet_since: float | None = None


class LiveClaim(msgspec.Struct, frozen=True, kw_only=True):
    """Another device's claim as we received it."""

    seq: int
    ttl: float
    first_seen: float
    received_at: float
    #: Whether the claimant reported connectivity since it claimed.
    proved: bool = False


class ClaimState(msgspec.Struct, frozen=True, kw_only=True):
    """The whole machine state; build the first one with `initial_claim_state`."""

    config: ClaimConfig
    now: float
    phase: ClaimPhase = ClaimPhase.ASLEEP
    connected: bool = False
    synced: bool = False
    peers: Mapping[str, Peer] = msgspec.field(default_factory=dict)
    claims: Mapping[str, LiveClaim] = msgspec.field(default_factory=dict)
    local_higher: bool = False
    local_connected: bool = False
    seq: int = 0
    claimed_at: float | None = None
    refreshed_at: float | None = None
    #: When we published a refresh whose echo has not come back yet (None: all echoed).
    unechoed_since: float | None = None
    higher_up_since: float | None = None
    turn_since: float | None = None
    failed: frozenset[str] = frozenset()

    @property
    def awake(self) -> bool:
        """Whether this device has the group emergency awake."""
        return self.phase is ClaimPhase.AWAKE


def initial_claim_state(config: ClaimConfig, now: float, seq: int = 0) -> ClaimState:
    """A fresh machine. `seq` should grow across restarts (e.g. wall-clock milliseconds), so an
    echo of a claim from an earlier life is never taken for the current one."""
    if config.device not in config.order:
        raise ValueError("this device must be one of the holders in order")
    return ClaimState(config=config, now=now, seq=seq)


# --- the transition function ----------------------------------------------------------------

ClaimResult = tuple[ClaimState, list[ClaimAction]]


def step(state: ClaimState, event: ClaimEvent) -> ClaimResult:
    """Apply one event; returns the new state and what the adapter must do."""
    now = max(state.now, event.now)
    state = replace(state, now=now)
    me = state.config.device
    pre: list[ClaimAction] = []
    if isinstance(event, BrokerUp):
        state = replace(state, connected=True, synced=False)
    elif isinstance(event, Synced):
        state = replace(state, synced=state.connected)
    elif isinstance(event, BrokerDown):
        # Whatever we knew may be stale now; forget claims so nothing is decided on them.
        state, pre = _stop(state, "lost the broker", failed=False)
        state = replace(state, connected=False, synced=False, claims={})
    elif isinstance(event, SiblingSeen):
        if event.device != me and event.device in state.config.others:
            old = state.peers.get(event.device, Peer())
            conn = event.connectivity if event.connectivity is not None else old.connectivity
            quiet = old.quiet_since
            if conn is True:
                quiet = None
            elif quiet is None:
                quiet = now
            peer = Peer(
                online=event.online if event.online is not None else old.online,
                connectivity=conn,
                quiet_since=quiet,
            )
            state = replace(state, peers={**state.peers, event.device: peer})
            claim = state.claims.get(event.device)
            if claim is not None and peer.online and peer.connectivity:
                state = _put_claim(state, event.device, replace(claim, proved=True))
    elif isinstance(event, ClaimSeen):
        state, pre = _claim_seen(state, event, now)
    elif isinstance(event, LocalState):
        state = replace(state, local_higher=event.higher_up, local_connected=event.connected)
    state, actions = _evaluate(state, now)
    return state, pre + actions


def _put_claim(state: ClaimState, device: str, claim: LiveClaim | None) -> ClaimState:
    claims = dict(state.claims)
    if claim is None:
        claims.pop(device, None)
    else:
        claims[device] = claim
    return replace(state, claims=claims)


def _claim_seen(state: ClaimState, ev: ClaimSeen, now: float) -> ClaimResult:
    me = state.config.device
    if ev.device == me:
        if state.phase is ClaimPhase.CLAIMING and ev.ttl is not None and ev.seq == state.seq:
            if _other_live(state, now):
                # Someone's claim reached the broker before ours: theirs wins everywhere.
                return replace(state, phase=ClaimPhase.ASLEEP, claimed_at=None), [ReleaseClaim()]
            return (
                replace(state, phase=ClaimPhase.AWAKE, claimed_at=now, refreshed_at=now),
                [Wake(reason="our claim reached the broker first")],
            )
        if ev.ttl is not None and ev.seq != state.seq and state.phase is ClaimPhase.ASLEEP:
            return state, [ReleaseClaim()]  # a claim left from an earlier life
        if state.phase is ClaimPhase.AWAKE and ev.ttl is not None and ev.seq == state.seq:
            return replace(state, unechoed_since=None), []
        return state, []
    if ev.device not in state.config.others:
        return state, []
    old = state.claims.get(ev.device)
    if ev.ttl is None:
        if old is not None:
            state = _released(state, ev.device, old, now)
        return state, []
    peer = state.peers.get(ev.device, Peer())
    fresh = old is None or old.seq != ev.seq
    claim = LiveClaim(
        seq=ev.seq,
        ttl=ev.ttl,
        first_seen=now if fresh or old is None else old.first_seen,
        received_at=now,
        proved=(not fresh and old is not None and old.proved)
        or bool(peer.online and peer.connectivity),
    )
    state = _put_claim(state, ev.device, claim)
    if state.phase is ClaimPhase.CLAIMING:
        # Their claim arrived before the echo of ours: the broker saw theirs first.
        return replace(state, phase=ClaimPhase.ASLEEP, claimed_at=None), [ReleaseClaim()]
    return state, []


def _released(state: ClaimState, device: str, claim: LiveClaim, now: float) -> ClaimState:
    """A claim ended (released or expired): if it never proved itself, its holder failed."""
    failed = state.failed if claim.proved else state.failed | {device}
    state = _put_claim(state, device, None)
    return replace(state, failed=failed, turn_since=now)


def _other_live(state: ClaimState, now: float) -> bool:
    return any(now - c.received_at < c.ttl for c in state.claims.values())


def _stop(state: ClaimState, reason: str, *, failed: bool) -> ClaimResult:
    """Leave CLAIMING or AWAKE: sleep first, then clear the claim (never two awake)."""
    if state.phase is ClaimPhase.ASLEEP:
        return state, []
    actions: list[ClaimAction] = []
    if state.phase is ClaimPhase.AWAKE:
        actions.append(Sleep(reason=reason))
    actions.append(ReleaseClaim())
    new = replace(
        state,
        phase=ClaimPhase.ASLEEP,
        claimed_at=None,
        refreshed_at=None,
        unechoed_since=None,
        turn_since=state.now,
        failed=state.failed | {state.config.device} if failed else state.failed,
    )
    return new, actions


def _higher_up(state: ClaimState, now: float) -> bool:
    """Whether anything above the group emergency carries traffic, as far as we can tell."""
    if state.local_higher:
        return True
    cfg = state.config
    for d in cfg.others:
        peer = state.peers.get(d, Peer())
        claim = state.claims.get(d)
        live = claim is not None and now - claim.received_at < claim.ttl
        switching = peer.quiet_since is not None and now - peer.quiet_since < cfg.grace
        if peer.online and (peer.connectivity or switching) and not live:
            return True
    return False


def _everyone_known(state: ClaimState) -> bool:
    # A device never heard from is not known to be down: no wake on a missing view.
    return all(state.peers.get(d, Peer()).online is not None for d in state.config.others)


def _evaluate(state: ClaimState, now: float) -> ClaimResult:
    cfg = state.config
    # Expire claims we stopped hearing about (the claimant died or lost the broker).
    for d, c in list(state.claims.items()):
        if now - c.received_at >= c.ttl:
            state = _released(state, d, c, now)
        elif not c.proved and now - c.first_seen >= cfg.switch_timeout:
            state = replace(state, failed=state.failed | {d})
    higher = _higher_up(state, now)
    since = state.higher_up_since if higher else None
    if higher and since is None:
        since = now
    state = replace(state, higher_up_since=since)
    view_ok = state.connected and state.synced

    if state.phase is ClaimPhase.AWAKE:
        if not view_ok:
            return _stop(state, "the view of the group is stale", failed=False)
        started = state.claimed_at if state.claimed_at is not None else now
        if not state.local_connected and now - started >= cfg.switch_timeout:
            return _stop(state, "no connectivity within switch_timeout", failed=True)
        if since is not None and now - since >= cfg.failback_stable:
            return _stop(state, "a higher layer is back and stable", failed=False)
        if state.unechoed_since is not None and now - state.unechoed_since >= cfg.ttl / 3:
            # The others last heard us one refresh before this one and let our claim go ttl
            # after that: sleeping now leaves them ttl/3 (less one tick) before they may wake,
            # whatever the MQTT keepalive takes to notice a silently lost broker.
            return _stop(state, "our claim is no longer echoed by the broker", failed=False)
        refreshed = state.refreshed_at if state.refreshed_at is not None else now
        if now - refreshed >= cfg.ttl / 3:
            unechoed = state.unechoed_since if state.unechoed_since is not None else now
            new = replace(state, refreshed_at=now, unechoed_since=unechoed)
            return new, [PublishClaim(seq=state.seq, ttl=cfg.ttl)]
        return state, []

    if state.phase is ClaimPhase.CLAIMING:
        started = state.claimed_at if state.claimed_at is not None else now
        if not view_ok or higher or now - started >= cfg.switch_timeout:
            return _stop(state, "claim abandoned", failed=False)
        return state, []

    need = view_ok and not higher and _everyone_known(state)
    if not need:
        return replace(state, turn_since=None, failed=frozenset()), []
    turn_since = state.turn_since if state.turn_since is not None else now
    state = replace(state, turn_since=turn_since)
    if _other_live(state, now):
        return state, []
    me = cfg.device
    candidates = [
        h
        for h in cfg.order
        if h not in state.failed and (h == me or state.peers.get(h, Peer()).online)
    ]
    if not candidates:
        return state, []
    if candidates[0] == me:
        seq = state.seq + 1
        new = replace(state, phase=ClaimPhase.CLAIMING, seq=seq, claimed_at=now)
        return new, [PublishClaim(seq=seq, ttl=cfg.ttl)]
    if now - turn_since >= cfg.switch_timeout:
        # Its turn came and it did not claim: the next holder tries.
        return replace(state, failed=state.failed | {candidates[0]}, turn_since=now), []
    return state, []
