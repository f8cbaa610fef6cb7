"""Failover latency of the real daemon: emulator link lost -> traffic verified on the next layer.

Run: `python bench/bench_failover.py [--rounds N] [--emergency-rounds N] [--quick]`;
writes bench/results/failover.json.

Each round breaks the primary's data path in the emulator (t0, wall clock), waits for the
daemon's `transition` event to the failover layer and splits t0 -> verified_at into detection
(t0 -> detected_at) and the agent's own work (detected -> verified, from the daemon's monotonic
clock). The configured probe time (interval x down_after, + timeout) is reported apart: it is a
setting, not overhead. A raw `HttpProbe` loop against the same endpoint gives the floor for
noticing the loss at all. That failover switches nothing (the failover profile already runs on
its own modem), so the `enable` case times a transition that enables a profile: the emergency
layer pinned through the control socket, with the emulator's delays at zero and at realistic
values, and the agent's share = transition time minus what the emulated modem was told to take.
Every baseline is measured in the same run: the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
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
from agent.daemon.control import control_call  # noqa: E402
from agent.demo.stack import DEMO_ICCIDS, DemoStack  # noqa: E402
from agent.health.probes import HttpProbe  # noqa: E402
from bench.stats import summary_ms as _summary  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "failover.json"
ROUNDS = 20  # p95 needs at least 20 samples (bench.stats)
EMERGENCY_ROUNDS = 3
ENABLE_ROUNDS = 20
SEED = 20240601
QUICK_ROUNDS = 2
QUICK_EMERGENCY_ROUNDS = 1
QUICK_ENABLE_ROUNDS = 3
#: Emulator delays for the enable case (seconds): none at all, and what real LTE modems take
#: (~20 ms per AT round trip over USB, ~3 s to re-attach after a REFRESH; as bench_euicc).
ENABLE_DELAYS: dict[str, dict[str, float]] = {
    "zero": {"response": 0.0, "reattach": 0.0},
    "realistic": {"response": 0.02, "reattach": 3.0},
}
GOAL_AGENT_P95_MS = 200.0
STEP_TIMEOUT_S = 60.0
START_TIMEOUT_S = 90.0
RAW_PROBE_TIMEOUT_S = 1.0
# Whole-benchmark ceiling so a wedged daemon cannot hold the runner forever.
RUN_TIMEOUT_S = 840.0
_, ROAM, _ = DEMO_ICCIDS


def tune(data: dict[str, Any]) -> None:
    """Short failback and hold-down so rounds follow each other quickly; m1 (the failover and
    emergency modem) polls at the shipped 30 s, so its AT traffic during a switch is the switch's."""
    timers = data.setdefault("timers", {})
    timers["failback_stable"] = 1.0
    timers["hold_down"] = 0.5
    timers["hold_down_max"] = 1.0
    for modem in data.get("modems", []):
        if modem.get("id") == "m1":
            modem["poll_interval"] = 30.0


def parse_wall(text: str | None) -> float | None:
    """ISO 8601 (`...Z` allowed) -> POSIX seconds; None stays None."""
    if text is None:
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def summary_ms(samples: list[float]) -> dict[str, float | int | None] | None:
    """bench.stats' summary to 0.1 ms; None when there are no samples."""
    return _summary(samples, digits=1) if samples else None


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
    """One round's figures (ms) from the loss time and the daemon's transition record.

    Detection spans two processes, so it is wall clock (t0 here, detected_at there); the agent's
    own time is the daemon's monotonic detected -> verified (`timings_ms`, 0.1 ms).
    """
    detected = parse_wall(transition.get("detected_at"))
    verified = parse_wall(transition.get("verified_at"))
    timings = transition.get("timings_ms") or {}
    if detected is None or verified is None or timings.get("total") is None:
        raise ValueError(f"transition lacks detected/verified times: {transition}")
    return {
        "id": transition.get("id"),
        "kind": transition.get("kind"),
        "total_ms": round((verified - t0) * 1000.0, 1),
        "detection_ms": round((detected - t0) * 1000.0, 1),
        "agent_ms": timings["total"],
        "timings_ms": timings,
        "reason": transition.get("reason"),
    }


def split_failback(t_up: float, transition: dict[str, Any]) -> dict[str, Any]:
    """A failback's figures: its detect -> decide is the configured dwell (failback_stable and
    up_after rounds), which is waiting by design, not the agent's work."""
    row = split(t_up, transition)
    t = row["timings_ms"]
    row["dwell_ms"] = t.get("detect_to_decide")
    row["agent_ms"] = round(
        (t.get("decide_to_switch") or 0.0) + (t.get("switch_to_verify") or 0.0), 1
    )
    return row


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
    row["failback"] = split_failback(t_up, back)
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


async def m1_commands(stack: DemoStack) -> int:
    """AT command lines the emulated m1 has executed so far."""
    return int((await stack.control("status", modem="m1")).get("commands", 0))


def cpu_ms(pid: int) -> float:
    """Time the process's threads have spent on a CPU, in ms (schedstat: nanoseconds, not the
    10 ms ticks of /proc/<pid>/stat)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            continue  # a worker thread that ended meanwhile
    return total / 1e6


async def enable_round(stack: DemoStack, delays: dict[str, float]) -> dict[str, Any]:
    """Pin the emergency layer (enables its profile on m1), then unpin and let it go dormant.

    `total_ms` is the transition's monotonic detected -> verified in the daemon. With the
    emulator's delays at zero it is the agent's share itself (plus the emulator's own handling
    and the pty). With realistic delays most of it is waiting on the modem, and the modem's
    commands overlap its re-attach timer, so subtracting delays would be guesswork: the agent's
    share is then the daemon's on-CPU time over the transition (`agent_cpu_ms`, schedstat), an
    upper bound as it includes the daemon's other work in that window (m0's polls and probes).
    `upper_agent_ms` = total minus the re-attach delay is the loosest bound (every AT round trip
    counted as the agent's).
    """
    assert stack.daemon is not None
    before = await m1_commands(stack)
    cpu0 = cpu_ms(stack.daemon.pid)
    reply = await control_call(
        stack.socket, "switch_layer", {"layer": "emergency"}, timeout=STEP_TIMEOUT_S
    )
    cpu1 = cpu_ms(stack.daemon.pid)
    after = await m1_commands(stack)
    assert isinstance(reply, dict)
    tr = reply.get("transition") or {}
    if tr.get("outcome") != "switched" or tr.get("to_layer") != "emergency":
        raise RuntimeError(f"enable round did not switch: {tr}")
    total = float(tr["timings_ms"]["total"])
    row = {
        "id": tr.get("id"),
        "total_ms": total,
        "timings_ms": tr["timings_ms"],
        "m1_at_commands": after - before,
        "agent_cpu_ms": round(cpu1 - cpu0, 2),
        "upper_agent_ms": round(total - delays["reattach"] * 1000.0, 1),
    }
    mark = stack.mark()
    await control_call(stack.socket, "switch_layer", {"layer": None}, timeout=STEP_TIMEOUT_S)
    restored = await stack.wait_json(
        "events", lambda e: e.get("type") == "emergency_disabled", STEP_TIMEOUT_S, mark
    )
    if restored.get("data", {}).get("outcome") != "switched":
        raise RuntimeError(f"emergency profile not put back to sleep: {restored}")
    await wait_settled(stack, "primary")
    return row


async def enable_case(stack: DemoStack, rounds: int) -> dict[str, Any]:
    """The enable rounds at each delay setting, on m1 of the running stack."""
    out: dict[str, Any] = {
        "what": "manual switch to the emergency layer: EnableProfile on m1, REFRESH, re-attach, "
        "probe verify (daemon's monotonic detected -> verified)",
        "goal_agent_p95_ms": GOAL_AGENT_P95_MS,
    }
    for name, delays in ENABLE_DELAYS.items():
        await stack.control("set_delays", modem="m1", **delays)
        rows = [await enable_round(stack, delays) for _ in range(rounds)]
        out[name] = {
            "delays_s": delays,
            "total": summary_ms([r["total_ms"] for r in rows]),
            "agent_cpu": summary_ms([r["agent_cpu_ms"] for r in rows]),
            "upper_agent": summary_ms([r["upper_agent_ms"] for r in rows]),
            "m1_at_commands": summary_ms([float(r["m1_at_commands"]) for r in rows]),
            "rounds_detail": rows,
        }
    await stack.control("set_delays", modem="m1", response=0.0, reattach=1.0)
    return out


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
    if any("dwell_ms" in r for r in rows):
        out["dwell"] = summary_ms([r["dwell_ms"] for r in rows if r.get("dwell_ms") is not None])
    return out


async def measure(
    rounds: int, emergency_rounds: int, enable_rounds: int, workdir: Path
) -> dict[str, Any]:
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
        enable = await enable_case(stack, enable_rounds)
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
            "enable": enable,
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


async def _main(
    rounds: int, emergency_rounds: int, enable_rounds: int, workdir: Path | None
) -> dict[str, Any]:
    if workdir is not None:
        # Kept for a post-mortem: the daemon log and config stay in workdir.
        async with asyncio.timeout(RUN_TIMEOUT_S):
            return await measure(rounds, emergency_rounds, enable_rounds, workdir)
    with tempfile.TemporaryDirectory(prefix="bench-failover-") as tmp:
        async with asyncio.timeout(RUN_TIMEOUT_S):
            return await measure(rounds, emergency_rounds, enable_rounds, Path(tmp))


def headline(result: dict[str, Any]) -> dict[str, float | None]:
    """The few figures the bench runner prints."""
    fo, em = result["failover"], result["emergency"]
    return {
        "failover_total_p50_ms": fo["total"]["p50_ms"],
        "failover_agent_p95_ms": fo["agent"]["p95_ms"],
        "enable_total_p95_ms_zero": result["enable"]["zero"]["total"]["p95_ms"],
        "enable_agent_cpu_p95_ms_realistic": result["enable"]["realistic"]["agent_cpu"]["p95_ms"],
        "raw_probe_p50_ms": result["baseline_raw_http_probe_detection"]["p50_ms"],
        "emergency_total_p50_ms": em["total"]["p50_ms"] if em.get("total") else None,
    }


def run(
    quick: bool = False,
    rounds: int | None = None,
    emergency_rounds: int | None = None,
    workdir: Path | None = None,
    enable_rounds: int | None = None,
) -> dict[str, Any]:
    """Measure, write bench/results/failover.json, return the result."""
    n = rounds if rounds is not None else (QUICK_ROUNDS if quick else ROUNDS)
    ne = (
        emergency_rounds
        if emergency_rounds is not None
        else (QUICK_EMERGENCY_ROUNDS if quick else EMERGENCY_ROUNDS)
    )
    nn = (
        enable_rounds
        if enable_rounds is not None
        else (QUICK_ENABLE_ROUNDS if quick else ENABLE_ROUNDS)
    )
    result = asyncio.run(_main(n, ne, nn, workdir))
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
    parser.add_argument(
        "--enable-rounds", type=int, default=None, help=f"enable rounds per delay ({ENABLE_ROUNDS})"
    )
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument("--workdir", type=Path, default=None, help="keep daemon log/config here")
    args = parser.parse_args(argv)
    result = run(args.quick, args.rounds, args.emergency_rounds, args.workdir, args.enable_rounds)
    print(json.dumps({k: v for k, v in result.items() if not k.endswith("_detail")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
