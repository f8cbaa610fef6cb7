"""eUICC timings against the emulator: `profile list` and a full safe switch.

Run: `python bench/bench_euicc.py [N]`; writes bench/results/euicc.json.
"zero" sets every modem delay to 0 (what is left is the agent's own overhead plus the pty);
"realistic" uses per-command latency and re-attach/reset times seen on real LTE modems.
"""

from __future__ import annotations

import asyncio
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.euicc.lpa import Lpa  # noqa: E402
from agent.euicc.switch import RefreshStrategy, SafeSwitch  # noqa: E402
from agent.euicc.transport import AtApduTransport, CardTransport  # noqa: E402
from agent.modem.driver import open_modem  # noqa: E402
from bench.stats import summary_s  # noqa: E402
from hw_fixtures.card_api import ProfileSpec  # noqa: E402
from hw_fixtures.euicc import EmulatedEuicc  # noqa: E402
from hw_fixtures.testing import EmulatorHandle, start_emulator  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "euicc.json"
HOME = "8944476500001224158"
TRAVEL = "89012345678901234567"
PROFILE_ARGS = ("--profile", f"{HOME}:Home:enabled", "--profile", f"{TRAVEL}:Travel")
DELAYS: dict[str, dict[str, float]] = {
    "zero": {"response": 0.0, "reattach": 0.0, "reset": 0.0},
    # ~20 ms per AT round trip over USB, 3 s to re-attach after a REFRESH, 5 s for CFUN=1,1
    "realistic": {"response": 0.02, "reattach": 3.0, "reset": 5.0},
}


def summary(samples_s: list[float]) -> dict[str, float | int | None]:
    """Figures in milliseconds (bench.stats: one percentile method for every bench)."""
    return summary_s(samples_s)


async def in_memory_list(n: int) -> dict[str, Any]:
    """The codec and LPA alone, no AT: the floor under every other figure."""
    card = EmulatedEuicc(
        "89049032123451234512345678901235",
        [ProfileSpec(iccid=HOME, enabled=True), ProfileSpec(iccid=TRAVEL)],
    )
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        async with Lpa(CardTransport(card)) as lpa:
            await lpa.list_profiles()
        samples.append(time.perf_counter() - t)
    return summary(samples)


async def over_at(emu: EmulatorHandle, n_list: int, n_switch: int, state: Path) -> dict[str, Any]:
    """profile list (channel open, ES10, close) and safe switches back and forth."""
    out: dict[str, Any] = {}
    async with open_modem(emu.port) as modem:

        def lpa() -> Lpa:
            return Lpa(AtApduTransport(modem.channel, modem.port, state_dir=state))

        samples = []
        for _ in range(n_list):
            t = time.perf_counter()
            async with lpa() as session:
                await session.list_profiles()
            samples.append(time.perf_counter() - t)
        out["profile_list"] = summary(samples)

        switch = SafeSwitch(
            modem, lpa, strategy=RefreshStrategy.REFRESH, rollback_timeout=60, poll_s=0.02
        )
        totals: list[float] = []
        phases: dict[str, list[float]] = {}
        for i in range(n_switch):
            report = await switch.run(TRAVEL if i % 2 == 0 else HOME)
            if report.outcome != "switched":
                raise RuntimeError(f"switch failed: {report.error}")
            totals.append(report.total_ms / 1000)
            for name in ("enable", "refresh", "reattach", "verify"):
                value = getattr(report.phases, name)
                if value is not None:
                    phases.setdefault(name, []).append(value / 1000)
        out["safe_switch"] = summary(totals)
        out["safe_switch_phases"] = {k: summary(v) for k, v in phases.items()}
    return out


async def main(n: int) -> dict[str, Any]:
    """All scenarios."""
    result: dict[str, Any] = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "in_memory_profile_list": await in_memory_list(n * 5),
    }
    for name, delays in DELAYS.items():
        with (
            start_emulator("--fast", "--log-level", "warning", *PROFILE_ARGS) as emu,
            tempfile.TemporaryDirectory() as state,
        ):
            emu.control("set_delays", **delays)
            switches = n if name == "zero" else 2
            result[name] = {"delays_s": delays, **await over_at(emu, n, switches, Path(state))}
    return result


if __name__ == "__main__":
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    data = asyncio.run(main(count))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(data, indent=2) + "\n")
    print(json.dumps(data, indent=2))
