"""Per-layer monitor: runs probes on their intervals, polls modem signals, publishes changes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import msgspec
import structlog

from agent.health.layer import UNKNOWN, LayerHealth, ModemSignals, Thresholds, evaluate
from agent.health.probes import Probe, ProbeResult
from agent.health.window import ProbeWindow

log = structlog.get_logger(__name__)

ProbeEntry = tuple[str, Probe, float]
SignalsSource = Callable[[], Awaitable[ModemSignals]]
OnChange = Callable[[str, LayerHealth], None]

DEFAULT_WINDOW_SIZE = 10
DEFAULT_SIGNALS_INTERVAL_S = 30.0  # ModemManager's polling period
DEFAULT_SIGNALS_TIMEOUT_S = 15.0
# A probe enforces its own timeout; this margin only catches a probe that forgot to.
PROBE_GUARD_MARGIN_S = 2.0


class ProbeStats(msgspec.Struct, kw_only=True):
    """One probe's line in the MQTT `health` payload."""

    name: str
    kind: str
    target: str
    interval_s: float
    last: ProbeResult | None
    latency_ms: float | None
    ratio: float | None
    samples: int
    consecutive_failures: int
    consecutive_successes: int


class LayerSnapshot(msgspec.Struct, kw_only=True):
    """A layer's published health, whether decisions are paused, its signals and probe stats."""

    name: str
    state: str
    reason: str
    paused: bool
    signals: ModemSignals | None
    probes: list[ProbeStats]


class LayerMonitor:
    """Runs one layer's probes inside `run()` and calls on_change(name, health) on each change."""

    def __init__(
        self,
        name: str,
        probes: list[ProbeEntry],
        signals_source: SignalsSource | None,
        thresholds: Thresholds,
        on_change: OnChange,
        *,
        window_size: int = DEFAULT_WINDOW_SIZE,
        signals_interval: float = DEFAULT_SIGNALS_INTERVAL_S,
        signals_timeout: float = DEFAULT_SIGNALS_TIMEOUT_S,
    ) -> None:
        names = [entry[0] for entry in probes]
        if len(set(names)) != len(names):
            raise ValueError(f"layer {name}: probe names must be unique: {names}")
        self.name = name
        self._probes = probes
        self._signals_source = signals_source
        self.thresholds = thresholds
        self._on_change = on_change
        self._signals_interval = signals_interval
        self._signals_timeout = signals_timeout
        self._windows = {entry[0]: ProbeWindow(window_size) for entry in probes}
        self._last: dict[str, ProbeResult] = {}
        self._last_ok_latency: dict[str, float] = {}
        self._signals: ModemSignals | None = None
        self._health = UNKNOWN
        self._paused = False
        #: When set and false, the probe loops skip their rounds (check_once still probes):
        #: a layer whose profile is not running has nothing of its own to measure, and on a
        #: metered link every probe costs.
        self.probe_gate: Callable[[], bool] | None = None
        self._log = log.bind(layer=name)

    @property
    def health(self) -> LayerHealth:
        """The last published health (frozen while paused)."""
        return self._health

    @property
    def paused(self) -> bool:
        """True between pause() and resume()."""
        return self._paused

    async def run(self) -> None:
        """Probe and poll until cancelled; one task per probe plus one for modem signals."""
        async with asyncio.TaskGroup() as tg:
            for name, probe, interval in self._probes:
                tg.create_task(
                    self._probe_loop(name, probe, interval), name=f"health-{self.name}-{name}"
                )
            if self._signals_source is not None:
                tg.create_task(
                    self._signals_loop(self._signals_source), name=f"health-{self.name}-signals"
                )

    def pause(self) -> None:
        """Stop publishing changes (probes keep running and recording), e.g. during a switch."""
        if not self._paused:
            self._paused = True
            self._log.info("layer_health_paused")

    def resume(self, *, reset: bool = False) -> None:
        """Publish again, re-evaluating at once; reset=True forgets probe history first."""
        if reset:
            self.clear()
        if self._paused:
            self._paused = False
            self._log.info("layer_health_resumed", reset=reset)
        self._publish()

    def clear(self) -> None:
        """Forget probe history and health (after the link under the layer changed)."""
        for window in self._windows.values():
            window.clear()
        self._last.clear()
        self._last_ok_latency.clear()
        self._health = UNKNOWN

    async def check_once(self) -> LayerHealth:
        """Run every probe once now, record the results and return the fresh evaluation."""
        async with asyncio.TaskGroup() as tg:
            tasks = [
                (name, tg.create_task(self._run_probe(name, probe)))
                for name, probe, _ in self._probes
            ]
        for name, task in tasks:
            self._record(name, task.result())
        self._publish()
        return evaluate(self._signals, self._windows, self.thresholds, self._health)

    def update_signals(self, signals: ModemSignals | None) -> None:
        """Feed modem signals pushed from elsewhere (URCs) instead of, or besides, polling."""
        self._signals = signals
        self._publish()

    def snapshot(self) -> LayerSnapshot:
        """Per-probe stats and the published health, ready for msgspec.json.encode."""
        stats = [
            ProbeStats(
                name=name,
                kind=probe.kind,
                target=probe.target,
                interval_s=interval,
                last=self._last.get(name),
                latency_ms=self._last_ok_latency.get(name),
                ratio=self._windows[name].ratio,
                samples=self._windows[name].samples,
                consecutive_failures=self._windows[name].consecutive_failures,
                consecutive_successes=self._windows[name].consecutive_successes,
            )
            for name, probe, interval in self._probes
        ]
        return LayerSnapshot(
            name=self.name,
            state=self._health.state,
            reason=self._health.reason,
            paused=self._paused,
            signals=self._signals,
            probes=stats,
        )

    async def _probe_loop(self, name: str, probe: Probe, interval: float) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            if self.probe_gate is None or self.probe_gate():
                self._record(name, await self._run_probe(name, probe))
                self._publish()
            # Keep a fixed cadence: a slow probe eats into the pause, not the schedule.
            await asyncio.sleep(max(0.0, started + interval - loop.time()))

    async def _run_probe(self, name: str, probe: Probe) -> ProbeResult:
        at = time.time()
        try:
            async with asyncio.timeout(probe.timeout + PROBE_GUARD_MARGIN_S):
                return await probe.run()
        except TimeoutError:
            self._log.warning("probe_overran_timeout", probe=name, timeout=probe.timeout)
            return ProbeResult(ok=False, error="timeout", at=at)
        except Exception as exc:  # a broken probe must not take the monitor down
            self._log.exception("probe_crashed", probe=name)
            return ProbeResult(ok=False, error=f"probe crashed: {type(exc).__name__}", at=at)

    def _record(self, name: str, result: ProbeResult) -> None:
        window = self._windows[name]
        previous = window.last
        window.add(result.ok)
        self._last[name] = result
        if result.ok and result.latency_ms is not None:
            self._last_ok_latency[name] = result.latency_ms
        if previous is not result.ok:
            self._log.info("probe_result_changed", probe=name, ok=result.ok, error=result.error)

    async def _signals_loop(self, source: SignalsSource) -> None:
        while True:
            try:
                async with asyncio.timeout(self._signals_timeout):
                    signals: ModemSignals | None = await source()
            except TimeoutError:
                self._log.warning("modem_signals_timeout", timeout=self._signals_timeout)
                signals = None
            except Exception as exc:  # the modem may be gone; health must keep going on probes
                self._log.warning("modem_signals_failed", error=repr(exc))
                signals = None
            self.update_signals(signals)
            await asyncio.sleep(self._signals_interval)

    def _publish(self) -> None:
        if self._paused:
            return
        new = evaluate(self._signals, self._windows, self.thresholds, self._health)
        if new == self._health:
            return
        old, self._health = self._health, new
        self._log.info(
            "layer_health_changed",
            old_state=old.state,
            new_state=new.state,
            old_reason=old.reason,
            reason=new.reason,
        )
        try:
            self._on_change(self.name, new)
        except Exception:  # a subscriber's bug must not stop monitoring
            self._log.exception("layer_health_callback_failed")
