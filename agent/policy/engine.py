"""The failover policy: a pure state machine, `transition(state, event) -> (state, actions)`.

No I/O and no clock reads: every event carries `now` (monotonic seconds, chosen by the caller).
See docs/policy.md for the rules.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Literal

import msgspec
from msgspec.structs import replace

if TYPE_CHECKING:
    from agent.config import Config


class Health(enum.StrEnum):
    """What a health monitor says about a layer."""

    UP = "up"
    DEGRADED = "degraded"
    DOWN = "down"
    UNKNOWN = "unknown"


class Phase(enum.StrEnum):
    """Where the machine is: no layer active yet, steady on one, or a switch in flight."""

    IDLE = "idle"
    ACTIVE = "active"
    SWITCHING = "switching"


_USABLE = (Health.UP, Health.DEGRADED)


# --- configuration -------------------------------------------------------------------------


class LayerSpec(msgspec.Struct, frozen=True, kw_only=True):
    """A layer as the policy sees it; the order of PolicyConfig.layers is the priority."""

    name: str
    modem: str
    profile: str
    role: Literal["primary", "failover", "emergency"] = "failover"
    radio_down_when_inactive: bool = False
    #: Shares its modem (its eUICC) with a higher layer, so its profile is disabled while
    #: that layer runs: like a dormant layer it gives no health evidence until activated.
    cold: bool = False
    #: A sibling's device_id: the layer is that device (modem and profile are ""), its health
    #: fed from the sibling's MQTT messages (agent.siblings.view.sibling_health).
    device: str | None = None
    #: Companion mode: our own layer below a sibling that comes first. It stays asleep (profile
    #: disabled) while the sibling carries us, and is put back to sleep (SleepLayer) on failback.
    companion: bool = False
    #: The group's emergency: besides everything below, it wakes only while GroupWake says so.
    group: bool = False

    @property
    def dormant(self) -> bool:
        """Whether the layer gives no health evidence while inactive (profile or radio off)."""
        return (
            self.role == "emergency" or self.radio_down_when_inactive or self.cold or self.companion
        )


class PolicyConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Counting and timer settings; times in seconds."""

    layers: tuple[LayerSpec, ...]
    down_after: int = 3
    up_after: int = 3
    hold_down: float = 30.0
    hold_down_max: float = 600.0
    hold_down_multiplier: float = 2.0
    hold_down_decay: float = 900.0
    failback_stable: float = 120.0
    switch_timeout: float = 180.0

    @classmethod
    def from_config(cls, cfg: Config) -> PolicyConfig:
        """Map the TOML config onto the policy's settings."""
        companion_mode = bool(cfg.layers) and cfg.layers[0].device is not None
        return cls(
            layers=tuple(
                LayerSpec(
                    name=layer.name,
                    modem=layer.modem,
                    profile=layer.profile,
                    role=layer.role,
                    radio_down_when_inactive=layer.radio_down_when_inactive,
                    cold=layer.device is None
                    and any(
                        other.device is None
                        and other.modem == layer.modem
                        and other.role != "emergency"
                        for other in cfg.layers[:n]
                    ),
                    device=layer.device,
                    companion=companion_mode and layer.device is None and layer.role != "emergency",
                    group=layer.scope == "group",
                )
                for n, layer in enumerate(cfg.layers)
            ),
            down_after=cfg.policy.down_after,
            up_after=cfg.policy.up_after,
            hold_down=cfg.timers.hold_down,
            hold_down_max=cfg.timers.hold_down_max,
            hold_down_multiplier=cfg.timers.hold_down_multiplier,
            hold_down_decay=cfg.timers.hold_down_decay,
            failback_stable=cfg.timers.failback_stable,
            switch_timeout=cfg.timers.switch_timeout,
        )


# --- events --------------------------------------------------------------------------------


class LayerHealth(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """A health report for one layer."""

    layer: str
    health: Health
    reason: str = ""
    now: float


class Tick(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """Time passes: lets timers (failback stability, hold-down, switch timeout) fire."""

    now: float


class SwitchDone(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """The daemon finished an ActivateLayer; timings may hold switched_at and verified_at."""

    layer: str
    ok: bool
    now: float
    reason: str = ""
    timings: Mapping[str, float] = msgspec.field(default_factory=dict)


class ManualSwitch(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """A user asks for a layer; it stays pinned until it goes down. layer=None unpins."""

    layer: str | None
    now: float


class Drill(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """A failover drill: move to the next usable lower layer; failback follows the usual rules."""

    now: float


class GroupWake(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """The group claim protocol (agent.siblings.claim) lets the group emergency wake, or not."""

    awake: bool
    now: float


Event = LayerHealth | Tick | SwitchDone | ManualSwitch | Drill | GroupWake


# --- actions -------------------------------------------------------------------------------


class TransitionEvent(msgspec.Struct, kw_only=True):
    """The record of one transition; the daemon fills switched_at and verified_at."""

    id: str
    kind: Literal["initial", "failover", "failback", "emergency", "manual", "drill"]
    from_layer: str | None
    to_layer: str | None
    from_profile: str | None = None
    to_profile: str | None = None
    reason: str
    detected_at: float
    decided_at: float
    switched_at: float | None = None
    verified_at: float | None = None
    outcome: Literal["pending", "switched", "failed", "rejected"] = "pending"


class ActivateLayer(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """Make this layer's profile the enabled one and route traffic over it (a safe switch)."""

    layer: str
    modem: str
    profile: str
    reason: str
    previous: str | None
    event_id: str
    #: A sibling layer's device_id (modem and profile are then ""): route over its link.
    device: str | None = None


class EnableEmergency(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """Wake the dormant emergency layer (enable its profile) before activating it."""

    layer: str


class DisableEmergency(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """Put the emergency layer back to sleep (disable its profile)."""

    layer: str


class RadioUp(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """Turn a modem's radio on (AT+CFUN=1)."""

    modem: str


class RadioDown(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """Turn a modem's radio off (AT+CFUN=4) because no active layer uses it."""

    modem: str


class EmitEvent(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """Publish a transition record (MQTT events, hooks, log)."""

    event: TransitionEvent


class SleepLayer(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """Companion mode: disable our own layer's profile again, the sibling carries us."""

    layer: str
    modem: str
    profile: str


Action = (
    ActivateLayer
    | EnableEmergency
    | DisableEmergency
    | RadioUp
    | RadioDown
    | EmitEvent
    | SleepLayer
)


# --- state ---------------------------------------------------------------------------------


class LayerState(msgspec.Struct, frozen=True, kw_only=True):
    """What the policy believes about one layer."""

    name: str
    status: Health = Health.UNKNOWN
    last_report: Health = Health.UNKNOWN
    last_reason: str = ""
    bad_streak: int = 0
    good_streak: int = 0
    bad_since: float | None = None
    up_since: float | None = None
    held_until: float = float("-inf")
    penalty: float = 0.0
    last_down_at: float | None = None
    flaps: int = 0


class PolicyState(msgspec.Struct, frozen=True, kw_only=True):
    """The whole machine state; build the first one with initial_state()."""

    config: PolicyConfig
    phase: Phase
    now: float
    layers: tuple[LayerState, ...]
    active: str | None = None
    target: str | None = None
    switch_started: float | None = None
    pending: TransitionEvent | None = None
    pinned: str | None = None
    emergency_enabled: bool = False
    #: Whether the group claim protocol lets a group emergency layer wake (GroupWake).
    group_awake: bool = False
    seq: int = 0
    id_prefix: str = "tr"
    switches: int = 0

    def layer(self, name: str) -> LayerState:
        """The state of a layer by name; KeyError when unknown."""
        for ls in self.layers:
            if ls.name == name:
                return ls
        raise KeyError(name)

    def spec(self, name: str) -> LayerSpec:
        """The configured layer by name; KeyError when unknown."""
        for sp in self.config.layers:
            if sp.name == name:
                return sp
        raise KeyError(name)


def initial_state(
    config: PolicyConfig, now: float, active: str | None = None, id_prefix: str = "tr"
) -> PolicyState:
    """A fresh machine; active is the layer whose profile is enabled at start, if known."""
    names = [sp.name for sp in config.layers]
    if len(set(names)) != len(names):
        raise ValueError("layer names must be unique")
    known_active = active if active in names else None
    emergency = next((sp.name for sp in config.layers if sp.role == "emergency"), None)
    return PolicyState(
        config=config,
        phase=Phase.ACTIVE if known_active else Phase.IDLE,
        now=now,
        layers=tuple(LayerState(name=n) for n in names),
        active=known_active,
        emergency_enabled=known_active is not None and known_active == emergency,
        id_prefix=id_prefix,
    )


# --- the transition function ---------------------------------------------------------------

Result = tuple[PolicyState, list[Action]]


def transition(state: PolicyState, event: Event) -> Result:
    """Apply one event; returns the new state and the actions the daemon must carry out."""
    now = max(state.now, event.now)  # a late event never moves the clock backwards
    state = replace(state, now=now)
    if isinstance(event, LayerHealth):
        state = _record_health(state, event.layer, Health(event.health), event.reason, now)
        return _after_change(state)
    if isinstance(event, Tick):
        return _after_change(state)
    if isinstance(event, SwitchDone):
        return _switch_done(state, event, now)
    if isinstance(event, ManualSwitch):
        return _manual(state, event.layer, now)
    if isinstance(event, GroupWake):
        return _after_change(replace(state, group_awake=event.awake))
    return _drill(state, now)


def _after_change(state: PolicyState) -> Result:
    if state.phase is Phase.SWITCHING:
        started = state.switch_started if state.switch_started is not None else state.now
        if state.now - started >= state.config.switch_timeout and state.target is not None:
            return _switch_done(
                state,
                SwitchDone(layer=state.target, ok=False, now=state.now, reason="switch timed out"),
                state.now,
            )
        return state, []  # decisions wait until the switch in flight ends
    return _decide(state)


def _set_layer(state: PolicyState, new: LayerState) -> PolicyState:
    return replace(state, layers=tuple(new if ls.name == new.name else ls for ls in state.layers))


def _record_health(
    state: PolicyState, name: str, health: Health, reason: str, now: float
) -> PolicyState:
    try:
        ls = state.layer(name)
        spec = state.spec(name)
    except KeyError:
        return state  # a report for a layer we do not know changes nothing
    if spec.dormant and name not in (state.active, state.target):
        # Profile or radio is off on purpose: its reports say nothing about whether it would work.
        return _set_layer(state, replace(ls, last_report=health, last_reason=reason))
    if health is Health.UNKNOWN:
        return _set_layer(state, replace(ls, last_report=health, last_reason=reason))
    cfg = state.config
    if health is Health.DOWN:
        ls = replace(
            ls,
            bad_streak=ls.bad_streak + 1,
            good_streak=0,
            bad_since=ls.bad_since if ls.bad_streak else now,
        )
        if ls.status is not Health.DOWN and ls.bad_streak >= cfg.down_after:
            ls = _mark_down(cfg, ls, now)
    else:
        ls = replace(ls, good_streak=ls.good_streak + 1, bad_streak=0, bad_since=None)
        if ls.status in _USABLE or ls.good_streak >= cfg.up_after:
            if health is Health.UP and ls.status is not Health.UP:
                ls = replace(ls, status=Health.UP, up_since=now)
            elif health is Health.DEGRADED:
                ls = replace(ls, status=Health.DEGRADED, up_since=None)
    return _set_layer(state, replace(ls, last_report=health, last_reason=reason))


def _mark_down(cfg: PolicyConfig, ls: LayerState, now: float) -> LayerState:
    """Count a layer down and extend its hold-down: repeated flaps multiply it, quiet resets it."""
    quiet = ls.last_down_at is None or now - ls.last_down_at >= cfg.hold_down_decay
    penalty = (
        cfg.hold_down
        if quiet
        else min(max(ls.penalty, cfg.hold_down) * cfg.hold_down_multiplier, cfg.hold_down_max)
    )
    return replace(
        ls,
        status=Health.DOWN,
        up_since=None,
        penalty=penalty,
        held_until=now + penalty,
        last_down_at=now,
        flaps=0 if quiet else ls.flaps + 1,
        good_streak=0,
    )


def _decide(state: PolicyState) -> Result:
    cfg, now = state.config, state.now
    active = state.active
    if state.pinned is not None:
        if state.layer(state.pinned).status is not Health.DOWN:
            return state, []
        state = replace(state, pinned=None)

    order = list(cfg.layers)
    active_idx = next((i for i, sp in enumerate(order) if sp.name == active), None)
    active_ok = active is not None and state.layer(active).status is not Health.DOWN

    def usable(sp: LayerSpec) -> bool:
        return state.layer(sp.name).status in _USABLE

    def dormant_ready(sp: LayerSpec) -> bool:
        ls = state.layer(sp.name)
        if sp.companion and any(
            state.layer(o.name).status is Health.UNKNOWN for o in order if o.device is not None
        ):
            return False  # no verdict on the sibling yet: do not wake our own profile
        return sp.dormant and sp.name != active and now >= ls.held_until

    if active_ok and active_idx is not None:
        spec = order[active_idx]
        if spec.role == "emergency":
            # The emergency layer is a last resort: leave it as soon as anything above works.
            above = [sp for sp in order[:active_idx] if usable(sp) or dormant_ready(sp)]
            if above:
                best = above[0]
                return _start_switch(state, best, "failback", _why_up(state, best), now)
            if spec.group and not state.group_awake:
                return _group_sleep(state, spec, now)
            return state, []
        for sp in order[:active_idx]:
            ls = state.layer(sp.name)
            if (
                not sp.dormant
                and ls.status is Health.UP
                and ls.up_since is not None
                and now - ls.up_since >= cfg.failback_stable
                and now >= ls.held_until
            ):
                return _start_switch(state, sp, "failback", _why_up(state, sp), now)
        return state, []

    # Nothing active or the active layer is down: move now, preferring layers not held down.
    regular = [sp for sp in order if sp.role != "emergency" and sp.name != active]
    candidates = [sp for sp in regular if usable(sp) or dormant_ready(sp)]
    fresh = [sp for sp in candidates if now >= state.layer(sp.name).held_until]
    pick = (fresh or candidates)[0] if candidates else None
    kind: Literal["initial", "failover", "emergency"] = "initial" if active is None else "failover"
    if pick is not None:
        return _start_switch(state, pick, kind, _why_down(state, active, pick), now)
    emergency = next((sp for sp in order if sp.role == "emergency"), None)
    all_down = all(
        state.layer(sp.name).status is Health.DOWN
        or (sp.dormant and now < state.layer(sp.name).held_until)
        for sp in order
        if sp.role != "emergency"
    )
    if (
        emergency is not None
        and emergency.name != active
        and all_down
        and now >= state.layer(emergency.name).held_until
        and (state.group_awake or not emergency.group)
    ):
        return _start_switch(state, emergency, "emergency", "every higher layer is down", now)
    return state, []


def _group_sleep(state: PolicyState, spec: LayerSpec, now: float) -> Result:
    """The group took its wake back and nothing of ours above works: the profile sleeps."""
    seq = state.seq + 1
    record = TransitionEvent(
        id=f"{state.id_prefix}-{seq}",
        kind="failback",
        from_layer=spec.name,
        to_layer=None,
        from_profile=spec.profile or None,
        reason="a higher layer of the group is back",
        detected_at=now,
        decided_at=now,
        switched_at=now,
        outcome="switched",
    )
    new = replace(state, phase=Phase.IDLE, active=None, emergency_enabled=False, seq=seq)
    return new, [DisableEmergency(layer=spec.name), EmitEvent(event=record)]


def _why_down(state: PolicyState, active: str | None, pick: LayerSpec) -> str:
    if active is None:
        return f"{pick.name} is the best usable layer"
    ls = state.layer(active)
    detail = f": {ls.last_reason}" if ls.last_reason else ""
    return f"{active} is down{detail}"


def _why_up(state: PolicyState, sp: LayerSpec) -> str:
    ls = state.layer(sp.name)
    if ls.up_since is not None:
        return f"{sp.name} stable since {ls.up_since:.1f}"
    return f"{sp.name} is usable again"


def _detected_at(state: PolicyState, kind: str, target: LayerSpec) -> float:
    if kind in ("failover", "emergency") and state.active is not None:
        since = state.layer(state.active).bad_since
        return since if since is not None else state.now
    if kind == "failback":
        up = state.layer(target.name).up_since
        return up if up is not None else state.now
    return state.now


def _start_switch(
    state: PolicyState,
    target: LayerSpec,
    kind: Literal["initial", "failover", "failback", "emergency", "manual", "drill"],
    reason: str,
    now: float,
) -> Result:
    seq = state.seq + 1
    prev = state.active
    prev_spec = state.spec(prev) if prev is not None else None
    record = TransitionEvent(
        id=f"{state.id_prefix}-{seq}",
        kind=kind,
        from_layer=prev,
        to_layer=target.name,
        # A sibling layer has no profile of ours: null, not "".
        from_profile=(prev_spec.profile or None) if prev_spec else None,
        to_profile=target.profile or None,
        reason=reason,
        detected_at=min(_detected_at(state, kind, target), now),
        decided_at=now,
    )
    actions: list[Action] = []
    if target.radio_down_when_inactive or (
        target.dormant and prev_spec is not None and prev_spec.modem != target.modem
    ):
        actions.append(RadioUp(modem=target.modem))
    emergency_enabled = state.emergency_enabled
    if target.role == "emergency" and not emergency_enabled:
        actions.append(EnableEmergency(layer=target.name))
        emergency_enabled = True
    actions.append(
        ActivateLayer(
            layer=target.name,
            modem=target.modem,
            profile=target.profile,
            reason=reason,
            previous=prev,
            event_id=record.id,
            device=target.device,
        )
    )
    actions.append(EmitEvent(event=record))
    new = replace(
        state,
        phase=Phase.SWITCHING,
        target=target.name,
        switch_started=now,
        pending=record,
        seq=seq,
        emergency_enabled=emergency_enabled,
        switches=state.switches + 1,
    )
    return new, actions


def _finished(
    record: TransitionEvent,
    outcome: Literal["switched", "failed"],
    ev: SwitchDone,
) -> TransitionEvent:
    done = msgspec.structs.replace(record, outcome=outcome)
    if "switched_at" in ev.timings:
        done.switched_at = float(ev.timings["switched_at"])
    if "verified_at" in ev.timings:
        done.verified_at = float(ev.timings["verified_at"])
    if outcome == "switched" and done.verified_at is None:
        done.verified_at = ev.now
    if outcome == "failed" and ev.reason:
        done.reason = f"{done.reason}; switch failed: {ev.reason}"
    return done


def _switch_done(state: PolicyState, ev: SwitchDone, now: float) -> Result:
    if state.phase is not Phase.SWITCHING or ev.layer != state.target:
        return _after_change(state)  # a stale or unrelated completion: just re-evaluate
    cfg = state.config
    target = state.spec(ev.layer)
    prev = state.active
    prev_spec = state.spec(prev) if prev is not None else None
    record = state.pending
    actions: list[Action] = []
    if ev.ok:
        ls = state.layer(target.name)
        # The safe switch verified registration and the data path: the layer works right now.
        ls = replace(
            ls,
            status=Health.UP if ls.status is not Health.DEGRADED else Health.DEGRADED,
            up_since=ls.up_since if ls.status is Health.UP else now,
            bad_streak=0,
            bad_since=None,
        )
        state = _set_layer(state, ls)
        if prev_spec is not None and prev_spec.name != target.name:
            if prev_spec.dormant:
                # Once asleep again its old status is stale; only a new activation tells.
                old = state.layer(prev_spec.name)
                state = _set_layer(
                    state,
                    replace(
                        old,
                        status=Health.UNKNOWN,
                        good_streak=0,
                        bad_streak=0,
                        up_since=None,
                        bad_since=None,
                    ),
                )
            if prev_spec.role == "emergency" and state.emergency_enabled:
                actions.append(DisableEmergency(layer=prev_spec.name))
                state = replace(state, emergency_enabled=False)
            if prev_spec.companion:
                actions.append(
                    SleepLayer(
                        layer=prev_spec.name, modem=prev_spec.modem, profile=prev_spec.profile
                    )
                )
            if prev_spec.radio_down_when_inactive and prev_spec.modem != target.modem:
                actions.append(RadioDown(modem=prev_spec.modem))
        if record is not None:
            actions.append(EmitEvent(event=_finished(record, "switched", ev)))
        state = replace(
            state,
            phase=Phase.ACTIVE,
            active=target.name,
            target=None,
            switch_started=None,
            pending=None,
        )
    else:
        ls = state.layer(target.name)
        ls = _mark_down(cfg, replace(ls, bad_since=ls.bad_since or now), now)
        state = _set_layer(state, replace(ls, last_reason=ev.reason or "switch failed"))
        if target.role == "emergency" and state.emergency_enabled and prev != target.name:
            actions.append(DisableEmergency(layer=target.name))
            state = replace(state, emergency_enabled=False)
        if target.radio_down_when_inactive and (
            prev_spec is None or prev_spec.modem != target.modem
        ):
            actions.append(RadioDown(modem=target.modem))
        if target.companion and prev != target.name:
            # The safe switch leaves the new profile enabled rather than none (nothing to roll
            # back to): asleep again, or it stays on once the sibling carries us again.
            actions.append(
                SleepLayer(layer=target.name, modem=target.modem, profile=target.profile)
            )
        if record is not None:
            actions.append(EmitEvent(event=_finished(record, "failed", ev)))
        if state.pinned == target.name:
            state = replace(state, pinned=None)
        state = replace(
            state,
            phase=Phase.ACTIVE if prev is not None else Phase.IDLE,
            target=None,
            switch_started=None,
            pending=None,
        )
    state, more = _decide(state)
    return state, actions + more


def _manual(state: PolicyState, layer: str | None, now: float) -> Result:
    if layer is None:
        return _after_change(replace(state, pinned=None))
    try:
        spec = state.spec(layer)
    except KeyError:
        return state, [_rejected(state, "manual", layer, f"no layer named {layer!r}", now)]
    if state.phase is Phase.SWITCHING:
        return state, [_rejected(state, "manual", layer, "a switch is in flight", now)]
    state = replace(state, pinned=layer)
    if state.active == layer:
        return state, []
    return _start_switch(state, spec, "manual", f"manual switch to {layer}", now)


def _drill(state: PolicyState, now: float) -> Result:
    if state.phase is not Phase.ACTIVE or state.active is None:
        return state, [_rejected(state, "drill", None, "no steady active layer to drill", now)]
    order = list(state.config.layers)
    idx = next(i for i, sp in enumerate(order) if sp.name == state.active)
    below = [
        sp
        for sp in order[idx + 1 :]
        if sp.role != "emergency"
        and (
            state.layer(sp.name).status in _USABLE
            or (sp.dormant and now >= state.layer(sp.name).held_until)
        )
    ]
    if not below:
        return state, [_rejected(state, "drill", None, "no usable layer below the active one", now)]
    # A drill exercises the automatic policy: a pin left in place would hold the policy on the
    # pinned layer's health while the drilled layer carries traffic, even once that goes down.
    state = replace(state, pinned=None)
    return _start_switch(state, below[0], "drill", f"failover drill from {state.active}", now)


def _rejected(
    state: PolicyState,
    kind: Literal["manual", "drill"],
    layer: str | None,
    reason: str,
    now: float,
) -> EmitEvent:
    return EmitEvent(
        event=TransitionEvent(
            id=f"{state.id_prefix}-rejected-{state.seq}",
            kind=kind,
            from_layer=state.active,
            to_layer=layer,
            reason=reason,
            detected_at=now,
            decided_at=now,
            outcome="rejected",
        )
    )


def summary(state: PolicyState) -> dict[str, object]:
    """A JSON-ready view of the machine for status displays."""
    return {
        "phase": str(state.phase),
        "active": state.active,
        "target": state.target,
        "pinned": state.pinned,
        "emergency_enabled": state.emergency_enabled,
        "layers": [
            {
                "name": ls.name,
                "status": str(ls.status),
                "last_report": str(ls.last_report),
                "reason": ls.last_reason,
                "held_for": max(0.0, ls.held_until - state.now),
            }
            for ls in state.layers
        ],
    }


def layer_names(specs: Sequence[LayerSpec]) -> list[str]:
    """Names in priority order."""
    return [sp.name for sp in specs]
