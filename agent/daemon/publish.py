"""The daemon's retained MQTT state: modems, profiles, layers, health and the device summary."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import msgspec

from agent.config import LayerConfig
from agent.daemon.session import ModemSession
from agent.health.monitor import LayerSnapshot
from agent.mqtt.bridge import MqttBridge
from agent.mqtt.payloads import (
    DeviceState,
    Event,
    HealthState,
    LayerEntry,
    LayersState,
    ModemState,
    ProfileEntry,
    ProfilesState,
)

#: (state, reason) per layer as last reported to the policy.
FedHealth = Mapping[str, tuple[str, str]]


class StatePublisher:
    """Publishes retained state only when it changed (timestamps aside): siblings on metered
    links should not pay for a poll that found nothing new. A no-op while there is no bridge."""

    def __init__(
        self,
        bridge: Callable[[], MqttBridge | None],
        interface: Callable[[str], str | None] = lambda _: None,
    ) -> None:
        self._bridge = bridge
        self._interface = interface
        self._published: dict[str, Any] = {}
        self._transition: dict[str, Any] | None = None

    def forget(self) -> None:
        """Publish everything again on the next change (a new bridge knows nothing); the last
        transition, which no poll would publish again, goes to the new bridge at once."""
        self._published.clear()
        bridge = self._bridge()
        if bridge is not None and self._transition is not None:
            bridge.publish_state("transition", self._transition)

    def state(self, key: str, payload: msgspec.Struct | Mapping[str, Any]) -> None:
        """Publish `<base>/<device>/<key>` retained, unless it is what we published last."""
        bridge = self._bridge()
        if bridge is None:
            return
        value = msgspec.to_builtins(payload)
        comparable = {k: v for k, v in value.items() if k not in ("updated_at", "checked_at")}
        if self._published.get(key) == comparable:
            return
        self._published[key] = comparable
        bridge.publish_state(key, payload)

    def event(self, type_: str, data: Mapping[str, Any]) -> None:
        """One event on `<base>/<device>/events` (not retained). A finished transition is also
        kept retained on `<base>/<device>/transition`: a viewer that subscribes later (`watch`)
        still sees the last one, which an event it missed cannot give."""
        if type_ == "transition":
            self._transition = dict(data)
        bridge = self._bridge()
        if bridge is None:
            return
        bridge.publish_event(Event(type=type_, data=dict(data)))
        if type_ == "transition":
            bridge.publish_state("transition", data)

    def modem(self, session: ModemSession) -> None:
        """A modem's state and its profile list."""
        if self._bridge() is None:
            return
        if session.info is not None:
            state = ModemState.from_info(
                session.id,
                session.info,
                port=session.port,
                online=session.online,
                eid=session.eid,
                interface=self._interface(session.id),
            )
        else:
            state = ModemState(
                id=session.id,
                port=session.port,
                online=session.online,
                interface=self._interface(session.id),
            )
        self.state(f"modems/{session.id}", state)
        self.state(
            f"profiles/{session.id}",
            ProfilesState(
                modem=session.id,
                profiles=[
                    ProfileEntry(
                        iccid=p.iccid or "",
                        isdp_aid=p.isdp_aid,
                        state=p.state or "unknown",
                        nickname=p.nickname,
                        service_provider_name=p.service_provider_name,
                        profile_name=p.profile_name,
                        profile_class=p.profile_class,
                    )
                    for p in session.profiles
                ],
            ),
        )

    def layers(self, layers: list[LayerConfig], active: str | None, fed: FedHealth) -> None:
        """Every layer with its health and which one is active."""
        self.state(
            "layers",
            LayersState(
                active=active,
                layers=[
                    LayerEntry(
                        name=x.name,
                        role=x.role,
                        modem=x.modem,
                        profile=x.profile,
                        health=fed.get(x.name, ("unknown", ""))[0],
                        active=x.name == active,
                    )
                    for x in layers
                ],
            ),
        )

    def health(self, name: str, snap: LayerSnapshot, fed: FedHealth) -> None:
        """One layer's health with its probes' figures."""
        state, reason = fed.get(name, (snap.state, snap.reason))
        latencies = [p.latency_ms for p in snap.probes if p.latency_ms is not None]
        self.state(
            f"health/{name}",
            HealthState(
                layer=name,
                status=state,
                latency_ms=min(latencies) if latencies else None,
                consecutive_failures=max((p.consecutive_failures for p in snap.probes), default=0),
                consecutive_successes=min(
                    (p.consecutive_successes for p in snap.probes), default=0
                ),
                detail=reason,
            ),
        )

    def device(self, device_id: str, active: LayerConfig | None, fed: FedHealth) -> None:
        """The one-glance summary: active layer and profile, and whether it carries traffic."""
        connected = active is not None and fed.get(active.name, ("down", ""))[0] in (
            "up",
            "degraded",
        )
        self.state(
            "state",
            DeviceState(
                device_id=device_id,
                active_layer=active.name if active else None,
                active_profile=(active.profile or None) if active else None,
                connectivity=connected,
            ),
        )
