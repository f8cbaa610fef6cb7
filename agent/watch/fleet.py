"""Every agent on a broker, folded from the retained topics they publish: pure, no I/O.

`Fleet.ingest(topic, payload)` takes one MQTT message and says whether the view changed;
`Fleet.snapshot()` is the `esim-agent watch --json` document (docs/watch.md). A payload that
fails its schema is dropped and counted, never raised: one broken sibling must not blank the
view of the others.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec
import structlog

from agent.mqtt.payloads import DeviceState, Event, LayersState, ModemState, utc_now

log = structlog.get_logger(__name__)

#: Thresholds of `quota_alert` (agent/usage): the view marks the highest one a share has crossed.
QUOTA_THRESHOLDS = (50, 75, 90)
MAX_BARS = 4
# RSSI (27.007 +CSQ, dBm) and RSRP (LTE, dBm) lower bounds of 1..4 bars.
_RSSI_STEPS = (-105, -95, -85, -75)
_RSRP_STEPS = (-120, -110, -100, -90)
MAX_LOGGED_REJECTS = 1000
#: Device ids beyond this many are ignored: anyone who may publish under the base topic could
#: otherwise grow the view (and our memory) without bound.
MAX_DEVICES = 10_000


class UsageShare(msgspec.Struct, kw_only=True):
    """`usage/<iccid>`: the keys the view reads (the rest are ignored)."""

    iccid: str
    period: str
    total_bytes: int
    quota_bytes: int | None = None
    percent: float | None = None


class PoolShare(msgspec.Struct, kw_only=True):
    """`usage/pool/<pool>`: one device's view of a shared pool."""

    name: str
    period: str
    local_bytes: int
    total_bytes: int
    quota_bytes: int
    percent: float


class HealthView(msgspec.Struct, kw_only=True):
    """`health/<layer>`: the keys the view reads."""

    layer: str
    status: str = "unknown"
    latency_ms: float | None = None


class Timings(msgspec.Struct, kw_only=True):
    """`timings_ms` of a transition record."""

    detect_to_decide: float | None = None
    decide_to_switch: float | None = None
    switch_to_verify: float | None = None
    total: float | None = None


class TransitionView(msgspec.Struct, kw_only=True):
    """A transition record (retained `transition`, or a `transition` event): its times are the
    publishing device's wall clock (ISO 8601 UTC) and its durations are measured on that device,
    so they mean the same on any host that reads them."""

    id: str | None = None
    kind: str | None = None
    outcome: str | None = None
    from_layer: str | None = None
    to_layer: str | None = None
    from_profile: str | None = None
    to_profile: str | None = None
    reason: str | None = None
    detected_at: str | None = None
    decided_at: str | None = None
    switched_at: str | None = None
    verified_at: str | None = None
    timings_ms: Timings = msgspec.field(default_factory=Timings)


def signal_bars(rssi_dbm: float | None, rsrp_dbm: float | None) -> int | None:
    """0..4 bars from RSRP when the modem gives it (LTE/NR), else RSSI; None when neither."""
    value, steps = (rsrp_dbm, _RSRP_STEPS) if rsrp_dbm is not None else (rssi_dbm, _RSSI_STEPS)
    if value is None:
        return None
    return sum(1 for step in steps if value >= step)


def crossed(percent: float | None) -> int | None:
    """The highest quota threshold `percent` has reached, or None."""
    if percent is None:
        return None
    reached = [t for t in QUOTA_THRESHOLDS if percent >= t]
    return reached[-1] if reached else None


@dataclass(slots=True)
class DeviceView:
    """What the broker says about one device."""

    device_id: str
    availability: str | None = None
    state: DeviceState | None = None
    modems: dict[str, ModemState] = field(default_factory=dict)
    layers: LayersState | None = None
    health: dict[str, HealthView] = field(default_factory=dict)
    usage: dict[str, UsageShare] = field(default_factory=dict)
    pools: dict[str, PoolShare] = field(default_factory=dict)
    last_transition: TransitionView | None = None
    quota_events: dict[str, dict[str, Any]] = field(default_factory=dict)

    def alerts(self) -> list[dict[str, Any]]:
        """Open alerts: what a person watching should act on, derived from the current state."""
        out: list[dict[str, Any]] = []
        if self.availability == "offline":
            out.append({"kind": "offline", "subject": self.device_id, "detail": "Last Will"})
        elif self.state is not None and not self.state.connectivity:
            out.append({"kind": "no_connectivity", "subject": self.device_id, "detail": None})
        for modem in self.modems.values():
            if not modem.online:
                out.append({"kind": "modem_offline", "subject": modem.id, "detail": None})
        if self.layers is not None:
            for layer in self.layers.layers:
                status = self.health[layer.name].status if layer.name in self.health else None
                if (status or layer.health) == "down":
                    out.append({"kind": "layer_down", "subject": layer.name, "detail": None})
        quota: dict[str, tuple[int, str]] = {}
        for share in self.usage.values():
            if (t := crossed(share.percent)) is not None:
                quota[share.iccid] = (t, share.period)
        for pool in self.pools.values():
            if (t := crossed(pool.percent)) is not None:
                quota[f"pool:{pool.name}"] = (t, pool.period)
        for subject, data in self.quota_events.items():
            threshold = int(data.get("threshold", 0))
            if threshold > quota.get(subject, (0, ""))[0]:
                quota[subject] = (threshold, str(data.get("period", "")))
        for subject, (threshold, period) in sorted(quota.items()):
            out.append({"kind": "quota", "subject": subject, "detail": f"{threshold}% of {period}"})
        return out

    def to_dict(self) -> dict[str, Any]:
        """The device's entry in the `--json` snapshot (docs/watch.md)."""
        state = self.state
        layers = self.layers.layers if self.layers is not None else []
        return {
            "device_id": self.device_id,
            "availability": self.availability,
            "connectivity": state.connectivity if state is not None else None,
            "active_layer": state.active_layer if state is not None else None,
            "active_profile": state.active_profile if state is not None else None,
            "updated_at": state.updated_at if state is not None else None,
            "modems": [
                {
                    "id": m.id,
                    "online": m.online,
                    "signal_bars": signal_bars(m.signal.rssi_dbm, m.signal.rsrp_dbm),
                    "rssi_dbm": m.signal.rssi_dbm,
                    "rsrp_dbm": m.signal.rsrp_dbm,
                    "registration": m.registration.state,
                    "operator": m.operator.name,
                }
                for m in sorted(self.modems.values(), key=lambda m: m.id)
            ],
            "layers": [
                {
                    "name": layer.name,
                    "role": layer.role,
                    "health": (
                        self.health[layer.name].status
                        if layer.name in self.health
                        else layer.health
                    ),
                    "latency_ms": (
                        self.health[layer.name].latency_ms if layer.name in self.health else None
                    ),
                    "active": layer.active,
                }
                for layer in layers
            ],
            "usage": [
                {
                    "iccid": u.iccid,
                    "period": u.period,
                    "total_bytes": u.total_bytes,
                    "quota_bytes": u.quota_bytes,
                    "percent": u.percent,
                }
                for u in sorted(self.usage.values(), key=lambda u: u.iccid)
            ],
            "pools": [
                {
                    "name": p.name,
                    "period": p.period,
                    "local_bytes": p.local_bytes,
                    "total_bytes": p.total_bytes,
                    "quota_bytes": p.quota_bytes,
                    "percent": p.percent,
                }
                for p in sorted(self.pools.values(), key=lambda p: p.name)
            ],
            "last_transition": (
                msgspec.to_builtins(self.last_transition)
                if self.last_transition is not None
                else None
            ),
            "alerts": self.alerts(),
        }


class Fleet:
    """Devices under one base topic, updated message by message."""

    def __init__(self, base_topic: str) -> None:
        self.base = base_topic
        self.devices: dict[str, DeviceView] = {}
        self.rejected = 0
        self._logged: set[tuple[str, str]] = set()

    @property
    def filters(self) -> list[str]:
        """The subscriptions the view needs (command topics and discovery stay out)."""
        b = self.base
        return [
            f"{b}/+/availability",
            f"{b}/+/state",
            f"{b}/+/modems/+",
            f"{b}/+/layers",
            f"{b}/+/health/+",
            f"{b}/+/usage/#",
            f"{b}/+/transition",
            f"{b}/+/events",
        ]

    def ingest(self, topic: str, payload: bytes) -> bool:
        """Fold one message in; True when the view changed. Never raises on bad input."""
        prefix = f"{self.base}/"
        if not topic.startswith(prefix):
            return False
        parts = topic[len(prefix) :].split("/")
        if len(parts) < 2 or not parts[0]:
            return False
        device_id, key = parts[0], parts[1:]
        try:
            return self._apply(device_id, key, payload)
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError, TypeError) as exc:
            self._reject(device_id, "/".join(key), str(exc))
            return False

    def _reject(self, device_id: str, key: str, why: str) -> None:
        self.rejected += 1
        # Once per (device, key): a sibling stuck on a bad payload must not flood the log.
        if (device_id, key) not in self._logged and len(self._logged) < MAX_LOGGED_REJECTS:
            self._logged.add((device_id, key))
            log.warning("watch_payload_invalid", device=device_id, key=key, error=why)

    def _device(self, device_id: str) -> DeviceView:
        view = self.devices.get(device_id)
        if view is None:
            if len(self.devices) >= MAX_DEVICES:
                raise ValueError(f"more than {MAX_DEVICES} devices")
            view = self.devices[device_id] = DeviceView(device_id)
        return view

    def _apply(self, device_id: str, key: list[str], payload: bytes) -> bool:
        head, rest = key[0], key[1:]
        if head == "events" and not rest:
            return self._event(device_id, payload)
        if not payload:
            return self._forget(device_id, key)
        view = self._device(device_id)
        if head == "availability" and not rest:
            text = payload.decode("utf-8", "strict").strip()
            if text not in ("online", "offline"):
                raise ValueError(f"availability {text!r}")
            return _set(view, "availability", text)
        if head == "state" and not rest:
            state = msgspec.json.decode(payload, type=DeviceState)
            if state.device_id != device_id:
                raise ValueError(f"state of {state.device_id!r} under {device_id!r}")
            return _set(view, "state", state)
        if head == "modems" and len(rest) == 1:
            modem = msgspec.json.decode(payload, type=ModemState)
            return _put(view.modems, rest[0], modem)
        if head == "layers" and not rest:
            return _set(view, "layers", msgspec.json.decode(payload, type=LayersState))
        if head == "health" and len(rest) == 1:
            return _put(view.health, rest[0], msgspec.json.decode(payload, type=HealthView))
        if head == "usage" and len(rest) == 2 and rest[0] == "pool":
            return _put(view.pools, rest[1], msgspec.json.decode(payload, type=PoolShare))
        if head == "usage" and len(rest) == 1:
            return _put(view.usage, rest[0], msgspec.json.decode(payload, type=UsageShare))
        if head == "transition" and not rest:
            record = msgspec.json.decode(payload, type=TransitionView)
            return _set(view, "last_transition", record)
        return False

    def _forget(self, device_id: str, key: list[str]) -> bool:
        """An empty retained payload deletes what it names."""
        view = self.devices.get(device_id)
        if view is None:
            return False
        head, rest = key[0], key[1:]
        if head == "modems" and len(rest) == 1:
            return view.modems.pop(rest[0], None) is not None
        if head == "health" and len(rest) == 1:
            return view.health.pop(rest[0], None) is not None
        if head == "usage" and len(rest) == 2 and rest[0] == "pool":
            return view.pools.pop(rest[1], None) is not None
        if head == "usage" and len(rest) == 1:
            return view.usage.pop(rest[0], None) is not None
        if head == "state" and not rest:
            return _set(view, "state", None)
        if head == "layers" and not rest:
            return _set(view, "layers", None)
        return False

    def _event(self, device_id: str, payload: bytes) -> bool:
        event = msgspec.json.decode(payload, type=Event)
        if event.type == "transition":
            record = msgspec.convert(event.data, type=TransitionView)
            return _set(self._device(device_id), "last_transition", record)
        if event.type == "quota_alert":
            subject = event.data.get("subject")
            if not isinstance(subject, str):
                raise ValueError("quota_alert without a subject")
            return _put(self._device(device_id).quota_events, subject, dict(event.data))
        return False

    def snapshot(
        self, *, broker: str, complete: bool, settled: str | None = None
    ) -> dict[str, Any]:
        """The `esim-agent watch --json` document; `settled` says how the snapshot knew it was
        done (`marker`, `quiet`, `timeout`; None for the live view)."""
        return {
            "base_topic": self.base,
            "broker": broker,
            "taken_at": utc_now(),
            "complete": complete,
            "settled": settled,
            "rejected": self.rejected,
            "devices": [self.devices[d].to_dict() for d in sorted(self.devices)],
        }


def _set(view: DeviceView, name: str, value: object) -> bool:
    if getattr(view, name) == value:
        return False
    setattr(view, name, value)
    return True


def _put(table: dict[str, Any], key: str, value: object) -> bool:
    if table.get(key) == value:
        return False
    table[key] = value
    return True
