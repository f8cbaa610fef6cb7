"""The composition root: modem sessions, health monitors, the failover policy, MQTT, control."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import msgspec
import structlog

from agent.config import Config, LayerConfig, load_config
from agent.daemon import sdnotify
from agent.daemon.control import CommandTable, ControlServer
from agent.daemon.evidence import EvidenceFeeds, interface_of
from agent.daemon.hooks import run_hooks
from agent.daemon.session import ModemSession
from agent.daemon.supervisor import Supervisor
from agent.daemon.timeline import describe
from agent.daemon.usage import UsageTracker
from agent.errors import AgentError, ConfigError
from agent.euicc.lpa import Lpa
from agent.euicc.switch import SwitchReport
from agent.health.layer import LayerHealth as MonitorHealth
from agent.health.layer import Thresholds
from agent.health.monitor import LayerMonitor
from agent.health.probes import Probe, probe_from_spec
from agent.mqtt.bridge import MqttBridge, MqttSettings
from agent.mqtt.commands import CommandContext, CommandRejected
from agent.mqtt.payloads import (
    DeviceState,
    Event,
    HealthState,
    LayerEntry,
    LayersState,
    ModemState,
    ProfileEntry,
    ProfilesState,
    redact_value,
)
from agent.mqtt.reach import settings_from_config
from agent.policy.engine import (
    Action,
    ActivateLayer,
    DisableEmergency,
    Drill,
    EmitEvent,
    EnableEmergency,
    Health,
    LayerHealth,
    ManualSwitch,
    PolicyConfig,
    PolicyState,
    RadioDown,
    RadioUp,
    SwitchDone,
    Tick,
    TransitionEvent,
    initial_state,
    summary,
    transition,
)
from agent.policy.engine import Event as PolicyEvent
from agent.usage.store import QuotaAlert

log = structlog.get_logger(__name__)

#: Policy timers (failback dwell, hold-down) fire on ticks: a coarse tick delays them.
TICK_S = 0.25
VERIFY_INTERVAL_S = 0.3
STARTUP_WAIT_S = 15.0
TIMELINE_KEEP = 200
OFFLINE_GRACE_S = 10.0


class Daemon:
    """Everything `esim-agent run` does; one instance per process, restartable on SIGHUP."""

    def __init__(self, cfg: Config, config_path: str | None = None) -> None:
        self.config_path = config_path
        self._stop = asyncio.Event()
        self._reload = asyncio.Event()
        self._started_at = time.time()
        self._configure(cfg)

    def _configure(self, cfg: Config) -> None:
        """Fresh per-config state (at start and on each accepted SIGHUP)."""
        self.cfg = cfg
        self.state_dir = Path(cfg.state_dir)
        self.sessions: dict[str, ModemSession] = {}
        self.monitors: dict[str, LayerMonitor] = {}
        self.layer_probes: dict[str, list[tuple[str, Probe, float]]] = {}
        self.supervisor = Supervisor()
        self.bridge: MqttBridge | None = None
        self.control: ControlServer | None = None
        self.policy: PolicyState | None = None
        self.timeline: deque[dict[str, Any]] = deque(maxlen=TIMELINE_KEEP)
        self._events: asyncio.Queue[PolicyEvent] = asyncio.Queue()
        self._fed: dict[str, tuple[str, str]] = {}
        self._jobs: set[asyncio.Task[Any]] = set()
        self._record_waiters: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._processed: dict[int, asyncio.Future[list[Action]]] = {}
        self._published: dict[str, Any] = {}
        self.usage: UsageTracker | None = None
        self.evidence = EvidenceFeeds(
            lambda m: [self.monitors[x.name] for x in self.cfg.layers if x.modem == m]
        )

    # ---- running -------------------------------------------------------------------------

    async def run(self) -> int:
        """Run until SIGTERM/SIGINT; SIGHUP reloads the config. Returns the exit status."""
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._stop.set)
        loop.add_signal_handler(signal.SIGINT, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload.set)
        try:
            await self._start()
            while True:
                stop = asyncio.create_task(self._stop.wait())
                reload = asyncio.create_task(self._reload.wait())
                await asyncio.wait({stop, reload}, return_when=asyncio.FIRST_COMPLETED)
                stop.cancel()
                reload.cancel()
                if self._stop.is_set():
                    break
                self._reload.clear()
                await self._reload_config()
        finally:
            sdnotify.stopping()
            log.info("daemon_stopping")
            await self._shutdown()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
        log.info("daemon_stopped")
        return 0

    def request_stop(self) -> None:
        """Stop as SIGTERM would (for embedding and tests)."""
        self._stop.set()

    async def _start(self) -> None:
        cfg = self.cfg
        self.state_dir.mkdir(parents=True, exist_ok=True)
        log.info("daemon_starting", device_id=cfg.device_id, modems=len(cfg.modems))
        # Never raises: a usage file that fails is counted around in memory (agent.daemon.usage).
        self.usage = await UsageTracker.open(
            self.state_dir / "usage.db",
            self._on_quota_alert,
            thresholds=tuple(cfg.usage.alert_thresholds),
            period_start_day=cfg.usage.period_start_day,
            on_problem=self._on_usage_problem,
        )
        self.usage.apply_config(cfg.usage)
        for mcfg in cfg.modems:
            self.sessions[mcfg.id] = ModemSession(
                mcfg,
                state_dir=self.state_dir,
                on_update=self._on_session_update,
                rollback_timeout=cfg.timers.rollback_timeout,
                on_poll=self._sample_usage,
            )
        thresholds = Thresholds(
            rssi_dbm_min=float(cfg.health.rssi_dbm_min)
            if cfg.health.rssi_dbm_min is not None
            else float("-inf"),
            rsrp_dbm_min=cfg.health.rsrp_dbm_min
            if cfg.health.rsrp_dbm_min is not None
            else float("-inf"),
            down_after=cfg.health.down_after,
            up_after=cfg.health.up_after,
            degraded_ratio=cfg.health.degraded_ratio,
        )
        interfaces = {m.id: i for m in cfg.modems if (i := interface_of(m)) is not None}
        for layer in cfg.layers:
            probes = [
                (f"{p.kind}{i}", probe_from_spec(p.kind, p.target, p.timeout), p.interval)
                for i, p in enumerate(layer.probes)
            ]
            self.layer_probes[layer.name] = probes
            window = max((p.window for p in layer.probes), default=5)
            self.monitors[layer.name] = LayerMonitor(
                layer.name,
                probes,
                None,
                thresholds,
                self._on_monitor_change,
                window_size=window,
                failure_interval=cfg.health.failure_interval,
                traffic_aware=cfg.health.traffic_aware,
                probe_budget=cfg.health.probe_budget,
                counters=self.evidence.counters_source(ifname)
                if (ifname := interfaces.get(layer.modem))
                else None,
            )
            self.monitors[layer.name].probe_gate = self._gate(layer)
        self.policy = initial_state(
            PolicyConfig.from_config(cfg), time.monotonic(), id_prefix=f"{cfg.device_id}"
        )
        if cfg.mqtt.enabled:
            self.bridge = MqttBridge(self._mqtt_settings(), cfg.device_id, self._mqtt_command)
            for pool in cfg.usage.pools:
                if pool.devices:
                    # Siblings publish their share of the pool; ours goes out after each poll.
                    self.bridge.watch(
                        f"{cfg.mqtt.base_topic}/+/usage/pool/{pool.name}", self._on_sibling_pool
                    )
            self.supervisor.start("mqtt", self.bridge.run)
            self._publish_layers()
            self._publish_device()
        socket_path = cfg.control_socket
        self.control = ControlServer(socket_path, CommandTable(self._control_commands()))
        await self.control.start()
        for session in self.sessions.values():
            self.supervisor.start(f"modem-{session.id}", session.run)
        # Give modems a moment to come up so the first decisions see real state.
        await asyncio.wait(
            [asyncio.create_task(s.wait_online(STARTUP_WAIT_S)) for s in self.sessions.values()]
            or [asyncio.create_task(asyncio.sleep(0))]
        )
        await self._recover_euicc_state()
        for name, monitor in self.monitors.items():
            self.supervisor.start(f"health-{name}", monitor.run)
        for modem_id, ifname in interfaces.items():
            self.supervisor.start(f"links-{modem_id}", self.evidence.link_task(modem_id, ifname))
        self.supervisor.start("policy", self._policy_loop)
        self.supervisor.start("tick", self._tick_loop)
        if sdnotify.watchdog_interval() is not None:
            self.supervisor.start("watchdog", lambda: sdnotify.run_watchdog(self._alive))
        sdnotify.ready(f"running; {len(self.sessions)} modem(s)")
        log.info("daemon_ready", control=str(socket_path))

    async def _shutdown(self) -> None:
        for job in list(self._jobs):
            job.cancel()
        if self._jobs:
            await asyncio.wait(self._jobs, timeout=10)
        if self.bridge is not None:
            with contextlib.suppress(Exception):
                await self.bridge.close()
        await self.supervisor.stop()
        if self.control is not None:
            await self.control.close()
        self.evidence.close()
        if self.usage is not None:
            await self.usage.close()
        self.sessions.clear()
        self.monitors.clear()

    async def _reload_config(self) -> None:
        if self.config_path is None:
            log.warning("config_reload_skipped", reason="no config file")
            return
        sdnotify.reloading()
        try:
            new = load_config(self.config_path)
        except ConfigError as exc:
            log.error("config_reload_refused", error=str(exc))
            sdnotify.ready("config reload refused; old config kept")
            return
        log.info("config_reloading", file=self.config_path)
        await self._shutdown()
        self._configure(new)
        await self._start()

    def _alive(self) -> bool:
        return not self._stop.is_set()

    # ---- eUICC state after a crash ------------------------------------------------------

    async def _recover_euicc_state(self) -> None:
        """After a crash mid-switch: no modem may stay without a profile or on a stray one."""
        for session in self.sessions.values():
            if not session.online or not session.profiles:
                continue
            home = self._home_profile(session.id)
            if home is None:
                continue
            enabled = session.enabled_iccid
            emergency = {layer.profile for layer in self.cfg.layers if layer.role == "emergency"}
            if enabled is None or enabled in emergency:
                log.warning("euicc_recovering", modem=session.id, enabled=enabled, restore_to=home)
                try:
                    report = await self._switch_modem(session, home)
                    log.info("euicc_recovered", modem=session.id, outcome=report.outcome)
                except AgentError as exc:
                    log.error("euicc_recovery_failed", modem=session.id, error=str(exc))

    def _gate(self, layer: LayerConfig) -> Callable[[], bool]:
        session = self.sessions[layer.modem]

        def running() -> bool:
            return not session.profiles or session.enabled_iccid == layer.profile

        return running

    # ---- usage -----------------------------------------------------------------------------

    async def _sample_usage(self, session: ModemSession) -> None:
        if self.usage is None:
            return
        iccid = session.enabled_iccid or (session.info.sim.iccid if session.info else None)
        reset, session.counters_reset = session.counters_reset, False
        # The modem's network interface (issue 7's `interface` on [[modems]]) counts for every
        # vendor; the modem's own counters are then only a cross-check.
        ifname = interface_of(session.cfg)
        linked = ifname is not None
        try:
            if ifname is not None:
                await self.usage.sample_interface(
                    session.id, iccid, ifname, modem_counters=session.counters
                )
            else:
                await self.usage.sample(session.id, iccid, session.counters, new_session=reset)
        except AgentError as exc:
            log.error("usage_sample_failed", modem=session.id, error=str(exc))
            return
        for layer in (x for x in self.cfg.layers if x.modem == session.id):
            if (monitor := self.monitors.get(layer.name)) is None:
                continue
            tx, rx = monitor.take_probe_bytes()
            with contextlib.suppress(AgentError, TimeoutError):
                await self.usage.record_probe_bytes(layer.name, iccid, tx, rx)
        if iccid is not None and (linked or session.counters is not None):
            name = redact_value(iccid) if self.cfg.mqtt.redact else iccid
            self._publish(f"usage/{name}", self.usage.snapshot(iccid))
            self._publish_pools(iccid)

    def _publish_pools(self, iccid: str | None = None) -> None:
        """Our share of each shared pool (that iccid belongs to), for the other devices."""
        if self.usage is None:
            return
        for pool in self.cfg.usage.pools:
            if iccid is None or iccid in pool.members:
                try:
                    self._publish(f"usage/pool/{pool.name}", self.usage.pool_snapshot(pool.name))
                except (KeyError, ValueError) as exc:
                    log.warning("usage_pool_publish_failed", pool=pool.name, error=str(exc))

    def _on_sibling_pool(self, topic: str, payload: bytes) -> None:
        """Another device's retained share of a pool we are in."""
        rest = topic.removeprefix(f"{self.cfg.mqtt.base_topic}/").split("/")
        if len(rest) != 4 or rest[0] == self.cfg.device_id or self.usage is None:
            return
        device, pool = rest[0], rest[3]
        try:
            data = msgspec.json.decode(payload, type=dict[str, Any]) if payload else {}
            used = int(data["local_bytes"])
            period = str(data["period"])
        except (msgspec.DecodeError, KeyError, TypeError, ValueError):
            log.warning("usage_sibling_payload_invalid", device=device, pool=pool)
            return
        if period != self.usage.current_period():
            return  # last month's share says nothing about this month's quota
        self._spawn(f"pool-{pool}-{device}", self._apply_sibling_usage(pool, device, used))

    async def _apply_sibling_usage(self, pool: str, device: str, used: int) -> None:
        if self.usage is not None:
            await self.usage.remote_usage(pool, device, used)
            self._publish_pools()

    def _on_usage_problem(self, detail: dict[str, Any]) -> None:
        if self.bridge is not None:
            self.bridge.publish_event(Event(type="usage_store_failed", data=detail))

    def _on_quota_alert(self, alert: QuotaAlert) -> None:
        data = msgspec.to_builtins(alert)
        log.warning("quota_alert", **data)
        if self.bridge is not None:
            self.bridge.publish_event(Event(type="quota_alert", data=data))

    async def _before_switch(self, session: ModemSession) -> None:
        """Count the bytes since the last poll: the switch restarts the modem's counters."""
        try:
            await session.fresh_counters()
        except AgentError as exc:
            log.info("usage_presample_failed", modem=session.id, error=str(exc))
            return
        await self._sample_usage(session)

    def _home_profile(self, modem: str) -> str | None:
        """The profile a modem should run when no emergency is on: its top non-emergency layer."""
        for layer in self.cfg.layers:
            if layer.modem == modem and layer.role != "emergency":
                return layer.profile
        return None

    # ---- health → policy -----------------------------------------------------------------

    def _layer(self, name: str) -> LayerConfig:
        return next(layer for layer in self.cfg.layers if layer.name == name)

    def _effective_health(self, name: str) -> tuple[str, str]:
        layer = self._layer(name)
        session = self.sessions[layer.modem]
        health = self.monitors[name].health
        if session.profiles and session.enabled_iccid != layer.profile:
            # The probes reach whatever profile the modem runs; they say nothing about this one.
            return "down", "profile_inactive"
        if not session.online and session.last_error is not None:
            return "down", f"modem_offline: {session.last_error}"
        return health.state, health.reason

    def _feed(self, name: str) -> None:
        state, reason = self._effective_health(name)
        if self._fed.get(name) == (state, reason):
            return
        self._fed[name] = (state, reason)
        log.info("layer_health", layer=name, state=state, reason=reason)
        self._events.put_nowait(
            LayerHealth(layer=name, health=Health(state), reason=reason, now=time.monotonic())
        )
        self._publish_health(name)
        self._publish_layers()

    def _on_monitor_change(self, name: str, _health: MonitorHealth) -> None:
        self._feed(name)

    def _on_session_update(self, session: ModemSession) -> None:
        if session.modem is not None:
            self.evidence.watch_channel(session.id, session.modem.channel)
        for layer in self.cfg.layers:
            if layer.modem == session.id and layer.name in self.monitors:
                self.monitors[layer.name].update_signals(session.signals())
                self._feed(layer.name)
        self._publish_modem(session)

    # ---- the policy loop -------------------------------------------------------------------

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            self._events.put_nowait(Tick(now=time.monotonic()))

    async def _policy_loop(self) -> None:
        while True:
            event = await self._events.get()
            assert self.policy is not None
            before = (self.policy.active, self.policy.phase)
            self.policy, actions = transition(self.policy, event)
            waiter = self._processed.pop(id(event), None)
            if waiter is not None and not waiter.done():
                waiter.set_result(actions)
            for action in actions:
                self._execute(action)
            if (self.policy.active, self.policy.phase) != before:
                self._publish_layers()
                self._publish_device()
                sdnotify.status(f"active layer: {self.policy.active or 'none'}")

    async def submit(self, event: PolicyEvent) -> list[Action]:
        """Hand an event to the policy and return the actions it decided."""
        fut: asyncio.Future[list[Action]] = asyncio.get_running_loop().create_future()
        self._processed[id(event)] = fut
        self._events.put_nowait(event)
        async with asyncio.timeout(10):
            return await fut

    def _execute(self, action: Action) -> None:
        if isinstance(action, EmitEvent):
            self._record(action.event)
        elif isinstance(action, ActivateLayer):
            self._spawn(f"activate-{action.layer}", self._activate(action))
        elif isinstance(action, EnableEmergency):
            log.warning("emergency_enabling", layer=action.layer)
        elif isinstance(action, DisableEmergency):
            self._spawn(f"disable-emergency-{action.layer}", self._disable_emergency(action.layer))
        elif isinstance(action, RadioUp | RadioDown):
            session = self.sessions.get(action.modem)
            if session is not None:
                self._spawn(f"radio-{action.modem}", session.radio(isinstance(action, RadioUp)))

    def _spawn(self, name: str, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(coro, name=name)
        self._jobs.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._jobs.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.error("job_failed", job=name, error=str(t.exception()), exc_info=t.exception())

        task.add_done_callback(done)

    def _record(self, event: TransitionEvent) -> None:
        record = describe(event)
        log.info("transition", **record)
        if event.outcome == "pending":
            if self.bridge is not None:
                self.bridge.publish_event(Event(type="transition_started", data=record))
            return
        self.timeline.append(record)
        waiter = self._record_waiters.pop(event.id, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(record)
        if self.bridge is not None:
            self.bridge.publish_event(Event(type="transition", data=record))
        if self.cfg.hooks.on_transition:
            self._spawn(
                f"hooks-{event.id}",
                run_hooks(self.cfg.hooks.on_transition, record, self.cfg.hooks.timeout),
            )

    # ---- actuator ------------------------------------------------------------------------

    def _probe_fn(self, profile: str) -> Callable[[], Awaitable[bool]] | None:
        """A one-shot data-path check for the layer that runs profile (any probe passing)."""
        layer = next((x for x in self.cfg.layers if x.profile == profile), None)
        if layer is None or not self.layer_probes.get(layer.name):
            return None
        probes = [p for _, p, _ in self.layer_probes[layer.name]]

        async def probe() -> bool:
            results = await asyncio.gather(*(p.run() for p in probes))
            return any(r.ok for r in results)

        return probe

    async def _activate(self, action: ActivateLayer) -> None:
        """Carry out an ActivateLayer; always answers the policy with exactly one SwitchDone."""
        layer = self._layer(action.layer)
        session = self.sessions[layer.modem]
        monitor = self.monitors[layer.name]
        deadline = time.monotonic() + self.cfg.timers.switch_timeout
        ok, reason, timings = False, "", {}
        held = self._hold(layer.modem)
        switched = False
        try:
            if not await session.wait_online(OFFLINE_GRACE_S):
                raise AgentError(f"modem {session.id} is offline")
            if session.enabled_iccid != layer.profile:
                await self._before_switch(session)
                report = await session.safe_switch(layer.profile, self._probe_fn(layer.profile))
                switched = True
                log.info(
                    "layer_switch_report",
                    layer=layer.name,
                    outcome=report.outcome,
                    phases=msgspec.to_builtins(report.phases),
                    error=report.error,
                )
                if report.outcome != "switched":
                    reason = f"{report.outcome}: {report.error}"
                    return
                monitor.clear()  # its history is of the link before the switch
            timings["switched_at"] = time.monotonic()
            while True:
                health = await monitor.check_once()
                if health.state in ("up", "degraded"):
                    ok = True
                    break
                if time.monotonic() >= deadline:
                    reason = f"not verified: {health.reason}"
                    break
                await asyncio.sleep(VERIFY_INTERVAL_S)
            timings["verified_at"] = time.monotonic()
        except AgentError as exc:
            reason = str(exc)
        finally:
            for m in held:
                m.resume(reset=switched)
            self._events.put_nowait(
                SwitchDone(
                    layer=layer.name, ok=ok, now=time.monotonic(), reason=reason, timings=timings
                )
            )
            self._refeed(layer.modem)

    def _hold(self, modem: str) -> list[LayerMonitor]:
        """Pause health reports of every layer on a modem (its link is about to change)."""
        held = [self.monitors[x.name] for x in self.cfg.layers if x.modem == modem]
        for m in held:
            m.pause()
        return held

    def _refeed(self, modem: str) -> None:
        """Report the layers on a modem to the policy again (their profile may have changed)."""
        for x in self.cfg.layers:
            if x.modem == modem:
                self._feed(x.name)

    async def _switch_modem(self, session: ModemSession, iccid: str) -> SwitchReport:
        """A safe switch outside the policy's own activations: health reports on that modem
        are held while it runs, so the policy does not chase the switch's own outage."""
        held = self._hold(session.id)
        try:
            if session.enabled_iccid != iccid:
                await self._before_switch(session)
            return await session.safe_switch(iccid, self._probe_fn(iccid))
        finally:
            for m in held:
                m.resume(reset=True)
            self._refeed(session.id)

    async def _disable_emergency(self, name: str) -> None:
        layer = self._layer(name)
        session = self.sessions[layer.modem]
        home = self._home_profile(layer.modem)
        if home is None or session.enabled_iccid != layer.profile:
            return
        log.info("emergency_disabling", layer=name, restore_to=home)
        report = await self._switch_modem(session, home)
        event = {"layer": name, "restored": home, "outcome": report.outcome, "error": report.error}
        log.info("emergency_disabled", **event)
        if self.bridge is not None:
            self.bridge.publish_event(Event(type="emergency_disabled", data=event))

    # ---- commands (control socket and MQTT) ----------------------------------------------

    def status(self) -> dict[str, Any]:
        """Everything `esim-agent status --json` shows."""
        layers = []
        pol = summary(self.policy) if self.policy is not None else {}
        for layer in self.cfg.layers:
            state, reason = self._fed.get(layer.name, ("unknown", "no_data"))
            mon = self.monitors[layer.name].snapshot() if layer.name in self.monitors else None
            layers.append(
                {
                    "name": layer.name,
                    "role": layer.role,
                    "modem": layer.modem,
                    "profile": layer.profile,
                    "health": state,
                    "reason": reason,
                    "active": self.policy is not None and self.policy.active == layer.name,
                    "probe_interval_s": mon.round_interval_s if mon else None,
                    "probe_bytes": {"tx": mon.probe_tx_bytes, "rx": mon.probe_rx_bytes}
                    if mon
                    else None,
                    # This period's probe bytes from the ledger (in memory: no disk on the loop).
                    "probe_usage": self.usage.probe_snapshot(layer.name) if self.usage else None,
                }
            )
        modems = []
        for s in self.sessions.values():
            entry = s.summary()
            entry["info"] = msgspec.to_builtins(s.info) if s.info is not None else None
            entry["profiles"] = msgspec.to_builtins(s.profiles)
            modems.append(entry)
        return {
            "device_id": self.cfg.device_id,
            "active_layer": self.policy.active if self.policy else None,
            "phase": str(self.policy.phase) if self.policy else None,
            "layers": layers,
            "modems": modems,
            "policy": pol,
            "tasks": self.supervisor.snapshot(),
            "timeline": list(self.timeline)[-20:],
            "uptime_s": round(time.time() - self._started_at, 1),
        }

    def _session(self, modem: str | None) -> ModemSession:
        if modem is None:
            if len(self.sessions) == 1:
                return next(iter(self.sessions.values()))
            raise CommandRejected("invalid_payload", "name the modem")
        session = self.sessions.get(modem)
        if session is None:
            for s in self.sessions.values():
                if modem in (s.port, s.cfg.port):
                    return s
            raise CommandRejected("unknown_modem", f"no modem {modem!r}")
        return session

    def _check_profile(self, session: ModemSession, iccid: str) -> None:
        if not any(p.iccid == iccid for p in session.profiles):
            raise CommandRejected("iccid_not_found", f"no profile {iccid} on {session.id}")

    def _active_layer(self) -> LayerConfig | None:
        if self.policy is None or self.policy.active is None:
            return None
        return self._layer(self.policy.active)

    async def switch_layer(self, layer: str | None) -> dict[str, Any]:
        """Pin a layer (None unpins) and wait for the resulting transition."""
        if layer is not None and layer not in self.monitors:
            raise CommandRejected("unknown_layer", f"no layer {layer!r}")
        return await self._run_transition(ManualSwitch(layer=layer, now=time.monotonic()))

    async def drill(self) -> dict[str, Any]:
        """Move to the next usable lower layer now, as a rehearsal."""
        return await self._run_transition(Drill(now=time.monotonic()))

    async def _run_transition(self, event: PolicyEvent) -> dict[str, Any]:
        actions = await self.submit(event)
        records = [a.event for a in actions if isinstance(a, EmitEvent)]
        if not records:
            return {"accepted": True, "transition": None}
        first = records[0]
        if first.outcome != "pending":
            return {"accepted": first.outcome != "rejected", "transition": describe(first)}
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._record_waiters[first.id] = fut
        async with asyncio.timeout(self.cfg.timers.switch_timeout + 30):
            record = await fut
        return {"accepted": True, "transition": record}

    async def profile_enable(self, modem: str | None, iccid: str) -> dict[str, Any]:
        """Safe-switch a modem to iccid (refused on the active layer's modem)."""
        session = self._session(modem)
        self._check_profile(session, iccid)
        active = self._active_layer()
        if active is not None and active.modem == session.id and active.profile != iccid:
            raise CommandRejected(
                "not_allowed",
                f"{session.id} carries the active layer {active.name}: use switch_layer",
            )
        if session.switching:
            raise CommandRejected("busy", f"{session.id} is switching profiles right now")
        report = await self._switch_modem(session, iccid)
        return msgspec.to_builtins(report)  # type: ignore[no-any-return]

    async def profile_disable(self, modem: str | None, iccid: str) -> dict[str, Any]:
        """Disable a profile unless the active layer runs on it."""
        session = self._session(modem)
        self._check_profile(session, iccid)
        layer = next(
            (x for x in self.cfg.layers if x.modem == session.id and x.profile == iccid), None
        )
        if layer is not None and session.enabled_iccid == iccid:
            # Disabling it would leave the modem with no profile to register with; the policy
            # moves layers itself (switch_layer asks it to).
            raise CommandRejected(
                "not_allowed", f"{iccid} runs layer {layer.name}: use switch_layer instead"
            )

        async def op(lpa: Lpa) -> None:
            await lpa.disable_profile(iccid)

        await session.with_lpa(op)
        return {"iccid": iccid, "state": "disabled"}

    async def profile_nickname(
        self, modem: str | None, iccid: str, nickname: str
    ) -> dict[str, Any]:
        """Set a profile's nickname."""
        session = self._session(modem)
        self._check_profile(session, iccid)

        async def op(lpa: Lpa) -> None:
            await lpa.set_nickname(iccid, nickname)

        await session.with_lpa(op)
        return {"iccid": iccid, "nickname": nickname}

    async def _mqtt_command(self, name: str, args: dict[str, Any], ctx: CommandContext) -> object:
        log.info("mqtt_command", command=name, sender=ctx.sender, request_id=ctx.request_id)
        if name == "status":
            return self.status()
        if name == "switch_layer":
            return await self.switch_layer(args["layer"])
        if name == "drill":
            return await self.drill()
        if name == "profile_enable":
            return await self.profile_enable(args["modem"], args["iccid"])
        if name == "profile_disable":
            return await self.profile_disable(args["modem"], args["iccid"])
        if name == "profile_nickname":
            return await self.profile_nickname(args["modem"], args["iccid"], args["nickname"])
        raise CommandRejected("unknown_command", name)

    def _control_commands(self) -> dict[str, Callable[[dict[str, Any]], Awaitable[object]]]:
        async def status(_: dict[str, Any]) -> object:
            return self.status()

        async def switch_layer(a: dict[str, Any]) -> object:
            return await self.switch_layer(a.get("layer"))

        async def drill(_: dict[str, Any]) -> object:
            return await self.drill()

        async def profile_list(a: dict[str, Any]) -> object:
            session = self._session(a.get("modem"))
            return {"profiles": msgspec.to_builtins(await session.refresh_profiles())}

        async def profile_enable(a: dict[str, Any]) -> object:
            return await self.profile_enable(a.get("modem"), str(a["iccid"]))

        async def profile_disable(a: dict[str, Any]) -> object:
            return await self.profile_disable(a.get("modem"), str(a["iccid"]))

        async def profile_nickname(a: dict[str, Any]) -> object:
            return await self.profile_nickname(a.get("modem"), str(a["iccid"]), str(a["nickname"]))

        async def profile_delete(a: dict[str, Any]) -> object:
            session = self._session(a.get("modem"))
            iccid = str(a["iccid"])
            self._check_profile(session, iccid)

            async def op(lpa: Lpa) -> None:
                await lpa.delete_profile(iccid)

            await session.with_lpa(op)
            return {"iccid": iccid, "deleted": True}

        async def euicc_info(a: dict[str, Any]) -> object:
            session = self._session(a.get("modem"))

            async def op(lpa: Lpa) -> object:
                return await lpa.info()

            return msgspec.to_builtins(await session.with_lpa(op))

        async def notification_list(a: dict[str, Any]) -> object:
            session = self._session(a.get("modem"))

            async def op(lpa: Lpa) -> object:
                return await lpa.list_notifications()

            return {"notifications": msgspec.to_builtins(await session.with_lpa(op))}

        async def notification_remove(a: dict[str, Any]) -> object:
            session = self._session(a.get("modem"))
            seq = int(a["seq_number"])

            async def op(lpa: Lpa) -> None:
                await lpa.remove_notification(seq)

            await session.with_lpa(op)
            return {"seq_number": seq, "removed": True}

        async def modem_info(a: dict[str, Any]) -> object:
            session = self._session(a.get("modem"))
            session.poll_soon()
            return msgspec.to_builtins(session.info)

        return {
            "status": status,
            "switch_layer": switch_layer,
            "drill": drill,
            "profile_list": profile_list,
            "profile_enable": profile_enable,
            "profile_disable": profile_disable,
            "profile_nickname": profile_nickname,
            "profile_delete": profile_delete,
            "euicc_info": euicc_info,
            "notification_list": notification_list,
            "notification_remove": notification_remove,
            "modem_info": modem_info,
        }

    # ---- MQTT publishing -----------------------------------------------------------------

    def _mqtt_settings(self) -> MqttSettings:
        return settings_from_config(self.cfg, self.config_path)

    def _publish(self, key: str, payload: msgspec.Struct | dict[str, Any]) -> None:
        """Publish retained state when it changed (timestamps aside): siblings on metered
        links should not pay for a poll that found nothing new."""
        if self.bridge is None:
            return
        value = msgspec.to_builtins(payload)
        comparable = {k: v for k, v in value.items() if k not in ("updated_at", "checked_at")}
        if self._published.get(key) == comparable:
            return
        self._published[key] = comparable
        self.bridge.publish_state(key, payload)

    def _publish_modem(self, session: ModemSession) -> None:
        if self.bridge is None:
            return
        if session.info is not None:
            state = ModemState.from_info(
                session.id, session.info, port=session.port, online=session.online, eid=session.eid
            )
        else:
            state = ModemState(id=session.id, port=session.port, online=session.online)
        self._publish(f"modems/{session.id}", state)
        self._publish(
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
        self._publish_device()

    def _publish_layers(self) -> None:
        if self.bridge is None:
            return
        active = self.policy.active if self.policy is not None else None
        self._publish(
            "layers",
            LayersState(
                active=active,
                layers=[
                    LayerEntry(
                        name=x.name,
                        role=x.role,
                        modem=x.modem,
                        profile=x.profile,
                        health=self._fed.get(x.name, ("unknown", ""))[0],
                        active=x.name == active,
                    )
                    for x in self.cfg.layers
                ],
            ),
        )

    def _publish_health(self, name: str) -> None:
        if self.bridge is None:
            return
        snap = self.monitors[name].snapshot()
        state, reason = self._fed.get(name, (snap.state, snap.reason))
        latencies = [p.latency_ms for p in snap.probes if p.latency_ms is not None]
        self._publish(
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

    def _publish_device(self) -> None:
        if self.bridge is None:
            return
        active = self._active_layer()
        connected = active is not None and self._fed.get(active.name, ("down", ""))[0] in (
            "up",
            "degraded",
        )
        self._publish(
            "state",
            DeviceState(
                device_id=self.cfg.device_id,
                active_layer=active.name if active else None,
                active_profile=active.profile if active else None,
                connectivity=connected,
            ),
        )
