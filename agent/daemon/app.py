"""The composition root: builds the daemon's parts from the config, runs them, reloads them.

The parts live in their own modules: sessions (session.py), the command table (commands.py),
retained MQTT state (publish.py), usage glue (metering.py), reload by difference (reload.py),
machine checks (preflight.py), the watchdog's progress test (liveness.py), hooks (hooks.py).
What stays here is wiring and the policy loop that carries out the policy's actions.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from agent.config import Config, LayerConfig, load_config
from agent.daemon import sdnotify
from agent.daemon.actuator import Actuator
from agent.daemon.commands import CommandTable, DaemonCommands
from agent.daemon.control import ControlError, ControlServer, DaemonAlreadyRunning
from agent.daemon.datalinks import DataLinks
from agent.daemon.devices import start_finder
from agent.daemon.evidence import EvidenceFeeds
from agent.daemon.hooks import HookQueue
from agent.daemon.liveness import session_bound, stalled
from agent.daemon.metering import Metering
from agent.daemon.notify import NotificationCourier
from agent.daemon.preflight import (
    EX_CANTCREAT,
    EX_NOPERM,
    EX_RUNTIME,
    EX_TEMPFAIL,
    PreflightError,
    control_socket_problem,
    port_problem,
    state_dir_media_failure,
    state_dir_problem,
)
from agent.daemon.provision import Provisioner
from agent.daemon.publish import StatePublisher
from agent.daemon.reload import ReloadPlan, carry_policy, plan, restart_needed
from agent.daemon.session import ModemSession
from agent.daemon.siblings import SiblingSide
from agent.daemon.supervisor import Supervisor
from agent.daemon.timeline import Timeline, describe
from agent.daemon.transfer import TransferService
from agent.errors import ConfigError
from agent.euicc.switch import SwitchReport
from agent.health.detect import Evidence
from agent.health.layer import LayerHealth as MonitorHealth
from agent.health.layer import Thresholds
from agent.health.monitor import LayerMonitor
from agent.health.probes import LinkBinding, Probe, probe_from_spec
from agent.modem.finder import Finder
from agent.mqtt.bridge import MqttBridge, MqttSettings
from agent.mqtt.reach import settings_from_config
from agent.policy.engine import (
    Action,
    EmitEvent,
    Health,
    LayerHealth,
    PolicyConfig,
    PolicyState,
    Tick,
    initial_state,
    transition,
)
from agent.policy.engine import Event as PolicyEvent

log = structlog.get_logger(__name__)

#: Policy timers (failback dwell, hold-down) fire on ticks: a coarse tick delays them.
TICK_S = 0.25
#: At most this long for every modem's first connection attempt before the first decision.
STARTUP_WAIT_S = 15.0
#: At most this long for the first probe round of the layers that can give evidence.
FIRST_ROUND_MAX_S = 15.0
TIMELINE_KEEP = 200


def boot_prefix(device_id: str) -> str:
    """Transition id prefix unique to this process start (ms since the epoch, base 36): ids
    never repeat across restarts, and reloads keep the counter."""
    ms = time.time_ns() // 1_000_000
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while ms:
        ms, r = divmod(ms, 36)
        out = digits[r] + out
    return f"{device_id}-{out or '0'}"


@dataclass
class _Built:
    """Parts built for a reload before any of them replaces a running one."""

    sessions: dict[str, ModemSession] = field(default_factory=dict)
    monitors: dict[str, LayerMonitor] = field(default_factory=dict)
    probes: dict[str, list[tuple[str, Probe, float]]] = field(default_factory=dict)
    policy_config: PolicyConfig | None = None
    bridge: MqttBridge | None = None
    control: ControlServer | None = None
    metering: Metering | None = None

    async def discard(self) -> None:
        if self.control is not None:
            await self.control.close()
        if self.metering is not None:
            await self.metering.close()


class Daemon:
    """Everything `esim-agent run` does; one instance per process."""

    def __init__(self, cfg: Config, config_path: str | None = None) -> None:
        self.config_path = config_path
        self.cfg = cfg
        self.started_at = time.time()
        self._stop = asyncio.Event()
        self._reload = asyncio.Event()
        self.sessions: dict[str, ModemSession] = {}
        self.monitors: dict[str, LayerMonitor] = {}
        self.layer_probes: dict[str, list[tuple[str, Probe, float]]] = {}
        self.supervisor = Supervisor()
        self.bridge: MqttBridge | None = None
        self.control: ControlServer | None = None
        self.policy: PolicyState | None = None
        self.metering: Metering | None = None
        #: Discovery (udev or the emulator's feed): finds usb/imei entries, follows hotplug.
        self.finder: Finder | None = None
        #: (state, reason) per layer as last reported to the policy.
        self.fed: dict[str, tuple[str, str]] = {}
        #: The data path: interfaces, data connections, routes, probe bindings (network.md).
        self.datalinks: DataLinks | None = None
        self.publisher = StatePublisher(lambda: self.bridge, self.interface)
        self.hooks = HookQueue()
        self.timeline = Timeline(
            self.publisher.event,
            lambda record: self.hooks.submit(
                self.cfg.hooks.on_transition, record, self.cfg.hooks.timeout
            ),
            keep=TIMELINE_KEEP,
        )
        self.actuator = Actuator(self)
        #: Profile downloads (on request and store and forward), on a working layer only.
        self.provision = Provisioner(self)
        #: Sibling layers and the group claim (docs/siblings.md); idle without a [group].
        self.siblings = SiblingSide(self)
        #: Passive evidence (URCs, link events, interface counters) for the layer monitors.
        self.evidence = EvidenceFeeds(
            lambda m: [
                self.monitors[x.name]
                for x in self.cfg.layers
                if x.modem == m and x.name in self.monitors
            ]
        )
        self.evidence.listeners.append(self._on_evidence)
        #: Pending eUICC notifications to their SM-DP+ (docs/euicc.md).
        self.courier = NotificationCourier(self)
        #: Profile transfers between devices, both sides; journaled in state_dir.
        self.transfers = TransferService(self)
        self.commands: CommandTable = DaemonCommands(self).table()
        self._events: asyncio.Queue[PolicyEvent] = asyncio.Queue()
        self._policy_open = False
        self._health_changed = asyncio.Event()
        self._policy_beat: float | None = None
        self._stall: str | None = None
        self._processed: dict[int, asyncio.Future[list[Action]]] = {}

    # ---- running -------------------------------------------------------------------------

    async def run(self) -> int:
        """Run until SIGTERM/SIGINT; SIGHUP reloads the config. Returns the exit status."""
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._stop.set)
        loop.add_signal_handler(signal.SIGINT, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload.set)
        status = 0
        started = False
        try:
            await self._start()
            started = True
            while True:
                stop = asyncio.create_task(self._stop.wait())
                reload = asyncio.create_task(self._reload.wait())
                await asyncio.wait({stop, reload}, return_when=asyncio.FIRST_COMPLETED)
                stop.cancel()
                reload.cancel()
                if self._stop.is_set():
                    break
                self._reload.clear()
                await self.reload()
        except PreflightError as exc:
            log.error("daemon_start_failed", error=str(exc), exit_status=exc.exit_status)
            status = exc.exit_status
        finally:
            sdnotify.stopping()
            if started:
                log.info("daemon_stopping")
            await self._shutdown()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
        if started:
            log.info("daemon_stopped")
        return status

    def request_stop(self) -> None:
        """Stop as SIGTERM would (for embedding and tests)."""
        self._stop.set()

    async def _start(self) -> None:
        cfg = self.cfg
        problem = state_dir_problem(cfg.state_dir, create=True)
        if problem is not None:
            media = state_dir_media_failure(cfg.state_dir)
            if media is None:
                raise PreflightError(problem, EX_CANTCREAT)
            # A failing disk must not stop failover: usage is counted in memory meanwhile.
            log.warning("state_dir_unusable", state_dir=cfg.state_dir, error=media)
        for m in cfg.modems:
            if m.port is not None and (problem := port_problem(m.port)) is not None:
                raise PreflightError(problem, EX_NOPERM)
        log.info("daemon_starting", device_id=cfg.device_id, modems=len(cfg.modems))
        # The socket first: a second daemon on it must stop before it touches any port.
        self.control = await self._open_control(cfg.control_socket)
        self.metering = await self._open_metering(cfg)
        self.finder = await start_finder(cfg.discovery)
        # Before the probes are built (they bind to their layer's link); sweeps what a killed
        # run left in the kernel. Never opens netlink when no modem has an interface.
        self.datalinks = await DataLinks.open(
            cfg, self.supervisor, Path(self.config_path).parent if self.config_path else None
        )
        for mcfg in cfg.modems:
            self.sessions[mcfg.id] = self._new_session(cfg, mcfg.id)
        for layer in cfg.layers:
            if not layer.is_sibling:
                monitor, self.layer_probes[layer.name] = self._new_monitor(cfg, layer)
                self.monitors[layer.name] = monitor
        self.siblings.build_monitors(self._binding)
        self.policy = initial_state(
            PolicyConfig.from_config(cfg), time.monotonic(), id_prefix=boot_prefix(cfg.device_id)
        )
        if cfg.mqtt.enabled:
            self.bridge = self._new_bridge(cfg)
            self.supervisor.start("mqtt", self.bridge.run)
            self._publish_layers()
            self._publish_device()
        self.supervisor.start("hooks", self.hooks.run)
        self.supervisor.start("pool-duty", self._pool_duty)
        for session in self.sessions.values():
            self.supervisor.start(f"modem-{session.id}", session.run)
        # Each modem's first attempt, not its success: an absent modem fails at once and
        # must not hold the others (nor READY=1).
        await self._wait_all([s.attempted.wait() for s in self.sessions.values()], STARTUP_WAIT_S)
        await self._recover_euicc_state()
        for name, monitor in self.monitors.items():
            self.supervisor.start(f"health-{name}", monitor.run)
        for m in cfg.modems:
            self._start_links(m.id)
        await self._first_probe_round()
        self._open_policy()
        self.siblings.start(self.supervisor)
        self.supervisor.start("policy", self._policy_loop)
        self.supervisor.start("tick", self._tick_loop)
        self.supervisor.start("notifications", self.courier.run)
        self.supervisor.start("provision", self.provision.run)
        # After the eUICC recovery and with the policy running: a transfer cut short by a
        # restart continues from its journaled step.
        self.transfers.resume()
        if sdnotify.watchdog_interval() is not None:
            self.supervisor.start("watchdog", lambda: sdnotify.run_watchdog(self._alive))
        sdnotify.ready(f"running; {len(self.sessions)} modem(s)")
        log.info("daemon_ready", control=cfg.control_socket)

    async def _open_control(self, path: str) -> ControlServer:
        problem = control_socket_problem(path, create=True)
        if problem is not None:
            raise PreflightError(problem, EX_CANTCREAT)
        control = ControlServer(path, self.commands.control)
        try:
            await control.start()
        except DaemonAlreadyRunning as exc:
            raise PreflightError(str(exc), EX_TEMPFAIL) from None
        except ControlError as exc:
            raise PreflightError(str(exc), EX_RUNTIME) from None
        return control

    @staticmethod
    async def _wait_all(waits: list[Coroutine[Any, Any, Any]], timeout: float) -> None:
        if not waits:
            return
        tasks = [asyncio.create_task(w) for w in waits]
        await asyncio.wait(tasks, timeout=timeout)
        for t in tasks:
            t.cancel()

    async def _first_probe_round(self) -> None:
        """Give every layer that can answer its first probe round before the first decision,
        so a lower layer whose probe happens to answer first is not chosen over a healthy
        higher one (and then kept for failback_stable). Bounded, and absent modems are not
        waited for."""
        assert self.policy is not None
        waiting = [
            spec.name
            for spec in self.policy.config.layers
            if not spec.dormant
            and self.layer_probes.get(spec.name)
            and self.sessions[spec.modem].online
        ]
        bound = max(
            (p.timeout for x in self.cfg.layers if x.name in waiting for p in x.probes),
            default=0.0,
        )

        async def answered() -> None:
            while any(self._effective_health(n)[0] == "unknown" for n in waiting):
                self._health_changed.clear()
                await self._health_changed.wait()

        if waiting:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(bound + 2.0, FIRST_ROUND_MAX_S)):
                    await answered()
            log.info(
                "first_probe_round",
                layers={n: self._effective_health(n)[0] for n in waiting},
            )

    def _open_policy(self) -> None:
        """Start reporting to the policy: every layer once, in priority order, so the first
        decision sees the higher layers before the lower ones."""
        self._policy_open = True
        self.fed.clear()
        for layer in self.cfg.layers:
            self.feed(layer.name)

    async def _shutdown(self) -> None:
        await self.transfers.close()
        await self.actuator.stop()
        if self.bridge is not None:
            with contextlib.suppress(Exception):
                await self.bridge.close()
        await self.supervisor.stop()
        if self.control is not None:
            await self.control.close()
        self.evidence.close()
        if self.datalinks is not None:
            # Every route, rule and address the agent added goes with it.
            await self.datalinks.close(clean=True)
        if self.metering is not None:
            await self.metering.close()
        if self.finder is not None:
            await self.finder.stop()

    def _alive(self) -> bool:
        if self._stop.is_set():
            return False
        now = time.monotonic()
        problem = stalled(
            now,
            self._policy_beat,
            (
                (
                    s.id,
                    s.last_tick,
                    session_bound(
                        s.cfg.poll_interval,
                        s.switching,
                        self.cfg.timers.switch_timeout,
                        self.provision.downloading(s.id),
                    ),
                )
                for s in self.sessions.values()
            ),
        )
        if problem != self._stall:
            self._stall = problem
            if problem is not None:
                log.error("daemon_stalled", problem=problem)
            else:
                log.info("daemon_progressing")
        return problem is None

    # ---- building parts --------------------------------------------------------------------

    def _new_session(self, cfg: Config, modem_id: str) -> ModemSession:
        return ModemSession(
            cfg.modem(modem_id),
            state_dir=Path(cfg.state_dir),
            on_update=self._on_session_update,
            rollback_timeout=cfg.timers.rollback_timeout,
            on_poll=self._sample_usage,
            finder=self.finder,
            dbus_address=cfg.discovery.dbus_address,
        )

    def _new_monitor(
        self, cfg: Config, layer: LayerConfig
    ) -> tuple[LayerMonitor, list[tuple[str, Probe, float]]]:
        h = cfg.health
        thresholds = Thresholds(
            rssi_dbm_min=float(h.rssi_dbm_min) if h.rssi_dbm_min is not None else float("-inf"),
            rsrp_dbm_min=h.rsrp_dbm_min if h.rsrp_dbm_min is not None else float("-inf"),
            down_after=h.down_after,
            up_after=h.up_after,
            degraded_ratio=h.degraded_ratio,
        )
        link = self._binding(layer.name)
        probes = [
            (f"{p.kind}{i}", probe_from_spec(p.kind, p.target, p.timeout, link), p.interval)
            for i, p in enumerate(layer.probes)
        ]
        ifname = self.interface(layer.modem)
        monitor = LayerMonitor(
            layer.name,
            probes,
            None,
            thresholds,
            self._on_monitor_change,
            window_size=max((p.window for p in layer.probes), default=5),
            failure_interval=h.failure_interval,
            traffic_aware=h.traffic_aware,
            probe_budget=h.probe_budget,
            counters=self.evidence.counters_source(lambda: self.interface(layer.modem))
            if ifname is not None or cfg.modem(layer.modem).interface == "auto"
            else None,
        )
        monitor.probe_gate = self._gate(layer.modem, layer.profile)
        return monitor, probes

    def _start_links(self, modem_id: str) -> None:
        """Carrier and address events of the modem's network interface, when it names one."""
        ifname = self.interface(modem_id)
        if ifname is not None:
            self.supervisor.start(f"links-{modem_id}", self.evidence.link_task(modem_id, ifname))

    def interface(self, modem_id: str) -> str | None:
        """The modem's network interface: one answer for probes, counters, usage, status."""
        if self.datalinks is None or modem_id not in self.datalinks.datapath.modems():
            return None
        return self.datalinks.interface(modem_id)

    def link_status(self, layer: str) -> dict[str, object]:
        """A layer's `interface`, `addresses`, default-route `metric`, `default` and `data`."""
        if self.datalinks is None or layer not in self.datalinks.datapath.layers():
            return {
                "interface": None,
                "addresses": [],
                "metric": None,
                "default": False,
                "data": None,
            }
        return self.datalinks.layer_status(layer)

    def _binding(self, layer: str) -> LinkBinding | None:
        if self.datalinks is None or layer not in self.datalinks.datapath.layers():
            return None  # a layer a reload added: unbound until the next start
        return self.datalinks.binding(layer)

    def _on_evidence(self, modem_id: str, ev: Evidence) -> None:
        if self.datalinks is not None:
            self.datalinks.evidence(modem_id, ev)

    def _new_bridge(self, cfg: Config) -> MqttBridge:
        bridge = MqttBridge(self._mqtt_settings(cfg), cfg.device_id, self.commands.mqtt)
        self.siblings.attach(bridge)
        # Siblings' shares of pools (ours go out after each poll), and the plan manager's duty.
        for topic_filter in Metering.topic_filters(cfg):
            bridge.watch(topic_filter, self._on_sibling)
        return bridge

    def _gate(self, modem: str, profile: str) -> Callable[[], bool]:
        def running() -> bool:
            # Looked up on each round: a reload may replace the session.
            session = self.sessions.get(modem)
            return session is not None and (
                not session.profiles or session.enabled_iccid == profile
            )

        return running

    def _mqtt_settings(self, cfg: Config) -> MqttSettings:
        return settings_from_config(cfg, self.config_path)

    # ---- reload by difference --------------------------------------------------------------

    async def reload(self) -> bool:
        """SIGHUP: apply what changed in the config file; True when a new config was taken."""
        if self.config_path is None:
            log.warning("config_reload_skipped", reason="no config file")
            return False
        sdnotify.reloading()
        try:
            new = load_config(self.config_path)
            diff = plan(self.cfg, new)
            if (why := restart_needed(self.cfg, new)) is not None:
                raise ConfigError(self.config_path, "group", why)
            built = await self._build(new, diff)
        except (ConfigError, PreflightError) as exc:
            log.error("config_reload_refused", error=str(exc))
            sdnotify.ready("config reload refused; old config kept")
            return False
        except Exception as exc:  # whatever fails while building, the old config keeps running
            log.error("config_reload_refused", error=f"{type(exc).__name__}: {exc}")
            sdnotify.ready("config reload refused; old config kept")
            return False
        log.info(
            "config_reloading",
            file=self.config_path,
            modems=sorted(diff.modems_new),
            layers=sorted(diff.layers_new),
            policy=diff.policy_changed,
            mqtt=diff.mqtt_changed,
            unchanged=diff.nothing,
        )
        await self._apply(new, diff, built)
        sdnotify.ready(f"reloaded; active layer: {self._active_name() or 'none'}")
        log.info("config_reloaded", active_layer=self._active_name())
        return True

    async def _build(self, new: Config, diff: ReloadPlan) -> _Built:
        """Everything the new config needs that is not running yet; raises (and leaves
        nothing behind) when any of it cannot be built."""
        built = _Built()
        try:
            if diff.state_dir_changed:
                problem = state_dir_problem(new.state_dir, create=True)
                if problem is not None:
                    raise PreflightError(problem, EX_CANTCREAT)
            for m in new.modems:
                if m.id in diff.modems_new and m.port and (problem := port_problem(m.port)):
                    raise PreflightError(problem, EX_NOPERM)
            if diff.control_changed:
                built.control = await self._open_control(new.control_socket)
            if diff.state_dir_changed:
                built.metering = await self._open_metering(new)
            for modem_id in diff.modems_new:
                built.sessions[modem_id] = self._new_session(new, modem_id)
            for layer in new.layers:
                if layer.name in diff.layers_new and not layer.is_sibling:
                    monitor, probes = self._new_monitor(new, layer)
                    built.monitors[layer.name], built.probes[layer.name] = monitor, probes
            built.policy_config = PolicyConfig.from_config(new)
            if diff.mqtt_changed and new.mqtt.enabled:
                built.bridge = self._new_bridge(new)
        except BaseException:
            await built.discard()
            raise
        return built

    async def _apply(self, new: Config, diff: ReloadPlan, built: _Built) -> None:
        # Stop what goes away first: a changed modem's new session needs its port.
        for name in diff.layers_removed:
            await self.supervisor.stop_task(f"health-{name}")
            self.monitors.pop(name, None)
            self.layer_probes.pop(name, None)
            self.fed.pop(name, None)
        for modem_id in diff.modems_removed:
            await self.supervisor.stop_task(f"links-{modem_id}")
            await self.supervisor.stop_task(f"modem-{modem_id}")
            self.sessions.pop(modem_id, None)
        self.cfg = new
        if built.metering is not None:
            old_metering, self.metering = self.metering, built.metering
            if old_metering is not None:
                await old_metering.close()
        elif self.metering is not None:
            self.metering.reconfigure(new)
        await self.supervisor.stop_task("pool-duty")
        self.supervisor.start("pool-duty", self._pool_duty)
        if built.control is not None:
            old_control, self.control = self.control, built.control
            if old_control is not None:
                await old_control.close()
        if diff.mqtt_changed:
            old_bridge, self.bridge = self.bridge, built.bridge
            await self.supervisor.stop_task("mqtt")
            if old_bridge is not None:
                with contextlib.suppress(Exception):
                    await old_bridge.close()
            self.publisher.forget()
            if self.bridge is not None:
                self.supervisor.start("mqtt", self.bridge.run)
        if self.policy is not None and built.policy_config is not None:
            self.policy = carry_policy(self.policy, built.policy_config)
        self.sessions.update(built.sessions)
        self.monitors.update(built.monitors)
        self.layer_probes.update(built.probes)
        # Keep the file's order (the sessions' order is what status shows).
        self.sessions = {m.id: self.sessions[m.id] for m in new.modems if m.id in self.sessions}
        self.monitors = {
            x.name: self.monitors[x.name] for x in new.layers if x.name in self.monitors
        }
        for modem_id in built.sessions:
            self.supervisor.start(f"modem-{modem_id}", self.sessions[modem_id].run)
            self._start_links(modem_id)
        for name in built.monitors:
            self.supervisor.start(f"health-{name}", self.monitors[name].run)
        for layer in new.layers:
            self.feed(layer.name)
        self._publish_layers()
        self._publish_device()
        for session in self.sessions.values():
            self.publisher.modem(session)

    # ---- eUICC state after a crash ------------------------------------------------------

    async def _recover_euicc_state(self) -> None:
        """After a crash mid-switch: no modem may stay without a profile or on a stray one."""
        for session in self.sessions.values():
            if not session.online or not session.profiles:
                continue
            home = self.home_profile(session.id)
            enabled = session.enabled_iccid
            if home is None:
                # Only an emergency on this modem (a group holder): asleep until woken again.
                await self.actuator.sleep_modem_emergency(session.id, enabled)
                continue
            emergency = {layer.profile for layer in self.cfg.layers if layer.role == "emergency"}
            if (
                enabled is None
                and self.policy is not None
                and any(sp.companion for sp in self.policy.config.layers)
            ):
                continue  # a companion's own profile sleeps while its sibling carries it
            if enabled is None or enabled in emergency:
                log.warning("euicc_recovering", modem=session.id, enabled=enabled, restore_to=home)
                report = await self.switch_modem(session, home)
                log.info("euicc_recovered", modem=session.id, outcome=report.outcome)

    def home_profile(self, modem: str) -> str | None:
        """The profile a modem should run when no emergency is on: its top non-emergency layer."""
        for layer in self.cfg.layers:
            if layer.modem == modem and layer.role != "emergency":
                return layer.profile
        return None

    # ---- usage -----------------------------------------------------------------------------

    async def _sample_usage(self, session: ModemSession) -> None:
        if self.metering is not None:
            monitors = [
                (x.name, self.monitors[x.name])
                for x in self.cfg.layers
                if x.modem == session.id and x.name in self.monitors
            ]
            await self.metering.sample(session, monitors, self.interface(session.id))

    def _on_sibling(self, topic: str, payload: bytes) -> None:
        if self.metering is not None:
            self.metering.on_message(topic, payload)

    async def _open_metering(self, cfg: Config) -> Metering:
        return await Metering.open(
            cfg,
            self.publisher,
            self.actuator.spawn,
            commands=self.commands.call,
            connected=lambda: self.bridge is not None and self.bridge.connected,
        )

    async def _pool_duty(self) -> None:
        if self.metering is not None:
            await self.metering.run()

    # ---- health → policy -----------------------------------------------------------------

    def _layer(self, name: str) -> LayerConfig:
        return self.cfg.layer(name)

    def _active_name(self) -> str | None:
        return self.policy.active if self.policy is not None else None

    def _effective_health(self, name: str) -> tuple[str, str]:
        layer = self._layer(name)
        session = self.sessions.get(layer.modem)
        monitor = self.monitors.get(name)
        if session is None or monitor is None:
            return "unknown", "no_data"
        if session.profiles and session.enabled_iccid != layer.profile:
            # The probes reach whatever profile the modem runs; they say nothing about this one.
            return "down", "profile_inactive"
        if not session.online and session.last_error is not None:
            return "down", f"modem_offline: {session.last_error}"
        health = monitor.health
        return health.state, health.reason

    def feed(self, name: str) -> None:
        """Report a layer's effective health to the policy when it changed."""
        if name not in self.monitors:
            return
        state, reason = self._effective_health(name)
        if self._policy_open and self.fed.get(name) != (state, reason):
            self.fed[name] = (state, reason)
            log.info("layer_health", layer=name, state=state, reason=reason)
            self.post(
                LayerHealth(layer=name, health=Health(state), reason=reason, now=time.monotonic())
            )
            self._publish_layers()
            self.courier.link_changed()
            self.provision.link_changed()
        self.publisher.health(name, self.monitors[name].snapshot(), self.fed)

    def _on_monitor_change(self, name: str, _health: MonitorHealth) -> None:
        self._health_changed.set()
        self.feed(name)

    def _on_session_update(self, session: ModemSession) -> None:
        if self.sessions.get(session.id) is not session:
            return  # a session a reload replaced, reporting on its way out
        if session.modem is not None:
            self.evidence.watch_channel(session.id, session.modem.channel)
        if self.datalinks is not None and session.id in self.datalinks.datapath.modems():
            self.actuator.spawn(f"datalink-{session.id}", self.datalinks.follow(session))
        for layer in self.cfg.layers:
            if layer.modem == session.id and layer.name in self.monitors:
                self.monitors[layer.name].update_signals(session.signals())
                self.feed(layer.name)
        self.publisher.modem(session)
        self._publish_device()
        self.courier.session_updated(session)
        self.provision.link_changed()

    # ---- the policy loop -------------------------------------------------------------------

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            self._events.put_nowait(Tick(now=time.monotonic()))
            self.siblings.tick()

    async def _policy_loop(self) -> None:
        while True:
            event = await self._events.get()
            self._policy_beat = time.monotonic()
            assert self.policy is not None
            before = (self.policy.active, self.policy.phase)
            self.policy, actions = transition(self.policy, event)
            waiter = self._processed.pop(id(event), None)
            if waiter is not None and not waiter.done():
                waiter.set_result(actions)
            for action in actions:
                self.actuator.execute(action)
            self.siblings.after_policy(self.policy)
            if (self.policy.active, self.policy.phase) != before:
                self.provision.link_changed()
                self._publish_layers()
                self._publish_device()
                sdnotify.status(f"active layer: {self.policy.active or 'none'}")
                self.courier.link_changed()

    async def submit(self, event: PolicyEvent) -> list[Action]:
        """Hand an event to the policy and return the actions it decided."""
        fut: asyncio.Future[list[Action]] = asyncio.get_running_loop().create_future()
        self._processed[id(event)] = fut
        self._events.put_nowait(event)
        async with asyncio.timeout(10):
            return await fut

    async def run_transition(self, event: PolicyEvent) -> dict[str, Any]:
        """Submit a manual switch or drill and wait for the transition it started, if any."""
        actions = await self.submit(event)
        records = [a.event for a in actions if isinstance(a, EmitEvent)]
        if not records:
            return {"accepted": True, "transition": None}
        first = records[0]
        if first.outcome != "pending":
            return {"accepted": first.outcome != "rejected", "transition": describe(first)}
        record = await self.timeline.wait_for(first.id, self.cfg.timers.switch_timeout + 30)
        return {"accepted": True, "transition": record}

    def post(self, event: PolicyEvent) -> None:
        """Hand an event to the policy loop without waiting."""
        self._events.put_nowait(event)

    async def before_switch(self, session: ModemSession) -> None:
        """Count the bytes since the last poll: the switch restarts the modem's counters."""
        if self.metering is not None:
            await self.metering.before_switch(session)

    async def switch_modem(self, session: ModemSession, iccid: str) -> SwitchReport:
        """A safe switch asked for outside the policy (commands, recovery)."""
        return await self.actuator.switch_modem(session, iccid)

    # ---- MQTT publishing -----------------------------------------------------------------

    def _active_layer(self) -> LayerConfig | None:
        name = self._active_name()
        if name is None:
            return None
        try:
            return self._layer(name)
        except KeyError:
            return None

    def publish_summary(self) -> None:
        """Publish the layers and the device summary again (a layer's health changed)."""
        self._publish_layers()
        self._publish_device()

    def _publish_layers(self) -> None:
        self.publisher.layers(self.cfg.layers, self._active_name(), self.fed)

    def _publish_device(self) -> None:
        self.publisher.device(self.cfg.device_id, self._active_layer(), self.fed)
