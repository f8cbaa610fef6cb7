"""Per-layer monitor: probe rounds scheduled by evidence (agent/health/detect.py), modem signals,
passive evidence from the daemon, published health changes and probe bytes."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

import msgspec
import structlog
from msgspec.structs import replace

from agent.health import detect
from agent.health.detect import DetectConfig, DetectState, Evidence
from agent.health.layer import UNKNOWN, LayerHealth, ModemSignals, Thresholds, evaluate
from agent.health.probes import Probe, ProbeResult
from agent.health.window import ProbeWindow
from agent.health.wire import exchange_bytes, round_bytes

log = structlog.get_logger(__name__)

ProbeEntry = tuple[str, Probe, float]
SignalsSource = Callable[[], Awaitable[ModemSignals]]
OnChange = Callable[[str, LayerHealth], None]
#: The layer interface's (rx_bytes, tx_bytes), or None while it cannot be read.
CountersSource = Callable[[], Awaitable[tuple[int, int] | None]]

DEFAULT_WINDOW_SIZE = 10
DEFAULT_SIGNALS_INTERVAL_S = 30.0  # ModemManager's polling period
DEFAULT_SIGNALS_TIMEOUT_S = 15.0
# A probe enforces its own timeout; this margin only catches a probe that forgot to.
PROBE_GUARD_MARGIN_S = 2.0
DEFAULT_FAILURE_INTERVAL_S = 0.5
DEFAULT_COUNTERS_INTERVAL_S = 1.0


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
    #: The idle round interval in force (after the byte budget) and detection's strike count.
    round_interval_s: float = 0.0
    strikes: int = 0
    #: Bytes probes sent and received since the monitor started (estimated with headers).
    probe_tx_bytes: int = 0
    probe_rx_bytes: int = 0


class LayerMonitor:
    """Runs one layer's probe rounds inside `run()` and calls on_change(name, health) on changes.

    All probes of a layer run together in a round; a round with at least one answer is good.
    When rounds come is detect.py's decision: `interval` (the shortest of the entries'
    intervals, stretched to fit `probe_budget` bytes per day) while all is well,
    `failure_interval` while a failure or a recovery is being confirmed.
    """

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
        failure_interval: float = DEFAULT_FAILURE_INTERVAL_S,
        traffic_aware: bool = True,
        probe_budget: int = 0,
        counters: CountersSource | None = None,
        counters_interval: float = DEFAULT_COUNTERS_INTERVAL_S,
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
        base = min((entry[2] for entry in probes), default=DEFAULT_SIGNALS_INTERVAL_S)
        interval = detect.budget_interval(
            base, round_bytes([entry[1] for entry in probes]), probe_budget
        )
        self.detect_config = DetectConfig(
            interval=interval,
            failure_interval=min(failure_interval, interval),
            down_after=thresholds.down_after,
            up_after=thresholds.up_after,
            traffic_aware=traffic_aware,
        )
        # The detector decides "down"; evaluate() keeps the degraded/flaky/weak-signal rules.
        self._eval_thresholds = Thresholds(
            rssi_dbm_min=thresholds.rssi_dbm_min,
            rsrp_dbm_min=thresholds.rsrp_dbm_min,
            down_after=1 << 30,
            up_after=thresholds.up_after,
            degraded_ratio=thresholds.degraded_ratio,
        )
        self._det: DetectState = detect.initial(time.monotonic())
        self._wake = asyncio.Event()
        self._round_finished = asyncio.Event()
        self._counters = counters
        self._counters_interval = counters_interval
        self._bytes = [0, 0]
        self._pending_bytes = [0, 0]
        #: When set and false, rounds are skipped (check_once still probes): a layer whose
        #: profile is not running has nothing of its own to measure, and on a metered link
        #: every probe costs.
        self.probe_gate: Callable[[], bool] | None = None
        self._log = log.bind(layer=name)
        if interval > base:
            self._log.info("probe_interval_stretched", interval=base, stretched=interval)

    @property
    def health(self) -> LayerHealth:
        """The last published health (frozen while paused)."""
        return self._health

    @property
    def paused(self) -> bool:
        """True between pause() and resume()."""
        return self._paused

    @property
    def detection(self) -> DetectState:
        """The detector's state (strikes, conditions, verdict)."""
        return self._det

    async def run(self) -> None:
        """Probe and poll until cancelled: the round loop, signals, and interface counters."""
        async with asyncio.TaskGroup() as tg:
            if self._probes:
                tg.create_task(self._round_loop(), name=f"health-{self.name}-rounds")
            if self._signals_source is not None:
                tg.create_task(
                    self._signals_loop(self._signals_source), name=f"health-{self.name}-signals"
                )
            if self._counters is not None:
                tg.create_task(self._counters_loop(), name=f"health-{self.name}-counters")

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
        """Forget probe history, evidence and health (after the link under the layer changed)."""
        for window in self._windows.values():
            window.clear()
        self._last.clear()
        self._last_ok_latency.clear()
        self._health = UNKNOWN
        self._det = detect.initial(time.monotonic())
        self._wake.set()

    def evidence(self, ev: Evidence) -> None:
        """Feed passive evidence (netlink link/address events, +CGEV and registration URCs,
        interface counters); `ev.at` is time.monotonic(). See docs/health.md for the kinds."""
        before = self._det
        self._det = detect.observe(self._det, self.detect_config, ev)
        if self._det.next_round < before.next_round:
            self._wake.set()
        if self._det.strikes > before.strikes or self._det.down != before.down:
            self._log.info(
                "layer_evidence",
                kind=ev.kind,
                reason=ev.reason or ev.kind,
                strikes=self._det.strikes,
            )
        self._publish()

    async def check_once(self) -> LayerHealth:
        """Run every probe once now, record the results and return the fresh evaluation."""
        await self._round()
        self._publish()
        return self._verdict()

    def update_signals(self, signals: ModemSignals | None) -> None:
        """Feed modem signals pushed from elsewhere (URCs, polls) instead of, or besides, polling.

        A bad reading (SIM not ready, not registered, no data context) is one strike, confirmed
        like a failed probe; one ERROR reply to a status query is not an outage.
        """
        self._signals = signals
        if signals is not None:
            bad = modem_problem(signals)
            kind: detect.EvidenceKind = "modem_bad" if bad else "modem_ok"
            self.evidence(Evidence(kind=kind, at=time.monotonic(), reason=bad or ""))
        else:
            self._publish()

    def take_probe_bytes(self) -> tuple[int, int]:
        """(sent, received) probe bytes since the last call, for the usage ledger."""
        tx, rx = self._pending_bytes
        self._pending_bytes = [0, 0]
        return tx, rx

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
            round_interval_s=self.detect_config.interval,
            strikes=self._det.strikes,
            probe_tx_bytes=self._bytes[0],
            probe_rx_bytes=self._bytes[1],
        )

    async def _read_counters(self) -> None:
        if self._counters is None:
            return
        try:
            async with asyncio.timeout(self._signals_timeout):
                reading = await self._counters()
        except Exception as exc:  # the interface may be gone; rounds must go on
            self._log.debug("layer_counters_failed", error=repr(exc))
            return
        if reading is not None:
            rx, tx = reading
            self.evidence(Evidence(kind="counters", at=time.monotonic(), rx_bytes=rx, tx_bytes=tx))

    async def _counters_loop(self) -> None:
        while True:
            await self._read_counters()
            await asyncio.sleep(self._counters_interval)

    async def _round_loop(self) -> None:
        while True:
            wait = self._det.next_round - time.monotonic()
            if wait > 0:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._wake.wait()
                continue
            if self.probe_gate is not None and not self.probe_gate():
                now = time.monotonic()
                self._det = replace(self._det, next_round=now + self.detect_config.interval)
                continue
            await self._read_counters()
            now = time.monotonic()
            self._det, plan = detect.plan_round(self._det, self.detect_config, now)
            if plan == "probe":
                await self._round()
            elif plan == "fail_condition":
                self._log.info("round_failed_on_condition", conditions=sorted(self._det.conditions))
            self._publish()

    async def _round(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tasks = [
                (name, probe, tg.create_task(self._run_probe(name, probe)))
                for name, probe, _ in self._probes
            ]
        failed: list[str] = []
        for name, probe, task in tasks:
            result = task.result()
            self._record(name, result)
            tx, rx = exchange_bytes(probe, None if result.ok else (result.error or "failed"))
            self._bytes[0] += tx
            self._bytes[1] += rx
            self._pending_bytes[0] += tx
            self._pending_bytes[1] += rx
            if not result.ok:
                failed.append(name)
        if not tasks:
            return
        ok = len(failed) < len(tasks)
        reason = "" if ok else f"probes_failing: {', '.join(sorted(failed))}"
        before = self._det.next_round
        self._det = detect.round_done(self._det, self.detect_config, ok, time.monotonic(), reason)
        if self._det.next_round < before:
            self._wake.set()  # check_once ran outside the loop, which sleeps toward `before`
        finished, self._round_finished = self._round_finished, asyncio.Event()
        finished.set()

    async def wait_round(self) -> None:
        """Wait until the next probe round has been recorded (for tools and tests)."""
        await self._round_finished.wait()

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
            # A bad reading is confirmed by reading again soon, as a failed probe is.
            confirming = self._det.strikes > 0 and not self._det.down
            await asyncio.sleep(
                self.detect_config.failure_interval if confirming else self._signals_interval
            )

    def _verdict(self) -> LayerHealth:
        det = self._det
        if det.down:
            bad = modem_problem(self._signals) if self._signals is not None else None
            if det.reason != "recovering" and (bad or det.conditions):
                # Name the root cause the modem or the kernel gives, not its symptom.
                return LayerHealth(state="down", reason=bad or sorted(det.conditions)[0])
            return LayerHealth(state="down", reason=det.reason or "down")
        signals = self._signals
        weak = (
            ModemSignals(rssi_dbm=signals.rssi_dbm, rsrp_dbm=signals.rsrp_dbm)
            if signals is not None
            else None
        )
        if not self._probes and signals is not None:
            bad = modem_problem(signals)
            if bad is not None:
                # Not confirmed yet: usable, but say what the modem reported.
                return LayerHealth(state="degraded", reason=f"unconfirmed: {bad}")
            weak = signals  # no probes: the modem's word is all there is (rule 11)
        return evaluate(weak, self._windows, self._eval_thresholds, None)

    def _publish(self) -> None:
        if self._paused:
            return
        new = self._verdict()
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


def modem_problem(signals: ModemSignals) -> str | None:
    """The reason a modem reading says the data path cannot work, or None."""
    if signals.sim_ready is False:
        return "sim_not_ready"
    if signals.registered is False:
        return "not_registered"
    if signals.data_active is False:
        return "data_inactive"
    return None
