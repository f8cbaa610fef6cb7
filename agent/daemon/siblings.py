"""The daemon's side of a group (docs/siblings.md): sibling layers and the group claim, fed by
the daemon's own MQTT session.

    side = SiblingSide(daemon)             # nothing to do when side.enabled is False
    side.attach(bridge)                    # subscriptions, session up/down, publish for claims
    supervisor.start("siblings", side.run) # once the policy takes reports
    side.tick()                            # on every policy tick (grace expiry, claim refresh)
    side.after_policy(policy)              # after every transition: what we carry ourselves

Everything that reaches the pure parts (agent.siblings.layers, agent.siblings.claim) goes
through one queue consumed by `run()`, in the order it happened: a session's "up" comes before
its retained messages, and those before the claim driver's sync marker.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import aiomqtt
import structlog

from agent.health.layer import LayerHealth as MonitorHealth
from agent.health.layer import Thresholds
from agent.health.monitor import LayerMonitor
from agent.health.probes import LinkBinding, probe_from_spec
from agent.policy.engine import GroupWake, Health, LayerHealth, PolicyState
from agent.siblings.adapter import ClaimDriver, Publish
from agent.siblings.claim import ClaimConfig, ClaimState
from agent.siblings.layers import SiblingLayers

if TYPE_CHECKING:
    from agent.config import Config, LayerConfig
    from agent.daemon.app import Daemon
    from agent.daemon.supervisor import Supervisor
    from agent.mqtt.bridge import MqttBridge

log = structlog.get_logger(__name__)

#: Sibling messages waiting beyond this many are dropped (a flood must not eat our memory);
#: session up/down, ticks and our own state are never dropped.
MAX_PENDING_MESSAGES = 4096

_USABLE = (Health.UP, Health.DEGRADED)


class SiblingSide:
    """Sibling layers' health into the policy, and the group claim driver (see module doc)."""

    def __init__(self, daemon: Daemon) -> None:
        self.d = daemon
        cfg = daemon.cfg
        self.cfg = cfg
        now = time.monotonic()
        self.layers: SiblingLayers | None = (
            SiblingLayers(cfg, now) if any(x.is_sibling for x in cfg.layers) else None
        )
        claim_cfg = ClaimConfig.from_config(cfg)
        self.claim: ClaimDriver | None = None
        if claim_cfg is not None:
            self.claim = ClaimDriver(claim_cfg, cfg.mqtt.base_topic, None, self._on_wake)
        #: Our own probe through a sibling layer's `interface` (layers with probes only).
        self.monitors: dict[str, LayerMonitor] = {}
        #: (state, reason) per sibling layer as last reported to the policy.
        self.health: dict[str, tuple[str, str]] = {}
        self._queue: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
        self._pending_messages = 0
        self._dropped = 0
        self._local: tuple[bool, bool] | None = None
        self._publishes: set[asyncio.Task[None]] = set()
        self.broker_connected = False

    @property
    def enabled(self) -> bool:
        """Whether this device has sibling layers or holds the group emergency."""
        return self.layers is not None or self.claim is not None

    # ---- wiring ---------------------------------------------------------------------------

    def attach(self, bridge: MqttBridge) -> None:
        """Subscribe (on every session) to what the sibling layers and the claim need, hear
        sessions come and go, and lend the claim driver the session's publish."""
        if not self.enabled:
            return
        filters: dict[str, None] = {}
        if self.layers is not None:
            filters.update(dict.fromkeys(self.layers.subscriptions()))
        if self.claim is not None:
            filters.update(dict.fromkeys(self.claim.subscriptions()))
            self.claim.bind(self._publisher(bridge))
        for topic_filter in filters:
            bridge.watch(topic_filter, self._on_message)
        bridge.on_session(lambda: self._put(("up",)), lambda: self._put(("down",)))

    def _publisher(self, bridge: MqttBridge) -> Publish:
        """The claim driver's publish on `bridge`, without waiting for the broker's ack: a
        blackholed broker must not hold the queue (and with it the "down" that puts an awake
        claimant to sleep) for a publish timeout. Publishes leave in order (paho queues each
        one when its task first runs); a lost one is safe (docs/siblings.md)."""

        async def publish(topic: str, payload: bytes, retain: bool, expiry: float | None) -> None:
            if not bridge.connected:
                raise aiomqtt.MqttError("no MQTT session")
            task = asyncio.create_task(bridge.publish_raw(topic, payload, retain, expiry))
            self._publishes.add(task)
            task.add_done_callback(self._published)

        return publish

    def _published(self, task: asyncio.Task[None]) -> None:
        self._publishes.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.warning("group_claim_publish_failed", error=f"{type(exc).__name__}: {exc}")

    def build_monitors(self, binding: Callable[[str], LinkBinding | None]) -> None:
        """A monitor per sibling layer that names an `interface` and probes: our own probe
        through the link that reaches the sibling (bound to that interface)."""
        for layer in self.cfg.layers:
            if layer.device is None or layer.interface is None or not layer.probes:
                continue
            link = binding(layer.name) or LinkBinding()
            link.interface = layer.interface
            self.monitors[layer.name] = _monitor(self.cfg, layer, link, self._on_probe)

    def start(self, supervisor: Supervisor) -> None:
        """Start the monitors and the queue's consumer (once the policy takes reports)."""
        for name, monitor in self.monitors.items():
            supervisor.start(f"health-{name}", monitor.run)
        if self.enabled:
            supervisor.start("siblings", self.run)

    def tick(self) -> None:
        """Time passes (call on the daemon's policy tick)."""
        if self.enabled:
            self._put(("tick",))

    def after_policy(self, policy: PolicyState) -> None:
        """What this device carries itself, for the claim: a non-emergency layer of ours in use,
        and connectivity at all. Call after every transition; only changes go on."""
        if self.claim is None:
            return
        active = policy.active
        usable = active is not None and policy.layer(active).status in _USABLE
        higher = usable and active is not None and policy.spec(active).role != "emergency"
        local = (higher, usable)
        if local != self._local:
            self._local = local
            self._put(("local", higher, usable))

    # ---- views ----------------------------------------------------------------------------

    def usable(self, layer: str) -> bool:
        """Whether the sibling layer is up or degraded right now, as last reported."""
        return self.health.get(layer, ("unknown", ""))[0] in ("up", "degraded")

    def status(self) -> dict[str, object]:
        """`siblings` and `claim` for `esim-agent status --json`."""
        siblings: list[dict[str, object]] = []
        if self.layers is not None:
            for name, device in self.layers.layers.items():
                obs = self.layers.obs[device]
                state, reason = self.health.get(name, ("unknown", "no_data"))
                siblings.append(
                    {
                        "layer": name,
                        "device": device,
                        "online": obs.online,
                        "connectivity": obs.connectivity,
                        "active_layer": obs.active_layer,
                        "health": state,
                        "reason": reason,
                    }
                )
        claim: dict[str, object] | None = None
        if self.claim is not None:
            st: ClaimState = self.claim.state
            now = time.monotonic()
            live = sorted(d for d, c in st.claims.items() if now - c.received_at < c.ttl)
            claim = {
                "group": self.claim.config.group,
                "phase": st.phase.value,
                "order": list(self.claim.config.order),
                # Other holders whose claim is live right now (ours shows in `phase`).
                "claimed_by": live,
            }
        return {"broker_connected": self.broker_connected, "siblings": siblings, "claim": claim}

    # ---- the queue ------------------------------------------------------------------------

    def _put(self, item: tuple[Any, ...]) -> None:
        self._queue.put_nowait(item)

    def _on_message(self, topic: str, payload: bytes) -> None:
        if self._pending_messages >= MAX_PENDING_MESSAGES:
            self._dropped += 1
            if self._dropped == 1 or self._dropped % 1000 == 0:
                log.warning("sibling_messages_dropped", dropped=self._dropped)
            return
        self._pending_messages += 1
        self._put(("msg", topic, payload))

    def _on_probe(self, name: str, health: MonitorHealth) -> None:
        self._put(("probe", name, Health(health.state)))

    def _on_wake(self, awake: bool) -> None:
        self.d.post(GroupWake(awake=awake, now=time.monotonic()))

    async def run(self) -> None:
        """Consume the queue until cancelled; start it once the policy takes reports."""
        self._report(self.layers.evaluate(time.monotonic()) if self.layers else [])
        while True:
            item = await self._queue.get()
            try:
                await self._handle(item)
            except (aiomqtt.MqttError, TimeoutError) as exc:
                # The session went while the claim driver spoke: its "down" is queued next.
                log.warning("sibling_publish_failed", error=str(exc))

    async def _handle(self, item: tuple[Any, ...]) -> None:
        now = time.monotonic()
        kind = item[0]
        sl, claim = self.layers, self.claim
        if kind == "msg":
            self._pending_messages -= 1
            topic, payload = item[1], item[2]
            if sl is not None:
                self._report(sl.on_message(topic, payload, now))
            if claim is not None:
                await claim.on_message(topic, payload)
        elif kind == "tick":
            if sl is not None:
                self._report(sl.evaluate(now))
            if claim is not None:
                await claim.tick()
        elif kind == "probe":
            if sl is not None:
                self._report(sl.on_probe(item[1], item[2], now))
        elif kind == "local":
            if claim is not None:
                await claim.on_local(higher_up=item[1], connected=item[2])
        elif kind in ("up", "down"):
            up = kind == "up"
            self.broker_connected = up
            log.info("sibling_view_session", connected=up)
            if sl is not None:
                self._report(sl.on_broker(up, now))
            if claim is not None:
                await (claim.on_connected() if up else claim.on_disconnected())

    def _report(self, events: list[LayerHealth]) -> None:
        d = self.d
        for ev in events:
            entry = (str(ev.health), ev.reason)
            self.health[ev.layer] = entry
            d.fed[ev.layer] = entry
            log.info("layer_health", layer=ev.layer, state=entry[0], reason=ev.reason)
            d.post(ev)
        if events:
            d.publish_summary()


def _monitor(
    cfg: Config,
    layer: LayerConfig,
    link: LinkBinding,
    on_change: Callable[[str, MonitorHealth], None],
) -> LayerMonitor:
    h = cfg.health
    thresholds = Thresholds(
        rssi_dbm_min=float("-inf"),
        rsrp_dbm_min=float("-inf"),
        down_after=h.down_after,
        up_after=h.up_after,
        degraded_ratio=h.degraded_ratio,
    )
    probes = [
        (f"{p.kind}{i}", probe_from_spec(p.kind, p.target, p.timeout, link), p.interval)
        for i, p in enumerate(layer.probes)
    ]
    return LayerMonitor(
        layer.name,
        probes,
        None,
        thresholds,
        on_change,
        window_size=max((p.window for p in layer.probes), default=5),
        failure_interval=h.failure_interval,
        traffic_aware=False,
        probe_budget=h.probe_budget,
    )
