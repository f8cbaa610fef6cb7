"""Reload by difference: what a new config changes, and the policy state carried across it.

Pure functions: the daemon builds what `plan()` says is new, and swaps it in only once all of
it was built.
"""

from __future__ import annotations

from dataclasses import dataclass

from msgspec.structs import replace

from agent.config import Config
from agent.policy.engine import LayerState, Phase, PolicyConfig, PolicyState


@dataclass(frozen=True, slots=True)
class ReloadPlan:
    """Names of the parts to stop, (re)build or keep; everything else carries over untouched."""

    modems_removed: frozenset[str]
    modems_new: frozenset[str]  # added or changed: a fresh session
    layers_removed: frozenset[str]
    layers_new: frozenset[str]  # added or changed (or on a fresh session): a fresh monitor
    policy_changed: bool
    mqtt_changed: bool
    control_changed: bool
    state_dir_changed: bool

    @property
    def nothing(self) -> bool:
        """True when the new config changes no running part (usage and hooks aside)."""
        return not (
            self.modems_removed
            or self.modems_new
            or self.layers_removed
            or self.layers_new
            or self.policy_changed
            or self.mqtt_changed
            or self.control_changed
            or self.state_dir_changed
        )


def _session_key(cfg: Config, modem_id: str) -> object:
    m = cfg.modem(modem_id)
    return (m, cfg.state_dir, cfg.timers.rollback_timeout)


def _monitor_key(cfg: Config, name: str) -> object:
    return (cfg.layer(name), cfg.health)


def _mqtt_key(cfg: Config) -> object:
    # The pools' subscriptions: shares from `devices`, availability of the duty order.
    pools = [(p.name, p.devices, p.manager, p.successors) for p in cfg.usage.pools]
    return (cfg.mqtt, cfg.device_id, pools)


def plan(old: Config, new: Config) -> ReloadPlan:
    """What differs between two validated configs, part by part."""
    old_modems = {m.id for m in old.modems}
    new_modems = {m.id for m in new.modems}
    changed_modems = {
        m for m in old_modems & new_modems if _session_key(old, m) != _session_key(new, m)
    }
    modems_new = (new_modems - old_modems) | changed_modems
    old_layers = {x.name for x in old.layers}
    new_layers = {x.name for x in new.layers}
    changed_layers = {
        name
        for name in old_layers & new_layers
        # A sibling layer's monitor belongs to the sibling side, built once at start
        # (restart_needed refuses a change to the layer itself).
        if not new.layer(name).is_sibling
        and (
            _monitor_key(old, name) != _monitor_key(new, name)
            or new.layer(name).modem in modems_new
        )
    }
    return ReloadPlan(
        modems_removed=frozenset((old_modems - new_modems) | changed_modems),
        modems_new=frozenset(modems_new),
        layers_removed=frozenset((old_layers - new_layers) | changed_layers),
        layers_new=frozenset((new_layers - old_layers) | changed_layers),
        policy_changed=PolicyConfig.from_config(old) != PolicyConfig.from_config(new),
        mqtt_changed=_mqtt_key(old) != _mqtt_key(new),
        control_changed=old.control_socket != new.control_socket,
        state_dir_changed=old.state_dir != new.state_dir,
    )


def restart_needed(old: Config, new: Config) -> str | None:
    """Why SIGHUP cannot apply `new`, or None. The sibling view and the group claim are built
    once at start (docs/siblings.md): a change to [group], to sibling layers or to the group
    emergency needs a restart."""
    if old.group != new.group:
        return "a change to [group] needs a restart"

    def group_part(cfg: Config) -> list[object]:
        return [x for x in cfg.layers if x.is_sibling or x.scope == "group"]

    if group_part(old) != group_part(new):
        return "a change to sibling layers or the group emergency layer needs a restart"
    if old.timers.companion_grace != new.timers.companion_grace and group_part(new):
        return "a change to timers.companion_grace needs a restart"
    if old.group is not None and old.mqtt.base_topic != new.mqtt.base_topic:
        return "a change to mqtt.base_topic in a [group] needs a restart"
    return None


def carry_policy(old: PolicyState, config: PolicyConfig) -> PolicyState:
    """The policy state under a new PolicyConfig, keeping what it knew of unchanged layers.

    A layer whose spec is unchanged keeps its health, streaks and hold-down; the active layer
    stays active if it is unchanged; a switch in flight to an unchanged layer stays in flight;
    the transition counter never goes back, so ids stay unique.
    """
    if old.config == config:
        return old
    before = {sp.name: sp for sp in old.config.layers}
    kept = {sp.name for sp in config.layers if sp.name in before and before[sp.name] == sp}
    layers = tuple(
        old.layer(sp.name) if sp.name in kept else LayerState(name=sp.name) for sp in config.layers
    )
    active = old.active if old.active in kept else None
    target = old.target if old.target in kept else None
    if target is not None:
        phase = Phase.SWITCHING
    elif active is not None:
        phase = Phase.ACTIVE
    else:
        phase = Phase.IDLE
    emergency = next((sp.name for sp in config.layers if sp.role == "emergency"), None)
    return replace(
        old,
        config=config,
        layers=layers,
        active=active,
        target=target,
        phase=phase,
        pending=old.pending if target is not None else None,
        switch_started=old.switch_started if target is not None else None,
        pinned=old.pinned if old.pinned in kept else None,
        emergency_enabled=old.emergency_enabled and emergency is not None and emergency in kept,
    )
