"""Pure layer-health rules: modem signals plus probe windows in, one LayerHealth out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import msgspec

from agent.health.window import ProbeWindow
from agent.models import ModemInfo

HealthState = Literal["up", "degraded", "down", "unknown"]

REGISTERED_STATES = frozenset({"home", "roaming"})
NOT_REGISTERED_STATES = frozenset({"searching", "denied", "not_registered"})


class ModemSignals(msgspec.Struct, kw_only=True, frozen=True):
    """What the modem says about a layer; every field None means "not known yet"."""

    sim_ready: bool | None = None
    registration: str | None = None
    rssi_dbm: float | None = None
    rsrp_dbm: float | None = None
    data_active: bool | None = None

    @property
    def registered(self) -> bool | None:
        """True on home/roaming, False on searching/denied/not_registered, None otherwise."""
        if self.registration in REGISTERED_STATES:
            return True
        if self.registration in NOT_REGISTERED_STATES:
            return False
        return None


def signals_from_modem_info(info: ModemInfo, data_active: bool | None = None) -> ModemSignals:
    """Fold a ModemInfo reading into the signals the health rules use."""
    sim = info.sim.state
    return ModemSignals(
        sim_ready=None if sim == "unknown" else sim == "ready",
        registration=info.registration.state,
        rssi_dbm=info.signal.rssi_dbm,
        rsrp_dbm=info.signal.rsrp_dbm,
        data_active=data_active,
    )


@dataclass(frozen=True, slots=True)
class Thresholds:
    """Limits for evaluate(); the defaults follow mwan3 (5 rounds down, 5 rounds up)."""

    rssi_dbm_min: float = -105.0
    rsrp_dbm_min: float = -120.0
    down_after: int = 5
    up_after: int = 5
    degraded_ratio: float = 0.8


class LayerHealth(msgspec.Struct, kw_only=True, frozen=True):
    """A layer's state and a stable snake_case reason, optionally followed by `: detail`."""

    state: HealthState
    reason: str


UNKNOWN = LayerHealth(state="unknown", reason="no_data")


def _names(windows: dict[str, ProbeWindow]) -> str:
    return ", ".join(sorted(windows))


def evaluate(
    modem: ModemSignals | None,
    probes: dict[str, ProbeWindow],
    thresholds: Thresholds,
    previous: LayerHealth | None = None,
) -> LayerHealth:
    """Judge a layer; `previous` adds hysteresis so down → up needs `up_after` good rounds."""
    if modem is not None:
        if modem.sim_ready is False:
            return LayerHealth(state="down", reason="sim_not_ready")
        if modem.registered is False:
            return LayerHealth(state="down", reason="not_registered")
        if modem.data_active is False:
            return LayerHealth(state="down", reason="data_inactive")

    sampled = {name: w for name, w in probes.items() if w.samples}
    failing = {name: w for name, w in sampled.items() if w.consecutive_failures > 0}
    if sampled and all(w.consecutive_failures >= thresholds.down_after for w in sampled.values()):
        return LayerHealth(state="down", reason=f"probes_failing: {_names(sampled)}")
    if (
        previous is not None
        and previous.state == "down"
        and sampled
        and max(w.consecutive_successes for w in sampled.values()) < thresholds.up_after
    ):
        return LayerHealth(state="down", reason="recovering")

    if modem is not None and (
        (modem.rssi_dbm is not None and modem.rssi_dbm < thresholds.rssi_dbm_min)
        or (modem.rsrp_dbm is not None and modem.rsrp_dbm < thresholds.rsrp_dbm_min)
    ):
        return LayerHealth(state="degraded", reason="weak_signal")
    if failing:
        return LayerHealth(state="degraded", reason=f"probes_failing: {_names(failing)}")
    flaky = {
        name: w
        for name, w in sampled.items()
        if (w.ratio or 0.0) < thresholds.degraded_ratio
        and w.consecutive_successes < thresholds.up_after
    }
    if flaky:
        return LayerHealth(state="degraded", reason=f"probes_flaky: {_names(flaky)}")

    if sampled:
        return LayerHealth(state="up", reason="ok")
    if probes:
        return LayerHealth(state="unknown", reason="waiting_for_probes")
    if modem is not None and modem.sim_ready and modem.registered:
        return LayerHealth(state="up", reason="ok")
    return UNKNOWN
