"""Detection of the silent failure at shipped defaults, with mwan3's defaults as the baseline.

Three figures, written to bench/results/detect.json:

* `model`: the detection state machine driven in virtual time over 1,000 outage phases, for the
  shipped defaults and for mwan3track's (interval 10 s, timeout 4 s, down 5, failure_interval =
  interval) on the same outage: p50/p95/max seconds from outage to down.
* `measured`: a real LayerMonitor with the shipped timing (5 s rounds, 1 s timeout, 0.5 s
  confirmation, down after 3) against a loopback HTTP server that stops answering (accepts,
  never replies) at a random phase: p50/p95 over the runs, wall clock.
* `bytes_per_day`: probe bytes per layer per day at the shipped defaults for each probe kind,
  on the wire with headers, before traffic-aware skips.

    python -m bench.bench_detect [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from pathlib import Path
from typing import Any

from agent.config import HealthConfig, ProbeConfig
from agent.health import detect
from agent.health.detect import DetectConfig
from agent.health.layer import LayerHealth, Thresholds
from agent.health.monitor import LayerMonitor
from agent.health.probes import HttpProbe, probe_from_spec
from agent.health.wire import round_bytes
from bench.stats import MIN_SAMPLES, percentile

RESULTS = Path(__file__).resolve().parent / "results" / "detect.json"
MWAN3 = DetectConfig(interval=10.0, failure_interval=10.0, down_after=5, up_after=5)
MWAN3_TIMEOUT_S = 4.0


def shipped() -> tuple[DetectConfig, float]:
    probe, health = ProbeConfig(kind="icmp", target="9.9.9.9"), HealthConfig()
    cfg = DetectConfig(
        interval=probe.interval,
        failure_interval=health.failure_interval,
        down_after=health.down_after,
        up_after=health.up_after,
    )
    return cfg, probe.timeout


def simulate(cfg: DetectConfig, timeout: float, outage_at: float) -> float:
    """Seconds from a silent outage at `outage_at` to down, in virtual time."""
    state = detect.initial(0.0)
    now = 0.0
    while not state.down:
        now = max(now, state.next_round)
        state, _ = detect.plan_round(state, cfg, now)
        if now >= outage_at:
            now += timeout
            state = detect.round_done(state, cfg, False, now, "probes_failing")
        else:
            now += 0.05
            state = detect.round_done(state, cfg, True, now, "")
    return now - outage_at


def stats(values: list[float]) -> dict[str, float | int | None]:
    """Seconds, by bench.stats' nearest-rank percentiles (the one method of every bench); p95
    only from 20 samples."""
    return {
        "n": len(values),
        "p50_s": round(percentile(values, 50), 3),
        "p95_s": round(percentile(values, 95), 3) if len(values) >= MIN_SAMPLES[95] else None,
        "max_s": round(max(values), 3),
    }


def model(n: int) -> dict[str, Any]:
    cfg, timeout = shipped()
    rng = random.Random(7)
    ours = [simulate(cfg, timeout, 20.0 + rng.random() * cfg.interval) for _ in range(n)]
    base = [
        simulate(MWAN3, MWAN3_TIMEOUT_S, 50.0 + rng.random() * MWAN3.interval) for _ in range(n)
    ]
    return {
        "shipped": stats(ours),
        "mwan3_baseline": stats(base),
        "worst_case_s": detect.worst_case_detection(cfg, timeout),
    }


class _Silent:
    """HTTP 204 until `silent`; then connections are accepted and never answered."""

    def __init__(self) -> None:
        self.silent = False
        self.port = 0
        self._server: asyncio.Server | None = None
        self._held: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        if self.silent:
            self._held.append(writer)
            return
        writer.write(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    async def stop(self) -> None:
        for w in self._held:
            w.close()
        if self._server is not None:
            self._server.close()


async def measure_once(rng: random.Random) -> float:
    cfg, timeout = shipped()
    server = _Silent()
    await server.start()
    down = asyncio.Event()

    def on_change(_name: str, health: LayerHealth) -> None:
        if health.state == "down":
            down.set()

    monitor = LayerMonitor(
        "bench",
        [("http0", HttpProbe(f"http://127.0.0.1:{server.port}/", timeout), cfg.interval)],
        None,
        Thresholds(down_after=cfg.down_after, up_after=cfg.up_after),
        on_change,
        failure_interval=cfg.failure_interval,
    )
    task = asyncio.create_task(monitor.run())
    try:
        await asyncio.sleep(0.2 + rng.random() * cfg.interval)  # outage at a random phase
        server.silent = True
        cut = time.monotonic()
        async with asyncio.timeout(60):
            await down.wait()
        return time.monotonic() - cut
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await server.stop()


async def measured(n: int) -> dict[str, Any]:
    rng = random.Random(11)
    return stats([await measure_once(rng) for _ in range(n)])


def bytes_per_day() -> dict[str, Any]:
    cfg, timeout = shipped()
    budget = HealthConfig().probe_budget
    out: dict[str, Any] = {}
    for kind, target in (
        ("icmp", "9.9.9.9"),
        ("icmp", "2620:fe::fe"),
        ("dns", "example.com@9.9.9.9"),
        ("tcp", "1.1.1.1:443"),
        ("http", "http://connectivitycheck.gstatic.com/generate_204"),
    ):
        per_round = round_bytes([probe_from_spec(kind, target, timeout)])
        interval = detect.budget_interval(cfg.interval, per_round, budget)
        out[f"{kind} {target}"] = {
            "round_bytes": per_round,
            "per_day_at_default_interval": round(per_round * detect.SECONDS_PER_DAY / cfg.interval),
            "budget_interval_s": interval,
            "per_day_within_budget": round(per_round * detect.SECONDS_PER_DAY / interval),
        }
    return {"budget_bytes_per_day": budget, "probes": out}


def run(quick: bool = False) -> dict[str, Any]:
    return {
        "model": model(1000),
        "measured": asyncio.run(measured(5 if quick else 20)),
        "bytes_per_day": bytes_per_day(),
    }


def headline(result: dict[str, Any]) -> dict[str, float]:
    """The few figures the bench runner prints."""
    icmp = result["bytes_per_day"]["probes"]["icmp 9.9.9.9"]
    return {
        "silent_p95_measured_s": result["measured"]["p95_s"],
        "silent_p95_model_s": result["model"]["shipped"]["p95_s"],
        "mwan3_p95_model_s": result["model"]["mwan3_baseline"]["p95_s"],
        "icmp_bytes_per_day": icmp["per_day_within_budget"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    result = run(quick=args.quick)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
