"""The daemon's side of a group without a broker: what SIGHUP refuses, and what the claim is
told about this device's own policy."""

from __future__ import annotations

import copy
from typing import Any

from agent.config import parse_config
from agent.daemon.reload import plan, restart_needed
from agent.daemon.siblings import SiblingSide
from agent.policy.engine import (
    ActivateLayer,
    GroupWake,
    Health,
    LayerHealth,
    PolicyConfig,
    SwitchDone,
    initial_state,
    transition,
)

TABLET: dict[str, Any] = {
    "device_id": "tablet",
    "mqtt": {"enabled": True},
    "group": {
        "name": "family",
        "devices": ["phone", "watch", "tablet"],
        "emergency_devices": ["tablet"],
    },
    "modems": [{"id": "m0", "port": "/dev/ttyUSB2"}],
    "layers": [
        {"name": "hotspot", "device": "phone", "role": "primary"},
        {
            "name": "sos",
            "modem": "m0",
            "profile": "89000000000000000037",
            "role": "emergency",
            "scope": "group",
        },
    ],
}


def test_sighup_refuses_group_changes_and_takes_others() -> None:
    old = parse_config(TABLET)
    same = copy.deepcopy(TABLET)
    same["policy"] = {"down_after": 2}
    assert restart_needed(old, parse_config(same)) is None
    # New health thresholds rebuild our own layers' monitors, never the sibling side's.
    health = copy.deepcopy(TABLET)
    health["health"] = {"down_after": 5}
    assert restart_needed(old, parse_config(health)) is None
    diff = plan(old, parse_config(health))
    assert (diff.layers_removed, diff.layers_new) == ({"sos"}, {"sos"})
    group = copy.deepcopy(TABLET)
    group["group"]["claim_ttl"] = 90.0
    assert restart_needed(old, parse_config(group)) == "a change to [group] needs a restart"
    sibling = copy.deepcopy(TABLET)
    sibling["layers"][0]["interface"] = "wlan0"
    why = restart_needed(old, parse_config(sibling))
    assert why is not None
    assert "needs a restart" in why
    base = copy.deepcopy(TABLET)
    base["mqtt"]["base_topic"] = "home"
    why = restart_needed(old, parse_config(base))
    assert why is not None
    assert "needs a restart" in why


class _FakeDaemon:
    """What SiblingSide reads from the daemon: its config, fed health and the policy queue."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.cfg = parse_config(data)
        self.fed: dict[str, tuple[str, str]] = {}
        self.posted: list[object] = []

    def post(self, event: object) -> None:
        self.posted.append(event)

    def publish_summary(self) -> None:
        pass


def test_the_claim_hears_only_changes_of_what_we_carry() -> None:
    d = _FakeDaemon(TABLET)
    side = SiblingSide(d)  # type: ignore[arg-type]
    assert side.enabled
    assert side.claim is not None
    assert side.layers is not None
    policy = initial_state(PolicyConfig.from_config(d.cfg), 0.0)
    side.after_policy(policy)
    policy, acts = transition(policy, LayerHealth(layer="hotspot", health=Health.UP, now=1.0))
    assert [a.layer for a in acts if isinstance(a, ActivateLayer)] == ["hotspot"]
    side.after_policy(policy)  # switching: still nothing carried
    policy, _ = transition(policy, SwitchDone(layer="hotspot", ok=True, now=2.0))
    side.after_policy(policy)
    side.after_policy(policy)
    items = []
    while not side._queue.empty():
        items.append(side._queue.get_nowait())
    # Only changes: nothing carried, then the phone's hotspot (a layer above the emergency).
    assert items == [("local", False, False), ("local", True, True)]
    # The claim's wake goes to the policy as GroupWake.
    side._on_wake(True)
    assert isinstance(d.posted[-1], GroupWake)
    assert d.posted[-1].awake
