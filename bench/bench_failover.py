"""Failover latency of the real daemon: emulator link lost -> traffic verified on the next layer.

Run: `python bench/bench_failover.py [--rounds N] [--emergency-rounds N] [--quick]`;
writes bench/results/failover.json.

Each round breaks the primary's data path in the emulator (t0, wall clock), waits for the
daemon's `transition` event to the failover layer and splits t0 -> verified_at into detection
(t0 -> detected_at) and the agent's own work (detected_at -> verified_at). The configured probe
time (interval x down_after, + timeout) is reported apart: it is a setting, not overhead. A raw
`HttpProbe` loop against the same endpoint gives the floor for noticing the loss at all.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from agent.config import Config  # noqa: E402
from agent.demo.stack import DEMO_ICCIDS, DemoStack  # noqa: E402
from agent.health.probes import HttpProbe  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "failover.json"
ROUNDS = 5
EMERGENCY_ROUNDS = 3
SEED = 20240601
QUICK_ROUNDS = 2
QUICK_EMERGENCY_ROUNDS = 1
STEP_TIMEOUT_S = 60.0
START_TIMEOUT_S = 90.0
RAW_PROBE_TIMEOUT_S = 1.0
# Whole-benchmark ceiling so a wedged daemon cannot hold the runner forever.
RUN_TIMEOUT_S = 600.0
_, ROAM, _ = DEMO_ICCIDS


def tune(data: dict[str, Any]) -> None:
    """Short failback and hold-down so rounds follow each other quickly."""
    timers = data.setdefault("timers", {})
    timers["failback_stable"] = 1.0
    timers["hold_down"] = 0.5
    timers["hold_down_max"] = 1.0


def parse_wall(text: str | None) -> float | None:
    """ISO 8601 (`...Z` allowed) -> POSIX seconds; None stays None."""
    if text is None:
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def percentile(samples: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(samples)
    rank = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[rank]


def summary_ms(samples: list[float]) -> dict[str, float | int] | None:
    """n, p50, p95, mean, max of millisecond samples; None when there are none."""
    if not samples:
        return None
    return {
        "n": len(samples),
        "p50_ms": round(percentile(samples, 50), 1),
        "p95_ms": round(percentile(samples, 95), 1),
        "mean_ms": round(statistics.fmean(samples), 1),
        "max_ms": round(max(samples), 1),
    }


def probe_budget(cfg: Config, layer: str) -> dict[str, Any]:
    """What the configuration alone makes detection cost for a layer, in milliseconds."""
    spec = next(x for x in cfg.layers if x.name == layer)
    interval = min(p.interval for p in spec.probes)
    timeout = max(p.timeout for p in spec.probes)
    down_after = cfg.health.down_after
    return {
        "layer": layer,
        "probe_interval_s": interval,
        "probe_timeout_s": timeout,
        "health_down_after": down_after,
        "policy_down_after": cfg.policy.down_after,
        # The first failing round starts 0..interval after the loss, and the layer is down when
        # every probe has failed down_after rounds in a row. TCP/HTTP fail at once (refused), but
        # a UDP DNS probe can only fail by its timeout, which shifts the window by the timeout.
        "window_refused_ms": [
            round((down_after - 1) * interval * 1000.0, 1),
            round(down_after * interval * 1000.0, 1),
        ],
        "window_with_timeout_ms": [
            round(((down_after - 1) * interval + timeout) * 1000.0, 1),
            round((down_after * interval + timeout) * 1000.0, 1),
        ],
        "probe_kinds": sorted({p.kind for p in spec.probes}),
        "expected_window": "window_with_timeout_ms"
        if any(p.kind == "dns" for p in spec.probes)
        else "window_refused_ms",
    }


def split(t0: float, transition: dict[str, Any]) -> dict[str, Any]:
    """One round's figures (ms) from the loss time and the daemon's transition record."""
    detected = parse_wall(transition.get("detected_at"))
    verified = parse_wall(transition.get("verified_at"))
    if detected is None or verified is None:
        raise ValueError(f"transition lacks detected_at/verified_at: {transition}")
    return {
        "id": transition.get("id"),
        "kind": transition.get("kind"),
        "total_ms": round((verified - t0) * 1000.0, 1),
        "detection_ms": round((detected - t0) * 1000.0, 1),
        "agent_ms": round((verified - detected) * 1000.0, 1),
        "timings_ms": transition.get("timings_ms"),
        "reason": transition.get("reason"),
    }


async def raw_detection(url: str, t0: float, timeout: float) -> float:
    """Run the agent's HTTP probe back to back until it fails; ms from t0 to that failure."""
    probe = HttpProbe(url, RAW_PROBE_TIMEOUT_S)
    async with asyncio.timeout(timeout):
        while True:
            result = await probe.run()
            if not result.ok:
                return round((time.time() - t0) * 1000.0, 1)


def latest_index(stack: DemoStack, key: str) -> int:
    """Index of the newest message on `<base>/<device>/<key>` (0 when none yet)."""
    assert stack.watcher is not None
    topic = f"{stack.topic}/{key}"
    messages = stack.watcher.messages
    for i in range(len(messages) - 1, -1, -1):
        if messages[i][0] == topic:
            return i
    return 0


async def wait_settled(stack: DemoStack, layer: str) -> None:
    """The daemon runs `layer` and both lower-cost layers report up (current or next value)."""
    await stack.wait_json(
        "state",
        lambda s: s.get("active_layer") == layer,
        STEP_TIMEOUT_S,
        latest_index(stack, "state"),
    )
    for name in ("primary", "failover"):
        key = f"health/{name}"
        await stack.wait_json(
            key, lambda h: h.get("status") == "up", STEP_TIMEOUT_S, latest_index(stack, key)
        )


async def dephase(rng: random.Random, period: float) -> float:
    """Sleep a random part of one probe period so t0 does not lock onto the probe schedule."""
    # Rounds start right after an MQTT message the probe schedule caused; without this every
    # round would break the link at the same phase and p50..max would all show one case.
    offset = rng.uniform(0.0, period)
    await asyncio.sleep(offset)
    return round(offset * 1000.0, 1)


async def failover_round(
    stack: DemoStack, url: str, rng: random.Random, period: float
) -> dict[str, Any]:
    """Break m0's data path, time the switch to failover, heal it and wait for failback."""
    offset_ms = await dephase(rng, period)
    mark = stack.mark()
    t0 = time.time()
    raw = asyncio.create_task(raw_detection(url, t0, STEP_TIMEOUT_S))
    await stack.control("link", modem="m0", state="down")
    tr = await stack.wait_transition(
        lambda d: d.get("to_layer") == "failover" and d.get("outcome") == "switched",
        STEP_TIMEOUT_S,
        mark,
    )
    row = split(t0, tr)
    row["phase_offset_ms"] = offset_ms
    row["raw_probe_detection_ms"] = await raw
    mark = stack.mark()
    t_up = time.time()
    await stack.control("link", modem="m0", state="up")
    back = await stack.wait_transition(
        lambda d: d.get("to_layer") == "primary" and d.get("outcome") == "switched",
        STEP_TIMEOUT_S,
        mark,
    )
    row["failback"] = split(t_up, back)
    await wait_settled(stack, "primary")
    return row


async def emergency_round(stack: DemoStack, rng: random.Random, period: float) -> dict[str, Any]:
    """From failover, lose the Roam profile too: time the eUICC switch to the emergency profile."""
    mark = stack.mark()
    await stack.control("link", modem="m0", state="down")
    await stack.wait_transition(
        lambda d: d.get("to_layer") == "failover" and d.get("outcome") == "switched",
        STEP_TIMEOUT_S,
        mark,
    )
    offset_ms = await dephase(rng, period)
    mark = stack.mark()
    t0 = time.time()
    await stack.control("profile", modem="m1", op="broken", iccid=ROAM)
    tr = await stack.wait_transition(
        lambda d: d.get("to_layer") == "emergency" and d.get("outcome") == "switched",
        STEP_TIMEOUT_S,
        mark,
    )
    row = split(t0, tr)
    row["phase_offset_ms"] = offset_ms
    mark = stack.mark()
    await stack.control("link", modem="m0", state="up")
    await stack.control("profile", modem="m1", op="broken", iccid=ROAM, broken=False)
    await stack.wait_transition(
        lambda d: d.get("to_layer") == "primary" and d.get("outcome") == "switched",
        STEP_TIMEOUT_S,
        mark,
    )
    disabled = await stack.wait_json(
        "events", lambda e: e.get("type") == "emergency_disabled", STEP_TIMEOUT_S, mark
    )
    # Putting the emergency profile back to sleep is the daemon's job after the measured part;
    # when it fails the next round would start from a broken m1, so the caller stops there.
    row["restore"] = disabled.get("data", {})
    if row["restore"].get("outcome") == "switched":
        await wait_settled(stack, "primary")
    return row


def aggregate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """p50/p95/max of every split over the rounds."""
    out: dict[str, Any] = {
        "total": summary_ms([r["total_ms"] for r in rows]),
        "detection": summary_ms([r["detection_ms"] for r in rows]),
        "agent": summary_ms([r["agent_ms"] for r in rows]),
    }
    for phase in ("detect_to_decide", "decide_to_switch", "switch_to_verify"):
        values = [r["timings_ms"][phase] for r in rows if r["timings_ms"].get(phase) is not None]
        out[phase] = summary_ms(values)
    return out


async def measure(rounds: int, emergency_rounds: int, workdir: Path) -> dict[str, Any]:
    """Start the demo stack once and run every round on it."""
    stack = DemoStack(workdir, tune=tune, emulator_args=("--log-level", "warning"))
    try:
        await stack.start()
        assert stack.emulator is not None
        assert stack.config is not None
        await wait_settled(stack, "primary")
        url = str(stack.emulator.modem("m0")["http_url"])
        m1 = await stack.control("status", modem="m1")
        rng = random.Random(SEED)
        budget = probe_budget(stack.config, "primary")
        period = float(budget["probe_interval_s"])
        rows = [await failover_round(stack, url, rng, period) for _ in range(rounds)]
        emergency: list[dict[str, Any]] = []
        for _ in range(emergency_rounds):
            emergency.append(await emergency_round(stack, rng, period))
            if emergency[-1]["restore"].get("outcome") != "switched":
                break
        raw = [r["raw_probe_detection_ms"] for r in rows]
        return {
            "benchmark": "failover_latency",
            "what": "emulator link down (t0) -> transition verified_at on the next layer",
            "rounds": rounds,
            "configured_probe_time": budget,
            "phase": f"t0 offset uniform in [0, {period:g}) s after the previous step (seed {SEED})",
            "failover": aggregate(rows),
            "baseline_raw_http_probe_detection": summary_ms(raw),
            "failback": aggregate([r["failback"] for r in rows]),
            "failback_stable_s": stack.config.timers.failback_stable,
            "emergency": {
                "what": "on failover, Roam profile broken (t0) -> emergency profile verified",
                "emulator_reattach_delay_s": m1.get("delays", {}).get("reattach"),
                "configured_probe_time": probe_budget(stack.config, "failover"),
                "restore_failures": [
                    r["restore"] for r in emergency if r["restore"].get("outcome") != "switched"
                ],
                **(aggregate(emergency) if emergency else {}),
            },
            "rounds_detail": rows,
            "emergency_rounds_detail": emergency,
            "broker": stack.broker_name,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
        }
    except TimeoutError:
        sys.stderr.write(f"bench_failover: a step timed out; daemon log: {stack.daemon_log}\n")
        sys.stderr.write(stack.daemon_log.read_text()[-4000:] + "\n")
        raise
    finally:
        await stack.close()


async def _main(rounds: int, emergency_rounds: int, workdir: Path | None) -> dict[str, Any]:
    if workdir is not None:
        # Kept for a post-mortem: the daemon log and config stay in workdir.
        async with asyncio.timeout(RUN_TIMEOUT_S):
            return await measure(rounds, emergency_rounds, workdir)
    with tempfile.TemporaryDirectory(prefix="bench-failover-") as tmp:
        async with asyncio.timeout(RUN_TIMEOUT_S):
            return await measure(rounds, emergency_rounds, Path(tmp))


def headline(result: dict[str, Any]) -> dict[str, float | None]:
    """The few figures the bench runner prints."""
    fo, em = result["failover"], result["emergency"]
    return {
        "failover_total_p50_ms": fo["total"]["p50_ms"],
        "failover_agent_p50_ms": fo["agent"]["p50_ms"],
        "raw_probe_p50_ms": result["baseline_raw_http_probe_detection"]["p50_ms"],
        "emergency_total_p50_ms": em["total"]["p50_ms"] if em.get("total") else None,
    }


def run(
    quick: bool = False,
    rounds: int | None = None,
    emergency_rounds: int | None = None,
    workdir: Path | None = None,
) -> dict[str, Any]:
    """Measure, write bench/results/failover.json, return the result."""
    n = rounds if rounds is not None else (QUICK_ROUNDS if quick else ROUNDS)
    ne = (
        emergency_rounds
        if emergency_rounds is not None
        else (QUICK_EMERGENCY_ROUNDS if quick else EMERGENCY_ROUNDS)
    )
    result = asyncio.run(_main(n, ne, workdir))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=None, help=f"failover rounds ({ROUNDS})")
    parser.add_argument(
        "--emergency-rounds", type=int, default=None, help=f"emergency rounds ({EMERGENCY_ROUNDS})"
    )
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument("--workdir", type=Path, default=None, help="keep daemon log/config here")
    args = parser.parse_args(argv)
    result = run(args.quick, args.rounds, args.emergency_rounds, args.workdir)
    print(json.dumps({k: v for k, v in result.items() if not k.endswith("_detail")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
