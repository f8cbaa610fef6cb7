"""Sibling layers for the policy engine: MQTT messages, broker state and own probes in,
`LayerHealth` events out (only on change). No I/O and no clock: every call takes `now`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from agent.policy.engine import Health, LayerHealth
from agent.siblings.view import (
    SiblingAvailability,
    SiblingDecoder,
    SiblingObservation,
    SiblingState,
    observe,
    sibling_health,
)

if TYPE_CHECKING:
    from agent.config import Config


class SiblingLayers:
    """The health of every sibling layer of one device, fed to the engine as LayerHealth."""

    def __init__(self, cfg: Config, now: float) -> None:
        self.base = cfg.mqtt.base_topic
        self.grace = cfg.timers.companion_grace
        #: layer name -> the sibling's device_id
        self.layers = {x.name: x.device for x in cfg.layers if x.device is not None}
        group = cfg.group
        devices = group.devices if group is not None else []
        self.decoder = SiblingDecoder(self.base, group.name if group else "-", devices)
        self.obs: dict[str, SiblingObservation] = {
            d: SiblingObservation(since=now) for d in set(self.layers.values())
        }
        self.probes: dict[str, Health | None] = dict.fromkeys(self.layers)
        self.broker_connected = False
        self.broker_since = now
        self._last: dict[str, Health] = {}

    def subscriptions(self) -> list[str]:
        """The siblings' availability and state topics (claims are the ClaimDriver's)."""
        return [t for t in self.decoder.subscriptions() if t.endswith(("/availability", "/state"))]

    def on_message(self, topic: str, payload: bytes, now: float) -> list[LayerHealth]:
        """A message on one of `subscriptions()`."""
        msg = self.decoder.decode(topic, payload)
        if isinstance(msg, SiblingAvailability | SiblingState) and msg.device in self.obs:
            self.obs[msg.device] = observe(self.obs[msg.device], msg, now)
        return self.evaluate(now)

    def on_broker(self, connected: bool, now: float) -> list[LayerHealth]:
        """The MQTT session came up or went away."""
        if connected != self.broker_connected:
            self.broker_connected, self.broker_since = connected, now
        return self.evaluate(now)

    def on_probe(self, layer: str, health: Health, now: float) -> list[LayerHealth]:
        """Our own probe's verdict through the layer's `interface`."""
        if layer in self.probes:
            self.probes[layer] = health
        return self.evaluate(now)

    def evaluate(self, now: float) -> list[LayerHealth]:
        """Every sibling layer whose health changed since the last call (call on ticks too)."""
        out: list[LayerHealth] = []
        for layer, device in self.layers.items():
            health, reason = sibling_health(
                self.obs[device],
                now=now,
                grace=self.grace,
                broker_connected=self.broker_connected,
                broker_since=self.broker_since,
                probe=self.probes[layer],
            )
            if health is Health.DEGRADED and self.obs[device].connectivity is None:
                # Not a verdict yet (the retained state is on its way, or the sibling never
                # spoke): a usable guess would put our own profile to sleep only to wake it
                # again. Unknown keeps the policy waiting until the grace runs out.
                health, reason = Health.UNKNOWN, f"waiting for the sibling's state: {reason}"
            if self._last.get(layer) is not health:
                self._last[layer] = health
                out.append(LayerHealth(layer=layer, health=health, reason=reason, now=now))
        return out
