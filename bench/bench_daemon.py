"""Idle cost of the real daemon with two modems: CPU % of one core and RSS, beside a bare interpreter.

Run: `python bench/bench_daemon.py [--seconds S] [--quick]`; writes bench/results/daemon.json.

Two settings, each on a fresh stack (emulator with two modems, broker, `esim-agent run`): the
shipped defaults (agent/config.py: modem poll 30 s, probe rounds stretched by the byte budget,
traffic-aware) over a window eight times as long, and the demo settings (poll 2 s, probes every
1 s). Once the primary layer is active and both usable layers
report up, the daemon's /proc/<pid>/stat (utime+stime) and /proc/<pid>/status (VmRSS) are
sampled over the window. An idle `python -c "import asyncio; asyncio.run(asyncio.sleep(N))"` is
sampled over the same window as the baseline (the machine is shared: only a same-window
baseline means anything). The emulator's command and data-path counters give the AT and probe
rates.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from agent.demo.stack import DemoStack  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "daemon.json"
SECONDS = 30.0
QUICK_SECONDS = 10.0
#: At the shipped defaults a probe round comes every ~106 s (the 1 MB/day byte budget stretches
#: the 5 s interval) and a modem poll every 30 s: the window must hold a few of each.
DEFAULTS_WINDOW_FACTOR = 8.0
# The first seconds after "settled" still carry start-up work (profile lists, discovery configs).
WARMUP_S = 3.0
SAMPLE_EVERY_S = 0.5
SETTLE_TIMEOUT_S = 90.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Sample:
    """One reading of a process: monotonic time, CPU seconds (user+system), RSS in KiB."""

    at: float
    cpu_s: float
    rss_kib: int


def parse_stat_cpu(text: str) -> float:
    """utime+stime in seconds from a /proc/<pid>/stat line (comm may hold spaces or parens)."""
    fields = text[text.rindex(")") + 2 :].split()
    # Fields after comm start at field 3 (state); utime is field 14, stime 15.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def parse_status_rss(text: str) -> int:
    """VmRSS in KiB from /proc/<pid>/status; 0 when absent (a zombie has none)."""
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def read_sample(pid: int) -> Sample:
    """Read one sample; raises ProcessLookupError when the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        raise ProcessLookupError(pid) from None
    return Sample(time.monotonic(), parse_stat_cpu(stat), parse_status_rss(status))


def describe(samples: list[Sample]) -> dict[str, Any]:
    """CPU % of one core over the window and RSS MiB at start, end and peak."""
    first, last = samples[0], samples[-1]
    wall = last.at - first.at
    rss = [s.rss_kib for s in samples]
    return {
        "window_s": round(wall, 2),
        "samples": len(samples),
        "cpu_s": round(last.cpu_s - first.cpu_s, 3),
        "cpu_percent_one_core": round((last.cpu_s - first.cpu_s) / wall * 100.0, 3)
        if wall > 0
        else None,
        "rss_mib_start": round(first.rss_kib / 1024, 2),
        "rss_mib_end": round(last.rss_kib / 1024, 2),
        "rss_mib_max": round(max(rss) / 1024, 2),
    }


async def sample_both(
    daemon_pid: int, baseline_pid: int, seconds: float
) -> tuple[list[Sample], list[Sample]]:
    """Sample both processes side by side for `seconds` (the sampling period is the pacing)."""
    daemon: list[Sample] = []
    baseline: list[Sample] = []
    end = time.monotonic() + seconds
    while True:
        daemon.append(read_sample(daemon_pid))
        baseline.append(read_sample(baseline_pid))
        left = end - time.monotonic()
        if left <= 0:
            return daemon, baseline
        await asyncio.sleep(min(SAMPLE_EVERY_S, left))


async def counters(stack: DemoStack) -> dict[str, dict[str, Any]]:
    """The emulator's per-modem AT command-line count and data-path hits."""
    out: dict[str, dict[str, Any]] = {}
    for modem in ("m0", "m1"):
        st = await stack.control("status", modem=modem)
        out[modem] = {"commands": int(st.get("commands", 0)), "served": dict(st.get("served", {}))}
    return out


def rates(
    before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]], minutes: float
) -> dict[str, Any]:
    """Per-minute AT command lines and probe hits per modem from two counter readings."""
    out: dict[str, Any] = {}
    for modem, b in before.items():
        a = after[modem]
        served = {
            k: round((a["served"].get(k, 0) - v) / minutes, 1) for k, v in b["served"].items()
        }
        out[modem] = {
            "at_commands_per_min": round((a["commands"] - b["commands"]) / minutes, 1),
            "probe_hits_per_min": served,
        }
    return out


async def wait_settled(stack: DemoStack) -> None:
    """Primary active and the primary and failover layers up."""
    await stack.wait_json("state", lambda s: s.get("active_layer") == "primary", SETTLE_TIMEOUT_S)
    for layer in ("primary", "failover"):
        await stack.wait_json(
            f"health/{layer}", lambda h: h.get("status") == "up", SETTLE_TIMEOUT_S
        )


def shipped_defaults(data: dict[str, Any]) -> None:
    """Drop the demo's fast settings so the shipped defaults apply (agent/config.py)."""
    for modem in data.get("modems", []):
        modem.pop("poll_interval", None)
    for layer in data.get("layers", []):
        for probe in layer.get("probes", []):
            probe.pop("interval", None)
            probe.pop("timeout", None)
    data.pop("health", None)


SETTINGS: dict[str, Any] = {"shipped_defaults": shipped_defaults, "demo": None}


async def measure(
    seconds: float, workdir: Path, tune: Any = None, label: str = "demo"
) -> dict[str, Any]:
    """Start the stack, settle, then sample the daemon and a bare interpreter together."""
    stack = DemoStack(workdir, tune=tune, emulator_args=("--log-level", "warning"))
    baseline: asyncio.subprocess.Process | None = None
    try:
        await stack.start()
        assert stack.daemon is not None
        await wait_settled(stack)
        baseline = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            f"import asyncio; asyncio.run(asyncio.sleep({seconds + WARMUP_S + 30.0}))",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
        )
        # Warm-up is part of the method: both processes finish starting before the window opens.
        await asyncio.sleep(WARMUP_S)
        before = await counters(stack)
        messages_before = stack.mark()
        daemon_s, baseline_s = await sample_both(stack.daemon.pid, baseline.pid, seconds)
        after = await counters(stack)
        minutes = (daemon_s[-1].at - daemon_s[0].at) / 60.0
        mqtt_messages = stack.mark() - messages_before
        daemon = describe(daemon_s)
        base = describe(baseline_s)
        return {
            "settings": label,
            "seconds": seconds,
            "warmup_s": WARMUP_S,
            "daemon": daemon,
            "baseline_bare_asyncio_python": base,
            "daemon_above_baseline": {
                "cpu_percent_one_core": round(
                    daemon["cpu_percent_one_core"] - base["cpu_percent_one_core"], 3
                ),
                "rss_mib_max": round(daemon["rss_mib_max"] - base["rss_mib_max"], 2),
            },
            "emulator_rates": rates(before, after, minutes) if minutes > 0 else None,
            "mqtt_messages_per_min": round(mqtt_messages / minutes, 1) if minutes > 0 else None,
            "config": {
                "probe_interval_s": min(
                    p.interval for layer in stack.config.layers for p in layer.probes
                )
                if stack.config
                else None,
                "probe_timeout_s": max(
                    p.timeout for layer in stack.config.layers for p in layer.probes
                )
                if stack.config
                else None,
                "health_down_up_after": [
                    stack.config.health.down_after,
                    stack.config.health.up_after,
                ]
                if stack.config
                else None,
                "modem_poll_interval_s": [m.poll_interval for m in stack.config.modems]
                if stack.config
                else None,
            },
            "broker": stack.broker_name,
        }
    finally:
        if baseline is not None:
            with contextlib.suppress(ProcessLookupError):
                baseline.kill()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(baseline.wait(), 10.0)
        await stack.close()


async def _main(seconds: float) -> dict[str, Any]:
    result: dict[str, Any] = {
        "benchmark": "daemon_idle",
        "what": "esim-agent run with two emulated modems, idle on the primary layer",
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
    }
    for label, tune in SETTINGS.items():
        window = seconds * (DEFAULTS_WINDOW_FACTOR if label == "shipped_defaults" else 1.0)
        with tempfile.TemporaryDirectory(prefix="bench-daemon-") as tmp:
            # The window plus start-up, settle and shutdown allowances bound each run.
            async with asyncio.timeout(window + WARMUP_S + SETTLE_TIMEOUT_S + 60.0):
                result[label] = await measure(window, Path(tmp), tune, label)
    return result


def headline(result: dict[str, Any]) -> dict[str, float | None]:
    """The few figures the bench runner prints."""
    d, dd = result["shipped_defaults"], result["demo"]
    return {
        "defaults_cpu_pct_above_bare": d["daemon_above_baseline"]["cpu_percent_one_core"],
        "defaults_rss_mib_max": d["daemon"]["rss_mib_max"],
        "demo_cpu_pct_above_bare": dd["daemon_above_baseline"]["cpu_percent_one_core"],
        "demo_rss_mib_max": dd["daemon"]["rss_mib_max"],
    }


def run(quick: bool = False, seconds: float | None = None) -> dict[str, Any]:
    """Measure, write bench/results/daemon.json, return the result."""
    window = seconds if seconds is not None else (QUICK_SECONDS if quick else SECONDS)
    result = asyncio.run(_main(window))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=None, help=f"window ({SECONDS:g} s)")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_SECONDS:g} s window")
    args = parser.parse_args(argv)
    print(json.dumps(run(args.quick, args.seconds), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
