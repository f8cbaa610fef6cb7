"""Profile download timings: a 100 KB profile over the emulated modem from the test SM-DP+.

Run: `python bench/bench_download.py [N] [SIZE]`; writes bench/results/download.json.
"zero" sets the modem's per-command delay to 0 (the baseline: agent, pty, emulator, SM-DP+);
"realistic" adds 20 ms per AT command, what USB LTE modems take for AT+CGLA. Each download's
time is split into waiting on the card (AT+CGLA round trips), waiting on the SM-DP+ (ES9+ over
loopback HTTPS) and the rest: the agent's own share (codec, segmentation, flow).
"""

from __future__ import annotations

import asyncio
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.euicc.activation import parse_activation_code  # noqa: E402
from agent.euicc.download import Downloader  # noqa: E402
from agent.euicc.es9 import Es9Client, Resolve  # noqa: E402
from agent.euicc.lpa import Lpa  # noqa: E402
from agent.euicc.transport import AtApduTransport  # noqa: E402
from agent.modem.driver import open_modem  # noqa: E402
from bench.stats import summary_s as summary  # noqa: E402
from hw_fixtures import pki  # noqa: E402
from hw_fixtures.smdp import Offer, SmdpCore, SmdpServer  # noqa: E402
from hw_fixtures.testing import start_emulator  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "download.json"
HOME = "8944476500001224158"
DELAYS = {"zero": 0.0, "realistic": 0.02}


class TimedTransport:
    """An ApduTransport that adds up the time spent waiting for the card."""

    def __init__(self, inner: AtApduTransport) -> None:
        self.inner = inner
        self.apdus = 0
        self.wait_s = 0.0

    @property
    def channel(self) -> int:
        """The inner transport's channel."""
        return self.inner.channel

    @property
    def apdu_timeout(self) -> float:
        """The inner per-APDU deadline (the download raises it for the BPP)."""
        return self.inner.apdu_timeout

    @apdu_timeout.setter
    def apdu_timeout(self, value: float) -> None:
        self.inner.apdu_timeout = value

    async def open(self) -> None:
        """Open the inner channel."""
        await self.inner.open()

    async def close(self) -> None:
        """Close the inner channel."""
        await self.inner.close()

    async def transmit(self, apdu: bytes) -> bytes:
        """Timed transmit."""
        t = time.perf_counter()
        try:
            return await self.inner.transmit(apdu)
        finally:
            self.wait_s += time.perf_counter() - t
            self.apdus += 1


class TimedEs9(Es9Client):
    """An Es9Client that adds up the time spent waiting for the SM-DP+."""

    wait_s = 0.0

    async def call(self, function: str, body: dict[str, Any]) -> dict[str, Any] | None:
        """Timed call."""
        t = time.perf_counter()
        try:
            return await super().call(function, body)
        finally:
            self.wait_s += time.perf_counter() - t


async def scenario(
    test_pki: pki.TestPki, delay: float, n: int, size: int, state: Path
) -> dict[str, Any]:
    """n downloads of a size-byte profile with the given per-command modem delay."""
    assert test_pki.directory is not None
    totals: list[float] = []
    card: list[float] = []
    server: list[float] = []
    agent: list[float] = []
    apdus = 0
    bpp = 0
    core = SmdpCore(pki=test_pki, address=test_pki.smdp_host)
    async with SmdpServer(core) as smdp:
        address = f"{test_pki.smdp_host}:{smdp.port}"
        core.address = address
        with start_emulator(
            "--fast",
            "--log-level",
            "warning",
            "--pki",
            str(test_pki.directory),
            "--eid",
            test_pki.eid,
            "--profile",
            f"{HOME}:Home:enabled",
        ) as emu:
            emu.control("set_delays", response=delay)
            async with open_modem(emu.port) as modem:
                for i in range(n):
                    iccid = f"89882470000{i:08d}"
                    core.offer(Offer(matching_id=f"BENCH-{i}", iccid=iccid, size=size))
                    code = parse_activation_code(f"1${address}$BENCH-{i}")
                    es9 = TimedEs9(
                        address,
                        [test_pki.directory / "ci.pem"],
                        resolve=[Resolve(test_pki.smdp_host, smdp.port, "127.0.0.1")],
                    )
                    transport = TimedTransport(
                        AtApduTransport(modem.channel, modem.port, state_dir=state)
                    )
                    t = time.perf_counter()
                    async with Lpa(transport) as lpa:
                        result = await Downloader(lpa, es9, code).run()
                        total = time.perf_counter() - t
                        await lpa.delete_profile(iccid)  # keep the card's memory steady
                    totals.append(total)
                    card.append(transport.wait_s)
                    server.append(es9.wait_s)
                    agent.append(total - transport.wait_s - es9.wait_s)
                    apdus = transport.apdus
                    bpp = result.bpp_bytes
    return {
        "modem_delay_per_command_s": delay,
        "downloads": n,
        "profile_bytes": size,
        "bpp_bytes": bpp,
        "apdus_per_download": apdus,
        "total": summary(totals),
        "waiting_for_card": summary(card),
        "waiting_for_smdp": summary(server),
        "agent_share": summary(agent),
        "agent_share_percent_p50": round(
            100 * statistics.median(agent) / statistics.median(totals), 1
        ),
    }


async def main(n: int, size: int) -> dict[str, Any]:
    """Both scenarios, the baseline first."""
    result: dict[str, Any] = {"python": platform.python_version(), "machine": platform.machine()}
    with tempfile.TemporaryDirectory() as tmp:
        test_pki = pki.generate().write(Path(tmp) / "pki")
        for name, delay in DELAYS.items():
            state = Path(tmp) / name
            state.mkdir()
            state.chmod(0o700)
            result[name] = await scenario(test_pki, delay, n, size, state)
    return result


if __name__ == "__main__":
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    size = int(sys.argv[2]) if len(sys.argv) > 2 else 100_000
    data = asyncio.run(main(count, size))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(data, indent=2) + "\n")
    print(json.dumps(data, indent=2))
