"""Usage glue: modem byte counters into the usage tracker, shares of pools to and from MQTT."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

import msgspec
import structlog

from agent.config import Config, PoolConfig
from agent.daemon.evidence import interface_of
from agent.daemon.planmanager import PlanManager, duty_filters
from agent.daemon.poolaction import CommandRunner, carry_out
from agent.daemon.publish import StatePublisher
from agent.daemon.session import ModemSession
from agent.daemon.usage import UsageTracker
from agent.errors import AgentError
from agent.health.monitor import LayerMonitor
from agent.mqtt.payloads import redact_value
from agent.usage.store import QuotaAlert

log = structlog.get_logger(__name__)

Spawn = Callable[[str, Coroutine[Any, Any, Any]], None]


class Metering:
    """Owns the usage tracker of one state_dir; the daemon hands it counters and sibling
    shares. Build it with `await Metering.open(...)`; run `run()` as a task (the pools' plan
    manager duty) and deliver every message on `topic_filters(cfg)` to `on_message`."""

    def __init__(
        self,
        cfg: Config,
        publisher: StatePublisher,
        spawn: Spawn,
        tracker: UsageTracker,
        *,
        commands: CommandRunner | None = None,
        connected: Callable[[], bool] = lambda: False,
    ) -> None:
        self.cfg = cfg
        self.state_dir = Path(cfg.state_dir)
        self._publisher = publisher
        self._spawn = spawn
        self._commands = commands
        self._connected = connected
        self.tracker = tracker
        self.plan = PlanManager(cfg, tracker, publisher, connected)
        #: (pool, period) whose limit action this run has carried out.
        self._acted: set[tuple[str, str]] = set()

    @classmethod
    async def open(
        cls,
        cfg: Config,
        publisher: StatePublisher,
        spawn: Spawn,
        *,
        commands: CommandRunner | None = None,
        connected: Callable[[], bool] = lambda: False,
    ) -> Metering:
        """Open the usage file; never raises for a file that fails (usage is then counted in
        memory and the failure published once as a `usage_store_failed` event).

        commands: the daemon's command table (`CommandTable.call`) for pool limit actions;
        connected: whether the MQTT bridge is connected now (the plan manager's duty).
        """

        def on_problem(detail: dict[str, Any]) -> None:
            publisher.event("usage_store_failed", detail)

        metering: Metering | None = None

        def on_alert(alert: QuotaAlert) -> None:
            if metering is not None:
                metering._on_quota_alert(alert)

        tracker = await UsageTracker.open(
            Path(cfg.state_dir) / "usage.db",
            on_alert,
            thresholds=tuple(cfg.usage.alert_thresholds),
            period_start_day=cfg.usage.period_start_day,
            on_problem=on_problem,
        )
        metering = cls(cfg, publisher, spawn, tracker, commands=commands, connected=connected)
        tracker.apply_config(cfg.usage, cfg.device_id)
        return metering

    @staticmethod
    def topic_filters(cfg: Config) -> list[str]:
        """Every topic the pools need from other devices: their shares, and for pools with a
        manager the duty order's availability and the records of announced alerts."""
        base = cfg.mqtt.base_topic
        out = [f"{base}/+/usage/pool/{p.name}" for p in cfg.usage.pools if p.devices]
        return out + duty_filters(cfg)

    def reconfigure(self, cfg: Config) -> None:
        """A reloaded config on the same state_dir: new quotas, thresholds and pools."""
        self.cfg = cfg
        self.tracker.apply_config(cfg.usage, cfg.device_id)
        self.plan.reconfigure(cfg)

    async def run(self) -> None:
        """The plan manager's duty for pools that name a manager (returns at once otherwise)."""
        if self.plan.pools:
            await self.plan.run()

    def on_message(self, topic: str, payload: bytes) -> None:
        """A message on one of topic_filters(cfg)."""
        if topic.endswith(("/alerts", "/availability")):
            self.plan.on_message(topic, payload)
        else:
            self.on_sibling_pool(topic, payload)

    async def close(self) -> None:
        """Flush and close the usage file."""
        self.plan.cancel()
        await self.tracker.close()

    async def sample(
        self,
        session: ModemSession,
        monitors: Sequence[tuple[str, LayerMonitor]] = (),
        interface: str | None = None,
    ) -> None:
        """Record a modem's traffic for the profile it runs (its network interface counts for
        every vendor when it has one, the modem's own counters are then a cross-check), the
        probes' bytes of its layers, and publish usage and pool shares."""
        iccid = session.enabled_iccid or (session.info.sim.iccid if session.info else None)
        reset, session.counters_reset = session.counters_reset, False
        # The daemon's answer (config or discovery); the config's name without one.
        ifname = interface if interface is not None else interface_of(session.cfg)
        try:
            if ifname is not None:
                await self.tracker.sample_interface(
                    session.id, iccid, ifname, modem_counters=session.counters
                )
            else:
                await self.tracker.sample(session.id, iccid, session.counters, new_session=reset)
        except AgentError as exc:
            log.error("usage_sample_failed", modem=session.id, error=str(exc))
            return
        for layer, monitor in monitors:
            tx, rx = monitor.take_probe_bytes()
            with contextlib.suppress(AgentError, TimeoutError):
                await self.tracker.record_probe_bytes(layer, iccid, tx, rx)
        if iccid is not None and (ifname is not None or session.counters is not None):
            name = redact_value(iccid) if self.cfg.mqtt.redact else iccid
            self._publisher.state(f"usage/{name}", self.tracker.snapshot(iccid))
            self.publish_pools(iccid)

    async def before_switch(self, session: ModemSession) -> None:
        """Count the bytes since the last poll: the switch restarts the modem's counters."""
        try:
            await session.fresh_counters()
        except AgentError as exc:
            log.info("usage_presample_failed", modem=session.id, error=str(exc))
            return
        await self.sample(session)

    def publish_pools(self, iccid: str | None = None) -> None:
        """Our share of each shared pool (that iccid belongs to), for the other devices."""
        for pool in self.cfg.usage.pools:
            if iccid is None or iccid in pool.members:
                try:
                    snap = self.tracker.pool_snapshot(pool.name)
                except (KeyError, ValueError) as exc:
                    log.warning("usage_pool_publish_failed", pool=pool.name, error=str(exc))
                    continue
                self._publisher.state(f"usage/pool/{pool.name}", snap)
                self._check_limit(pool, snap)
        self.plan.poke()

    def _check_limit(self, pool: PoolConfig, snap: dict[str, Any]) -> None:
        """Carry out the pool's on_limit once per period and run when this device is over its
        own limit (also right after a start: a restart's recovery may have undone it)."""
        limit = self.tracker.device_limit(pool.name)
        if limit is None or pool.on_limit == "none" or self._commands is None:
            return
        key = (pool.name, str(snap["period"]))
        if int(snap["local_bytes"]) < limit or key in self._acted:
            return
        self._acted.add(key)
        self._spawn(f"pool-limit-{pool.name}", self._act(pool))

    async def _act(self, pool: PoolConfig) -> None:
        assert self._commands is not None
        data = await carry_out(pool, self.cfg.device_id, self._commands)
        if self.cfg.mqtt.redact and "disabled" in data:
            data["disabled"] = [redact_value(i) for i in data["disabled"]]
        self._publisher.event("pool_limit_action", data)

    def on_sibling_pool(self, topic: str, payload: bytes) -> None:
        """Another device's retained share of a pool we are in."""
        rest = topic.removeprefix(f"{self.cfg.mqtt.base_topic}/").split("/")
        if len(rest) != 4 or rest[0] == self.cfg.device_id:
            return
        device, pool = rest[0], rest[3]
        try:
            data = msgspec.json.decode(payload, type=dict[str, Any]) if payload else {}
            used = int(data["local_bytes"])
            period = str(data["period"])
        except (msgspec.DecodeError, KeyError, TypeError, ValueError):
            log.warning("usage_sibling_payload_invalid", device=device, pool=pool)
            return
        if period != self.tracker.current_period():
            return  # last month's share says nothing about this month's quota
        self._spawn(f"pool-{pool}-{device}", self._apply_sibling_usage(pool, device, used))

    async def _apply_sibling_usage(self, pool: str, device: str, used: int) -> None:
        await self.tracker.remote_usage(pool, device, used)
        self.publish_pools()

    def _on_quota_alert(self, alert: QuotaAlert) -> None:
        if alert.subject.startswith("pool:") and alert.subject[5:] in self.plan.pools:
            # Whoever holds the plan manager's duty announces it (planmanager.py), once.
            log.info("pool_alert_left_to_duty", pool=alert.subject[5:], threshold=alert.threshold)
            self.plan.poke()
            return
        data = msgspec.to_builtins(alert)
        log.warning("quota_alert", **data)
        self._publisher.event("quota_alert", data)
