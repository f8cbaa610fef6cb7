"""The failover policy as a pure machine: events in, state and actions out, no I/O."""

from __future__ import annotations

import json

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.policy.engine import (
    Action,
    ActivateLayer,
    DisableEmergency,
    Drill,
    EmitEvent,
    EnableEmergency,
    Event,
    Health,
    LayerHealth,
    LayerSpec,
    ManualSwitch,
    Phase,
    PolicyConfig,
    PolicyState,
    RadioDown,
    RadioUp,
    SwitchDone,
    Tick,
    TransitionEvent,
    initial_state,
    transition,
)

LAYERS = (
    LayerSpec(name="primary", modem="m0", profile="89000000000000000011", role="primary"),
    LayerSpec(name="backup", modem="m1", profile="89000000000000000029", role="failover"),
    LayerSpec(name="sos", modem="m1", profile="89000000000000000037", role="emergency"),
)


def make_config(**kw: float) -> PolicyConfig:
    base: dict[str, float] = {
        "down_after": 3,
        "up_after": 3,
        "hold_down": 30.0,
        "hold_down_max": 240.0,
        "hold_down_multiplier": 2.0,
        "hold_down_decay": 600.0,
        "failback_stable": 120.0,
        "switch_timeout": 60.0,
    }
    base.update(kw)
    return PolicyConfig(layers=LAYERS, **base)  # type: ignore[arg-type]


class Driver:
    """Feeds events, keeps every action, and plays the daemon's part for switches."""

    def __init__(self, config: PolicyConfig, active: str | None = "primary", now: float = 0.0):
        self.state = initial_state(config, now, active=active)
        self.actions: list[Action] = []
        self.now = now

    def feed(self, event: Event) -> list[Action]:
        self.state, actions = transition(self.state, event)
        self.actions.extend(actions)
        return actions

    def report(self, layer: str, health: str, times: int = 1, every: float = 1.0) -> None:
        for _ in range(times):
            self.now += every
            self.feed(LayerHealth(layer=layer, health=Health(health), reason=health, now=self.now))

    def complete(self, ok: bool = True) -> list[Action]:
        assert self.state.target is not None
        self.now += 1.0
        return self.feed(
            SwitchDone(
                layer=self.state.target,
                ok=ok,
                now=self.now,
                timings={"switched_at": self.now - 0.5, "verified_at": self.now},
                reason="" if ok else "never registered",
            )
        )

    def tick(self, until: float, step: float = 1.0) -> None:
        while self.now < until:
            self.now += step
            self.feed(Tick(now=self.now))

    def phase(self) -> Phase:
        return self.state.phase

    def target(self) -> str | None:
        return self.state.target

    def activations(self) -> list[str]:
        return [a.layer for a in self.actions if isinstance(a, ActivateLayer)]

    def records(self) -> list[TransitionEvent]:
        return [a.event for a in self.actions if isinstance(a, EmitEvent)]


def all_up(d: Driver, *layers: str) -> None:
    for name in layers:
        d.report(name, "up", times=3)


def test_primary_down_fails_over_after_n_bad_reports() -> None:
    d = Driver(make_config())
    all_up(d, "primary", "backup")
    d.report("primary", "down", times=2)
    assert d.activations() == []  # two bad reports are not three
    d.report("primary", "down")
    assert d.activations() == ["backup"]
    assert d.phase() is Phase.SWITCHING
    record = d.records()[-1]
    assert (record.kind, record.from_layer, record.to_layer) == ("failover", "primary", "backup")
    assert record.detected_at < record.decided_at  # detected at the first bad report
    d.complete()
    assert d.state.active == "backup"
    assert d.phase() is Phase.ACTIVE
    done = d.records()[-1]
    assert done.id == record.id
    assert done.outcome == "switched"
    assert done.switched_at is not None
    assert done.verified_at is not None


def test_both_down_enables_emergency_then_failback_disables_it() -> None:
    d = Driver(make_config())
    all_up(d, "primary", "backup")
    d.report("primary", "down", times=3)
    d.complete()
    d.report("backup", "down", times=3)
    acts = d.actions[-3:]
    assert any(isinstance(a, EnableEmergency) and a.layer == "sos" for a in acts)
    assert d.target() == "sos"
    assert d.records()[-1].kind == "emergency"
    d.complete()
    assert d.state.active == "sos"
    assert d.state.emergency_enabled

    # Primary recovers: the emergency layer is left as soon as something above works.
    d.report("primary", "up", times=3)
    assert d.target() == "primary"
    acts = d.complete()
    assert any(isinstance(a, DisableEmergency) and a.layer == "sos" for a in acts)
    assert d.state.active == "primary"
    assert not d.state.emergency_enabled


def test_emergency_is_not_enabled_while_some_higher_layer_is_unknown() -> None:
    d = Driver(make_config())
    d.report("primary", "down", times=3)  # backup never reported: not known to be down
    assert not any(isinstance(a, EnableEmergency) for a in d.actions)
    assert d.target() is None


def test_failback_waits_for_stable_time() -> None:
    d = Driver(make_config(failback_stable=120.0, hold_down=10.0))
    all_up(d, "primary", "backup")
    d.report("primary", "down", times=3)
    d.complete()
    d.report("primary", "up", times=3)
    up_at = d.now
    d.tick(up_at + 119.0)
    assert d.state.active == "backup"
    assert d.target() is None
    d.tick(up_at + 121.0)
    assert d.target() == "primary"
    assert d.records()[-1].kind == "failback"
    d.complete()
    assert d.state.active == "primary"


def test_degraded_primary_is_not_a_failback_target_but_keeps_active() -> None:
    d = Driver(make_config(failback_stable=5.0))
    all_up(d, "primary", "backup")
    d.report("primary", "degraded", times=10)
    assert d.activations() == []  # degraded still works: no failover
    d.report("primary", "down", times=3)
    d.complete()
    d.report("primary", "degraded", times=3)
    d.tick(d.now + 300)
    assert d.state.active == "backup"


def test_flapping_primary_switches_a_bounded_number_of_times() -> None:
    d = Driver(make_config(down_after=1, up_after=1, failback_stable=20.0))
    all_up(d, "primary", "backup")
    # One hour of a link that is up for 25 s then down for 5 s, reported every 5 s.
    for _ in range(120):
        for _ in range(5):
            d.report("primary", "up", every=5.0)
            d.report("backup", "up", every=0.0)
            if d.phase() is Phase.SWITCHING:
                d.complete()
        d.report("primary", "down", every=5.0)
        if d.phase() is Phase.SWITCHING:
            d.complete()
    # Without hold-down this would switch twice per 30 s cycle (240 times).
    assert d.state.switches <= 12
    assert d.state.layer("primary").penalty == 240.0


def test_hold_down_grows_with_flaps_and_resets_after_quiet() -> None:
    d = Driver(make_config(down_after=1, up_after=1, hold_down=10.0, hold_down_max=80.0))
    all_up(d, "backup")
    penalties = []
    for _ in range(6):
        d.report("primary", "up")
        d.report("primary", "down")
        penalties.append(d.state.layer("primary").penalty)
        if d.phase() is Phase.SWITCHING:
            d.complete()
    assert penalties == [10.0, 20.0, 40.0, 80.0, 80.0, 80.0]
    d.tick(d.now + 601.0, step=50.0)
    d.report("primary", "up")
    d.report("primary", "down")
    assert d.state.layer("primary").penalty == 10.0


def test_held_down_layer_is_skipped_for_failover_when_another_works() -> None:
    d = Driver(make_config(down_after=1, up_after=1, failback_stable=0.0, hold_down=100.0))
    all_up(d, "primary", "backup")
    d.report("backup", "down")  # backup flaps: held down for 100 s
    d.report("backup", "up")
    d.report("primary", "down")
    # Backup is held down, but it is the only working layer: better than nothing.
    assert d.target() == "backup"


def test_switch_failure_marks_target_down_and_picks_next() -> None:
    layers = (*LAYERS[:2], LayerSpec(name="third", modem="m0", profile="890000000000000000451"))
    d = Driver(PolicyConfig(layers=layers, down_after=1, up_after=1))
    all_up(d, "primary", "backup", "third")
    d.report("primary", "down")
    assert d.target() == "backup"
    acts = d.complete(ok=False)
    assert d.state.layer("backup").status is Health.DOWN
    failed = [a.event for a in acts if isinstance(a, EmitEvent) and a.event.outcome == "failed"]
    assert failed
    assert "never registered" in failed[0].reason
    assert d.target() == "third"
    d.complete()
    assert d.state.active == "third"


def test_switch_in_flight_blocks_decisions_but_records_health() -> None:
    d = Driver(make_config(down_after=1, up_after=1))
    all_up(d, "primary", "backup")
    d.report("primary", "down")
    assert d.target() == "backup"
    n = len(d.actions)
    d.report("backup", "down")  # recorded, but no new decision while switching
    assert len(d.actions) == n
    assert d.state.layer("backup").status is Health.DOWN
    d.report("primary", "up")
    d.complete()
    # The switch verified backup, which beats a report from before it; decisions resume.
    assert d.state.active == "backup"
    d.report("backup", "down")
    assert d.target() == "primary"  # held down after its flap, but the only working layer


def test_switch_timeout_counts_as_failure() -> None:
    d = Driver(make_config(down_after=1, up_after=1, switch_timeout=30.0))
    all_up(d, "primary", "backup")
    d.report("primary", "down")
    d.tick(d.now + 31.0)
    assert d.state.layer("backup").status is Health.DOWN
    assert any(r.outcome == "failed" and "timed out" in r.reason for r in d.records())


def test_manual_switch_pins_until_the_layer_goes_down() -> None:
    d = Driver(make_config(down_after=1, up_after=1, failback_stable=0.0, hold_down=0.0))
    all_up(d, "primary", "backup")
    d.feed(ManualSwitch(layer="backup", now=d.now))
    assert d.target() == "backup"
    assert d.records()[-1].kind == "manual"
    d.complete()
    d.tick(d.now + 500)
    assert d.state.active == "backup"  # primary is up, but the user pinned backup
    d.report("backup", "down")
    assert d.target() == "primary"
    assert d.state.pinned is None


def test_manual_unpin_and_unknown_layer() -> None:
    d = Driver(make_config(down_after=1, up_after=1, failback_stable=0.0, hold_down=0.0))
    all_up(d, "primary", "backup")
    acts = d.feed(ManualSwitch(layer="nope", now=d.now))
    assert isinstance(acts[0], EmitEvent)
    assert acts[0].event.outcome == "rejected"
    d.feed(ManualSwitch(layer="backup", now=d.now))
    d.complete()
    d.feed(ManualSwitch(layer=None, now=d.now + 1))
    assert d.target() == "primary"


def test_drill_moves_down_then_fails_back() -> None:
    d = Driver(make_config(up_after=1, failback_stable=10.0, hold_down=0.0))
    all_up(d, "primary", "backup")
    d.feed(Drill(now=d.now))
    assert d.target() == "backup"
    assert d.records()[-1].kind == "drill"
    d.complete()
    d.tick(d.now + 11.0)
    assert d.target() == "primary"


def test_drill_without_a_lower_layer_is_rejected() -> None:
    d = Driver(make_config(up_after=1))
    d.report("primary", "up")
    acts = d.feed(Drill(now=d.now))
    assert [a.event.outcome for a in acts if isinstance(a, EmitEvent)] == ["rejected"]
    assert d.target() is None


def test_startup_without_active_picks_highest_usable() -> None:
    d = Driver(make_config(up_after=2), active=None)
    d.report("backup", "up", times=2)
    assert d.target() == "backup"
    assert d.records()[-1].kind == "initial"


def test_radio_up_and_down_for_sleeping_layers() -> None:
    layers = (
        LayerSpec(name="primary", modem="m0", profile="89000000000000000011", role="primary"),
        LayerSpec(
            name="backup",
            modem="m1",
            profile="89000000000000000029",
            radio_down_when_inactive=True,
        ),
    )
    d = Driver(
        PolicyConfig(layers=layers, down_after=1, up_after=1, failback_stable=5.0, hold_down=0.0)
    )
    d.report("primary", "up")
    d.report("backup", "down")  # radio off: reports from a sleeping layer are ignored
    d.report("primary", "down")
    assert isinstance(d.actions[-3], RadioUp)
    assert d.target() == "backup"
    d.complete()
    d.report("primary", "up")
    d.tick(d.now + 6)
    acts = d.complete()
    assert RadioDown(modem="m1") in acts


def test_transition_event_serialises_to_json() -> None:
    d = Driver(make_config(down_after=1, up_after=1))
    all_up(d, "primary", "backup")
    d.report("primary", "down")
    data = json.loads(msgspec.json.encode(d.records()[-1]))
    assert {"id", "from_layer", "to_layer", "reason", "detected_at", "decided_at"} <= set(data)
    assert data["switched_at"] is None
    assert data["to_profile"] == "89000000000000000029"


def test_unknown_layer_report_is_ignored() -> None:
    d = Driver(make_config())
    before = d.state
    d.feed(LayerHealth(layer="ghost", health=Health.DOWN, now=1.0))
    assert d.state.layers == before.layers


# --- properties ---------------------------------------------------------------------------

NAMES = [sp.name for sp in LAYERS]
REGULAR = [sp.name for sp in LAYERS if sp.role != "emergency"]

event_steps = st.one_of(
    st.tuples(
        st.just("health"),
        st.sampled_from(NAMES),
        st.sampled_from(["up", "degraded", "down", "unknown"]),
        st.floats(0, 20),
    ),
    st.tuples(st.just("tick"), st.floats(0, 200)),
    st.tuples(st.just("done"), st.booleans(), st.floats(0, 5)),
    st.tuples(st.just("manual"), st.sampled_from([*REGULAR, None])),
    st.tuples(st.just("drill")),
)


def usable(state: PolicyState, name: str) -> bool:
    return state.layer(name).status in (Health.UP, Health.DEGRADED)


@settings(max_examples=300, deadline=None)
@given(
    steps=st.lists(event_steps, max_size=80),
    start_active=st.sampled_from([*NAMES, None]),
    counts=st.tuples(st.integers(1, 3), st.integers(1, 3)),
)
def test_random_sequences_keep_invariants(
    steps: list[tuple[object, ...]], start_active: str | None, counts: tuple[int, int]
) -> None:
    cfg = make_config(down_after=counts[0], up_after=counts[1], failback_stable=30.0)
    state = initial_state(cfg, 0.0, active=start_active)
    now = 0.0
    for step in steps:
        kind = step[0]
        event: Event
        if kind == "health":
            now += float(step[3])  # type: ignore[arg-type]
            event = LayerHealth(layer=str(step[1]), health=Health(str(step[2])), now=now)
        elif kind == "tick":
            now += float(step[1])  # type: ignore[arg-type]
            event = Tick(now=now)
        elif kind == "done":
            now += float(step[2])  # type: ignore[arg-type]
            event = SwitchDone(layer=state.target or "primary", ok=bool(step[1]), now=now)
        elif kind == "manual":
            event = ManualSwitch(layer=step[1], now=now)  # type: ignore[arg-type]
        else:
            event = Drill(now=now)
        state, actions = transition(state, event)

        activations = [a for a in actions if isinstance(a, ActivateLayer)]
        assert len(activations) <= 1
        if activations:
            assert state.phase is Phase.SWITCHING
            assert state.target == activations[0].layer
        if state.phase is Phase.SWITCHING:
            continue
        # Some layer works: something that is not down is active.
        if any(usable(state, n) for n in NAMES):
            assert state.active is not None
            assert state.layer(state.active).status is not Health.DOWN
        # Emergency stays dormant while a higher layer works (outside a switch and a pin).
        if state.emergency_enabled and state.pinned is None:
            assert not any(usable(state, n) for n in REGULAR)
        if state.active == "sos" and state.pinned is None:
            assert state.emergency_enabled


def test_initial_state_rejects_duplicate_names() -> None:
    with pytest.raises(ValueError, match="unique"):
        initial_state(PolicyConfig(layers=(LAYERS[0], LAYERS[0])), 0.0)


def test_a_layer_sharing_its_modem_with_a_higher_one_is_cold() -> None:
    """One WWAN card, two profiles: the second can't be probed while the first runs."""
    from agent.config import parse_config

    cfg = parse_config(
        {
            "device_id": "laptop",
            "modems": [{"id": "wwan", "port": "/dev/ttyUSB2"}],
            "layers": [
                {
                    "name": "home",
                    "modem": "wwan",
                    "profile": "89000000000000000011",
                    "role": "primary",
                },
                {"name": "travel", "modem": "wwan", "profile": "89000000000000000029"},
            ],
        }
    )
    policy_cfg = PolicyConfig.from_config(cfg)
    assert [s.cold for s in policy_cfg.layers] == [False, True]
    d = Driver(policy_cfg, active="home")
    # Its reports while inactive measure the other profile: they must not count.
    d.report("travel", "down", times=5)
    d.report("home", "down", times=1)
    # With no evidence against it, the cold layer is tried when the active one fails.
    assert d.target() == "travel"
    assert d.activations()[-1] == "travel"


def test_a_drill_from_a_pinned_layer_unpins_so_a_dead_drilled_layer_is_left() -> None:
    # Found by test_random_sequences_keep_invariants: pinned primary, drill to backup, backup
    # dies: the pin kept the policy on the dead backup.
    cfg = make_config(down_after=1, up_after=1, failback_stable=30.0)
    state = initial_state(cfg, 0.0, active="backup")
    state, _ = transition(state, ManualSwitch(layer="primary", now=0.0))
    state, _ = transition(state, SwitchDone(layer="primary", ok=True, now=0.0))
    state, _ = transition(state, LayerHealth(layer="backup", health=Health.UP, now=0.0))
    state, _ = transition(state, Drill(now=0.0))
    assert state.pinned is None
    state, _ = transition(state, SwitchDone(layer="backup", ok=True, now=0.0))
    state, actions = transition(state, LayerHealth(layer="backup", health=Health.DOWN, now=0.0))
    assert state.active != "backup" or any(isinstance(a, ActivateLayer) for a in actions)
