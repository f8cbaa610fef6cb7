"""Hotplug latency of a modem session fed by the emulator's fake udev feed.

Run: `python bench/bench_hotplug.py [--rounds N] [--quick]`; writes bench/results/hotplug.json.

Per round, on one emulated modem found by IMEI:
* unplug -> the session is offline (the device's removal fails what is in flight);
* replug on another pty -> the session is online again (event, locate, probe, eUICC read).
Baseline in the same run: the modem merely stops answering (hang, no unplug) -> offline, which is
what an unplug cost when it was noticed only by command timeouts. And locating a modem by IMEI
while another modem's AT port hangs, against locating it with no hung neighbour.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from agent.config import ModemConfig  # noqa: E402
from agent.daemon.session import ModemSession  # noqa: E402
from agent.modem.finder import Finder  # noqa: E402
from agent.transport.discovery import MatchSpec  # noqa: E402
from hw_fixtures.testing import EmulatorHandle, start_emulator  # noqa: E402
from hw_fixtures.udev_feed import EmulatorDeviceSource  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "hotplug.json"
ROUNDS = 5
QUICK_ROUNDS = 2
STEP_TIMEOUT_S = 120.0
SCENARIO = """
[[modem]]
id = "a"
vendor = "quectel"
imei = "867698040000005"

[[modem]]
id = "b"
vendor = "generic"
imei = "356938035643809"
"""


class Watch:
    """Session updates as an awaitable condition."""

    def __init__(self) -> None:
        self.changed = asyncio.Event()

    def __call__(self, _session: ModemSession) -> None:
        self.changed.set()

    async def until(self, check: Callable[[], bool]) -> None:
        async with asyncio.timeout(STEP_TIMEOUT_S):
            while not check():
                self.changed.clear()
                await self.changed.wait()


def _stats(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "median_ms": round(statistics.median(values), 1),
        "max_ms": round(max(values), 1),
        "min_ms": round(min(values), 1),
    }


async def _session_rounds(emu: EmulatorHandle, workdir: Path, rounds: int) -> dict[str, Any]:
    finder = Finder(EmulatorDeviceSource(emu.control_path))
    await finder.start()
    watch = Watch()
    cfg = ModemConfig(id="a", imei="867698040000005", poll_interval=1.0)
    session = ModemSession(cfg, state_dir=workdir, on_update=watch, finder=finder)
    task = asyncio.create_task(session.run())
    unplug_ms: list[float] = []
    replug_ms: list[float] = []
    hang_ms: list[float] = []
    try:
        await watch.until(lambda: session.online)
        for _ in range(rounds):
            t0 = time.monotonic()
            await asyncio.to_thread(emu.control, "unplug", modem="a")
            await watch.until(lambda: not session.online)
            unplug_ms.append((time.monotonic() - t0) * 1000)
            t0 = time.monotonic()
            await asyncio.to_thread(emu.control, "replug", modem="a")
            await watch.until(lambda: session.online)
            replug_ms.append((time.monotonic() - t0) * 1000)
        # baseline: the same modem goes silent instead of away
        for _ in range(max(1, rounds // 3)):
            t0 = time.monotonic()
            await asyncio.to_thread(emu.control, "fault", modem="a", kind="hang")
            await watch.until(lambda: not session.online)
            hang_ms.append((time.monotonic() - t0) * 1000)
            await asyncio.to_thread(emu.control, "clear", modem="a")
            await watch.until(lambda: session.online)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        if session.modem is not None:
            await session.modem.close()
        await finder.stop()
    return {
        "unplug_to_offline": _stats(unplug_ms),
        "replug_to_online": _stats(replug_ms),
        "baseline_silent_modem_to_offline": _stats(hang_ms),
    }


async def _locate_ms(emu: EmulatorHandle, hung: bool) -> float:
    if hung:
        await asyncio.to_thread(emu.control, "fault", modem="a", kind="hang")
    finder = Finder(EmulatorDeviceSource(emu.control_path))
    await finder.start()
    try:
        t0 = time.monotonic()
        found = await finder.locate(MatchSpec("b", imei="356938035643809"))
        elapsed = (time.monotonic() - t0) * 1000
        assert found.port == emu.modem("b")["port"]
        return elapsed
    finally:
        await finder.stop()
        if hung:
            await asyncio.to_thread(emu.control, "clear", modem="a")


async def main(rounds: int) -> dict[str, Any]:
    """All measurements, as the JSON written to RESULTS."""
    with tempfile.TemporaryDirectory(prefix="esa-bench-hotplug-") as tmp:
        scenario = Path(tmp) / "hotplug.toml"
        scenario.write_text(SCENARIO)
        emu = await asyncio.to_thread(
            start_emulator, "--scenario", str(scenario), "--fast", "--log-level", "warning"
        )
        try:
            sessions = await _session_rounds(emu, Path(tmp), rounds)
            plain = [await _locate_ms(emu, hung=False) for _ in range(rounds)]
            beside_hung = [await _locate_ms(emu, hung=True) for _ in range(max(1, rounds // 2))]
        finally:
            await asyncio.to_thread(emu.stop)
    return {
        "benchmark": "hotplug",
        "date": datetime.now().isoformat(timespec="seconds"),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "rounds": rounds,
        **sessions,
        "locate_by_imei": _stats(plain),
        "locate_by_imei_beside_a_hung_modem": _stats(beside_hung),
    }


def run(quick: bool = False) -> dict[str, Any]:
    """Entry point for `python -m bench`."""
    return asyncio.run(main(QUICK_ROUNDS if quick else ROUNDS))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=ROUNDS)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    result = asyncio.run(main(QUICK_ROUNDS if args.quick else args.rounds))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
