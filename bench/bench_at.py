"""AT round trip against the emulator: our asyncio AtChannel versus a plain blocking pyserial loop.

Run: `python bench/bench_at.py [--iterations N]`; writes bench/results/at.json.
Both clients talk to the same emulated modem over the same pty with every modem delay at 0, so
the difference is the client's own overhead (event loop, line reader, queue, URC routing).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import serial

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.at.channel import AtChannel  # noqa: E402
from bench.stats import summary_s  # noqa: E402
from hw_fixtures.testing import start_emulator  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "at.json"
COMMANDS = ("AT", "AT+CSQ")
DEFAULT_ITERATIONS = 2000
WARMUP = 20
TIMEOUT_S = 5.0
FINAL_OK = b"\r\nOK\r\n"


def summary(samples_s: list[float], wall_s: float) -> dict[str, float | int | None]:
    """Commands per second over the whole loop, latency percentiles in milliseconds."""
    return {"commands_per_s": round(len(samples_s) / wall_s, 1), **summary_s(samples_s)}


async def bench_channel(port: str, command: str, iterations: int) -> dict[str, float | int | None]:
    """Round trips through AtChannel.command, one in flight at a time."""
    async with await AtChannel.open(port) as ch:
        for _ in range(WARMUP):
            await ch.command(command, timeout=TIMEOUT_S)
        samples: list[float] = []
        wall = time.perf_counter()
        for _ in range(iterations):
            t0 = time.perf_counter()
            await ch.command(command, timeout=TIMEOUT_S)
            samples.append(time.perf_counter() - t0)
        return summary(samples, time.perf_counter() - wall)


def _blocking_round_trip(handle: serial.Serial, raw: bytes) -> None:
    handle.write(raw)
    reply = handle.read_until(FINAL_OK)
    if not reply.endswith(FINAL_OK):
        raise TimeoutError(f"no OK for {raw!r}: {reply!r}")


def bench_pyserial(port: str, command: str, iterations: int) -> dict[str, float | int | None]:
    """The baseline: blocking pyserial, write the command, read until OK."""
    raw = command.encode("ascii") + b"\r"
    with serial.Serial(port, baudrate=115200, timeout=TIMEOUT_S, exclusive=True) as handle:
        handle.reset_input_buffer()
        for _ in range(WARMUP):
            _blocking_round_trip(handle, raw)
        samples: list[float] = []
        wall = time.perf_counter()
        for _ in range(iterations):
            t0 = time.perf_counter()
            _blocking_round_trip(handle, raw)
            samples.append(time.perf_counter() - t0)
        return summary(samples, time.perf_counter() - wall)


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def run(iterations: int = DEFAULT_ITERATIONS) -> dict[str, Any]:
    """Measure both clients for each command; returns the figures (also what main() writes)."""
    results: dict[str, Any] = {
        "benchmark": "at_round_trip",
        "machine": machine(),
        "iterations": iterations,
        "warmup": WARMUP,
        "emulator": {"vendor": "generic", "delays_s": {"response": 0.0}, "echo": True},
        "asyncio_atchannel": {},
        "pyserial_blocking": {},
    }
    with start_emulator("--vendor", "generic", "--fast") as emu:
        emu.control("set_delays", response=0.0)
        for command in COMMANDS:
            results["asyncio_atchannel"][command] = asyncio.run(
                bench_channel(emu.port, command, iterations)
            )
            results["pyserial_blocking"][command] = bench_pyserial(emu.port, command, iterations)
    results["ratio_p50_atchannel_over_pyserial"] = {
        c: round(
            results["asyncio_atchannel"][c]["p50_ms"] / results["pyserial_blocking"][c]["p50_ms"],
            2,
        )
        for c in COMMANDS
    }
    return results


def main(argv: list[str] | None = None) -> int:
    """CLI: run and write bench/results/at.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--iterations", type=int, default=DEFAULT_ITERATIONS)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    from agent import log as agent_log

    # per-command debug events would dominate what is being measured
    agent_log.configure("warning", json=True)
    results = run(args.iterations)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
