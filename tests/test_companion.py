"""Companion mode and the group emergency gate in the policy engine: a sibling layer is a layer
whose health comes from MQTT; our own profile sleeps while the sibling carries us."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.config import parse_config
from agent.policy.engine import (
    Action,
    ActivateLayer,
    DisableEmergency,
    EmitEvent,
    EnableEmergency,
    GroupWake,
    Health,
    LayerHealth,
    PolicyConfig,
    PolicyState,
    SleepLayer,
    SwitchDone,
    Tick,
    initial_state,
    transition,
)
from agent.siblings.view import (
    SiblingAvailability,
    SiblingObservation,
    SiblingState,
    observe,
    sibling_health,
)

GRACE = 10.0
STABLE = 30.0


def watch_config() -> PolicyConfig:
    data: dict[str, Any] = {
        "device_id": "watch",
        "mqtt": {"enabled": True},
        "group": {"name": "family", "devices": ["phone", "watch", "tablet"]},
        "timers": {"companion_grace": GRACE, "failback_stable": STABLE, "hold_down": 5.0},
        "modems": [{"id": "m0", "port": "/dev/ttyUSB2"}],
        "layers": [
            {"name": "phone-hotspot", "device": "phone", "role": "primary"},
            {"name": "own", "modem": "m0", "profile": "89000000000000000029"},
        ],
    }
    return PolicyConfig.from_config(parse_config(data))


def tablet_config() -> PolicyConfig:
    data: dict[str, Any] = {
        "device_id": "tablet",
        "mqtt": {"enabled": True},
        "group": {
            "name": "family",
            "devices": ["phone", "watch", "tablet"],
            "emergency_devices": ["tablet"],
        },
        "modems": [{"id": "m0", "port": "/dev/ttyUSB2"}],
        "layers": [
            {
                "name": "sos",
                "modem": "m0",
                "profile": "89000000000000000037",
                "role": "emergency",
                "scope": "group",
            }
        ],
    }
    return PolicyConfig.from_config(parse_config(data))


def finish(
    state: PolicyState, actions: list[Action], now: float
) -> tuple[PolicyState, list[Action]]:
    """Complete every ActivateLayer as the daemon would (ok), collecting all actions."""
    out = list(actions)
    for a in actions:
        if isinstance(a, ActivateLayer):
            state, more = transition(state, SwitchDone(layer=a.layer, ok=True, now=now))
            state, more = finish(state, more, now)
            out += more
    return state, out


def test_from_config_marks_sibling_and_companion_layers() -> None:
    cfg = watch_config()
    hotspot, own = cfg.layers
    assert hotspot.device == "phone"
    assert not hotspot.dormant
    assert own.companion
    assert own.dormant
    assert not own.cold


def test_companion_story_last_will_own_profile_then_sleep_again() -> None:
    s = initial_state(watch_config(), now=0.0)
    s, acts = transition(s, Tick(now=0.0))
    assert acts == []  # no verdict on the phone yet: our own profile stays asleep
    s, acts = finish(*transition(s, LayerHealth(layer="phone-hotspot", health=Health.UP, now=1)), 1)
    first = next(a for a in acts if isinstance(a, ActivateLayer))
    assert (first.layer, first.device, first.modem) == ("phone-hotspot", "phone", "")
    # The phone's Last Will: our own profile wakes at once.
    s, acts = finish(
        *transition(s, LayerHealth(layer="phone-hotspot", health=Health.DOWN, now=50)), 50
    )
    assert [a.layer for a in acts if isinstance(a, ActivateLayer)] == ["own"]
    assert s.active == "own"
    # The record names no profile for the sibling side (null, not ""), ours for our own.
    record = next(a.event for a in acts if isinstance(a, EmitEvent))
    assert (record.from_profile, record.to_profile) == (None, "89000000000000000029")
    # The phone is back: only after failback_stable does the own profile go back to sleep.
    s, acts = transition(s, LayerHealth(layer="phone-hotspot", health=Health.UP, now=60))
    s, acts = transition(s, Tick(now=60 + STABLE - 1))
    assert acts == []
    s, acts = finish(*transition(s, Tick(now=60 + STABLE)), 60 + STABLE)
    assert [a.layer for a in acts if isinstance(a, ActivateLayer)] == ["phone-hotspot"]
    assert SleepLayer(layer="own", modem="m0", profile="89000000000000000029") in acts
    assert s.active == "phone-hotspot"


def test_a_failed_switch_to_our_own_profile_puts_it_back_to_sleep() -> None:
    # The safe switch leaves the new profile enabled when there was none to roll back to (the
    # companion's data path died too). Were it left on, the phone coming back would find our
    # own profile still enabled beside it (found end to end, tests/test_e2e_siblings.py).
    s = initial_state(watch_config(), now=0.0)
    s, _ = finish(*transition(s, LayerHealth(layer="phone-hotspot", health=Health.UP, now=1)), 1)
    s, acts = transition(s, LayerHealth(layer="phone-hotspot", health=Health.DOWN, now=50))
    assert [a.layer for a in acts if isinstance(a, ActivateLayer)] == ["own"]
    s, acts = transition(s, SwitchDone(layer="own", ok=False, now=51, reason="verify failed"))
    assert SleepLayer(layer="own", modem="m0", profile="89000000000000000029") in acts
    assert s.active == "phone-hotspot"
    assert s.target is None


def test_group_emergency_waits_for_the_group() -> None:
    s = initial_state(tablet_config(), now=0.0)
    s, acts = transition(s, Tick(now=1.0))
    assert acts == []  # alone, it would wake; a group emergency waits for its claim
    s, acts = finish(*transition(s, GroupWake(awake=True, now=2.0)), 2.0)
    assert EnableEmergency(layer="sos") in acts
    assert s.active == "sos"
    s, acts = transition(s, GroupWake(awake=False, now=3.0))
    assert DisableEmergency(layer="sos") in acts
    assert s.active is None
    assert not s.emergency_enabled


# One sibling event: the phone goes offline/online, loses/regains connectivity, or time passes.
_step = st.one_of(
    st.tuples(st.just("avail"), st.booleans()),
    st.tuples(st.just("conn"), st.booleans()),
    st.tuples(st.just("wait"), st.floats(0.1, 40.0)),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(_step, max_size=40))
def test_companion_invariants_over_random_sibling_histories(steps: list[tuple[str, Any]]) -> None:
    """Own profile wakes only after the phone was judged down; once the phone is back and
    stable, the own profile is asleep again."""
    s = initial_state(watch_config(), now=0.0)
    obs = SiblingObservation(since=0.0)
    now = 0.0
    own_on = False

    def feed(s: PolicyState, now: float) -> PolicyState:
        nonlocal own_on
        h, _ = sibling_health(obs, now=now, grace=GRACE, broker_connected=True, broker_since=0.0)
        s, acts = finish(*transition(s, LayerHealth(layer="phone-hotspot", health=h, now=now)), now)
        s, more = finish(*transition(s, Tick(now=now)), now)
        for a in acts + more:
            if isinstance(a, ActivateLayer) and a.layer == "own":
                assert h is Health.DOWN or own_on
                own_on = True
            if isinstance(a, SleepLayer):
                own_on = False
        return s

    for kind, value in steps:
        if kind == "avail":
            obs = observe(obs, SiblingAvailability(device="phone", online=value), now)
        elif kind == "conn":
            obs = observe(obs, SiblingState(device="phone", connectivity=value), now)
        else:
            now += value
        s = feed(s, now)
    # All heal: the phone is online and connected, and stays so past failback_stable.
    obs = observe(obs, SiblingAvailability(device="phone", online=True), now)
    obs = observe(obs, SiblingState(device="phone", connectivity=True), now)
    for dt in (0.0, 1.0, STABLE / 2, STABLE + 1, 2 * STABLE + 10, 700.0):
        s = feed(s, now + dt)
    assert s.active == "phone-hotspot"
    assert not own_on


def test_sibling_layers_feed_the_engine_from_mqtt_messages() -> None:
    from agent.siblings.layers import SiblingLayers

    data: dict[str, Any] = {
        "device_id": "watch",
        "mqtt": {"enabled": True},
        "group": {"name": "family", "devices": ["phone", "watch"]},
        "timers": {"companion_grace": GRACE},
        "modems": [{"id": "m0", "port": "/dev/ttyUSB2"}],
        "layers": [
            {"name": "hotspot", "device": "phone", "role": "primary"},
            {"name": "own", "modem": "m0", "profile": "89000000000000000029"},
        ],
    }
    sl = SiblingLayers(parse_config(data), now=0.0)
    assert sl.subscriptions() == [
        "esim-agent/phone/availability",
        "esim-agent/phone/state",
        "esim-agent/watch/availability",
        "esim-agent/watch/state",
    ]
    # Until the sibling's state arrives there is no verdict (not a usable guess).
    assert [e.health for e in sl.on_broker(True, 0.0)] == [Health.UNKNOWN]
    state = b'{"device_id":"phone","connectivity":true}'
    assert sl.on_message("esim-agent/phone/availability", b"online", 1.0) == []
    assert [e.health for e in sl.on_message("esim-agent/phone/state", state, 1.0)] == [Health.UP]
    assert sl.on_message("esim-agent/phone/state", state, 2.0) == []  # only changes
    (ev,) = sl.on_message("esim-agent/phone/availability", b"offline", 3.0)
    assert (ev.layer, ev.health, ev.reason) == (
        "hotspot",
        Health.DOWN,
        "sibling offline (Last Will)",
    )
    assert sl.on_message("esim-agent/tv/availability", b"online", 4.0) == []


def test_a_sibling_never_heard_is_unknown_then_down_after_the_grace() -> None:
    from agent.siblings.layers import SiblingLayers

    data: dict[str, Any] = {
        "device_id": "watch",
        "mqtt": {"enabled": True},
        "group": {"name": "family", "devices": ["phone", "watch"]},
        "timers": {"companion_grace": GRACE},
        "modems": [{"id": "m0", "port": "/dev/ttyUSB2"}],
        "layers": [
            {"name": "hotspot", "device": "phone", "role": "primary"},
            {"name": "own", "modem": "m0", "profile": "89000000000000000029"},
        ],
    }
    sl = SiblingLayers(parse_config(data), now=0.0)
    (ev,) = sl.evaluate(0.0)  # no broker yet
    assert ev.health is Health.UNKNOWN
    assert sl.on_broker(True, 1.0) == []
    assert sl.on_message("esim-agent/phone/availability", b"online", 2.0) == []
    (ev,) = sl.evaluate(2.0 + GRACE + 0.1)  # the grace runs from its last change
    assert ev.health is Health.DOWN
    # Heard, then the broker goes: the grace applies (degraded), a verdict already given.
    state = b'{"device_id":"phone","connectivity":true}'
    (ev,) = sl.on_message("esim-agent/phone/state", state, 20.0)
    assert ev.health is Health.UP
    (ev,) = sl.on_broker(False, 21.0)
    assert ev.health is Health.DEGRADED
