"""Usage end to end: emulated Quectel over a real pty → read_counters → UsageTracker → SQLite file."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.config import PoolConfig, UsageConfig
from agent.daemon.usage import UsageTracker
from agent.euicc.lpa import Lpa
from agent.euicc.transport import AtApduTransport
from agent.modem.counters import Counters, read_counters
from agent.modem.driver import Modem, open_modem
from agent.usage.store import QuotaAlert, UsageStore
from hw_fixtures.testing import EmulatorHandle, start_emulator, wait_for

HOME = "8944476500001224158"
TRAVEL = "89012345678901234567"
T0 = 1_717_200_000.0  # 2024-06-01T00:00:00Z


@pytest.fixture
def emu() -> Iterator[EmulatorHandle]:
    with start_emulator(
        "--vendor",
        "quectel",
        "--fast",
        "--log-level",
        "warning",
        "--profile",
        f"{HOME}:Home:enabled",
        "--profile",
        f"{TRAVEL}:Travel",
    ) as handle:
        yield handle


@pytest.fixture
async def modem(emu: EmulatorHandle) -> AsyncIterator[Modem]:
    async with open_modem(emu.port) as m:
        yield m


class Alerts:
    """on_alert sink: what the tracker handed to its publisher."""

    def __init__(self) -> None:
        self.seen: list[QuotaAlert] = []

    def __call__(self, alert: QuotaAlert) -> None:
        self.seen.append(alert)


def tracker_on(path: Path, alerts: Callable[[QuotaAlert], None] | None = None) -> UsageTracker:
    return UsageTracker(UsageStore(path), alerts or Alerts())


async def poll(tracker: UsageTracker, modem: Modem, *, new_session: bool = False) -> list[Any]:
    """What the daemon does after each modem poll."""
    iccid = await modem.read_iccid()
    counters = await read_counters(modem.channel, modem.vendor.name)
    return await tracker.sample("m0", iccid, counters, new_session=new_session)


async def data_up(emu: EmulatorHandle, iccid: str | None = None) -> None:
    def ready() -> bool:
        st = emu.status()
        return st["data_path"] == "up" and (iccid is None or st["iccid"] == iccid)

    await asyncio.to_thread(wait_for, ready, 5.0)


async def test_real_data_path_bytes_reach_the_store(
    emu: EmulatorHandle, modem: Modem, tmp_path: Path
) -> None:
    tracker = tracker_on(tmp_path / "usage.db")
    emu.control("traffic", rx=123, tx=45)  # before the first reading: not attributable
    await poll(tracker, modem)
    assert tracker.snapshot(HOME)["total_bytes"] == 0

    info = emu.modem()
    request = f"GET /generate_204 HTTP/1.1\r\nHost: 127.0.0.1:{info['http_port']}\r\n\r\n".encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", info["http_port"])
    writer.write(request)
    response = await asyncio.wait_for(reader.read(), 5.0)
    writer.close()
    assert response.startswith(b"HTTP/1.1 204")
    payload = b"x" * 3_000
    reader, writer = await asyncio.open_connection("127.0.0.1", info["tcp_port"])
    writer.write(payload)
    echoed = await asyncio.wait_for(reader.readexactly(len(payload)), 5.0)
    writer.close()
    assert echoed == payload

    await poll(tracker, modem)
    snap = tracker.snapshot(HOME)
    assert snap["rx_bytes"] == len(response) + len(payload)
    assert snap["tx_bytes"] == len(request) + len(payload)
    assert snap["total_bytes"] == snap["rx_bytes"] + snap["tx_bytes"]
    assert snap["quota_bytes"] is None
    assert snap["percent"] is None
    assert snap["period_start"] == f"{snap['period']}-01T00:00:00Z"
    await tracker.close()


async def test_modem_resets_in_the_middle_lose_no_bytes(
    emu: EmulatorHandle, modem: Modem, tmp_path: Path
) -> None:
    tracker = tracker_on(tmp_path / "usage.db")
    await poll(tracker, modem)
    emu.control("traffic", rx=1_000, tx=200)
    await poll(tracker, modem)
    emu.control("traffic", rx=300, tx=50)
    await poll(tracker, modem)

    await modem.channel.command("AT+CFUN=1,1", timeout=5.0)
    await data_up(emu)
    assert emu.status()["counters"] == {"rx_bytes": 0, "tx_bytes": 0}
    emu.control("traffic", rx=70, tx=30)
    await poll(tracker, modem)  # the counter went down: the store sees the reset itself
    assert (tracker.snapshot(HOME)["rx_bytes"], tracker.snapshot(HOME)["tx_bytes"]) == (1_370, 280)

    # A spontaneous reset after which more traffic flows than the last reading showed: only
    # the caller (who saw the boot URCs) can tell, and says so with new_session.
    emu.control("fault", kind="reset")
    await data_up(emu)
    emu.control("traffic", rx=5_000, tx=900)
    await poll(tracker, modem, new_session=True)
    snap = tracker.snapshot(HOME)
    assert (snap["rx_bytes"], snap["tx_bytes"]) == (6_370, 1_180)
    assert tracker.store.segments(HOME) == 3
    await tracker.close()


async def test_profile_switch_starts_a_session_for_the_new_iccid(
    emu: EmulatorHandle, modem: Modem, tmp_path: Path
) -> None:
    tracker = tracker_on(tmp_path / "usage.db")
    await poll(tracker, modem)
    emu.control("traffic", rx=800, tx=100)
    await poll(tracker, modem)

    transport = AtApduTransport(modem.channel, modem.port, state_dir=tmp_path)
    async with Lpa(transport) as lpa:
        assert await lpa.enable_profile(TRAVEL)
    await data_up(emu, TRAVEL)
    emu.control("traffic", rx=2_500, tx=400)
    # The daemon does not say new_session: the tracker sees the ICCID change on m0.
    await poll(tracker, modem)
    assert tracker.snapshot(TRAVEL)["total_bytes"] == 2_900
    assert tracker.snapshot(HOME)["total_bytes"] == 900

    async with Lpa(transport) as lpa:
        assert await lpa.enable_profile(HOME)
    await data_up(emu, HOME)
    emu.control("traffic", rx=10, tx=5)
    await poll(tracker, modem)
    assert tracker.snapshot(HOME)["total_bytes"] == 915
    assert tracker.snapshot(TRAVEL)["total_bytes"] == 2_900
    await tracker.close()


async def test_quota_alerts_fire_once_each_and_survive_a_restart(
    emu: EmulatorHandle, modem: Modem, tmp_path: Path
) -> None:
    db = tmp_path / "state" / "usage.db"
    alerts = Alerts()
    tracker = tracker_on(db, alerts)
    tracker.apply_config(UsageConfig(quotas={HOME: "10 kB"}))
    await poll(tracker, modem)

    emu.control("traffic", rx=4_000, tx=1_000)
    fired = await poll(tracker, modem)
    assert [a.threshold for a in fired] == [50]
    assert alerts.seen == fired
    assert fired[0].subject == HOME
    assert fired[0].quota_bytes == 10_000
    emu.control("traffic", rx=100)
    assert await poll(tracker, modem) == []
    emu.control("traffic", rx=4_000)
    assert [a.threshold for a in await poll(tracker, modem)] == [75, 90]
    assert await poll(tracker, modem) == []
    assert [a.threshold for a in alerts.seen] == [50, 75, 90]
    snap = tracker.snapshot(HOME)
    assert (snap["total_bytes"], snap["quota_bytes"], snap["percent"]) == (9_100, 10_000, 91.0)
    await tracker.close()

    # Restart: a new store on the same file, a tracker that remembers nothing of the modem.
    again = Alerts()
    restarted = tracker_on(db, again)
    restarted.apply_config(UsageConfig(quotas={HOME: 10_000}))
    assert restarted.snapshot(HOME)["total_bytes"] == 9_100
    emu.control("traffic", rx=500, tx=100)
    assert await poll(restarted, modem) == []
    assert restarted.snapshot(HOME)["total_bytes"] == 9_700
    assert again.seen == []
    await restarted.close()


async def test_shared_pool_counts_other_devices(tmp_path: Path) -> None:
    clock = iter(T0 + i for i in range(1_000))
    alerts = Alerts()
    tracker = UsageTracker(UsageStore(tmp_path / "usage.db"), alerts, clock=lambda: next(clock))
    tracker.apply_config(
        UsageConfig(
            pools=[PoolConfig(name="family", members=[HOME], quota_bytes="1 kB", devices=["van"])]
        )
    )
    assert (
        await tracker.sample("m0", HOME, Counters(rx_bytes=0, tx_bytes=0), new_session=False) == []
    )
    assert await tracker.remote_usage("family", "van", 400) == []
    assert await tracker.remote_usage("family", "stranger", 10_000) == []
    fired = await tracker.sample("m0", HOME, Counters(rx_bytes=150, tx_bytes=0), new_session=False)
    assert [(a.subject, a.threshold) for a in fired] == [("pool:family", 50)]
    assert [a.threshold for a in await tracker.remote_usage("family", "van", 800)] == [75, 90]
    pool = tracker.pool_snapshot("family")
    assert (pool["local_bytes"], pool["remote_bytes"], pool["total_bytes"]) == (
        150,
        {"van": 800},
        950,
    )
    assert pool["period_start"] == "2024-06-01T00:00:00Z"
    assert [a.subject for a in alerts.seen] == ["pool:family"] * 3
    await tracker.close()


async def test_no_iccid_or_no_counter_records_nothing(tmp_path: Path) -> None:
    tracker = tracker_on(tmp_path / "usage.db")
    counters = Counters(rx_bytes=10, tx_bytes=10)
    assert await tracker.sample("m0", None, counters, new_session=True) == []
    assert await tracker.sample("m0", HOME, None, new_session=True) == []
    assert tracker.store.segments(HOME) == 0
    assert tracker.snapshot(HOME)["total_bytes"] == 0
    await tracker.close()


async def test_a_failing_alert_publisher_does_not_stop_accounting(tmp_path: Path) -> None:
    def broken(alert: QuotaAlert) -> None:
        raise RuntimeError("broker gone")

    tracker = tracker_on(tmp_path / "usage.db", broken)
    tracker.apply_config(UsageConfig(quotas={HOME: 100}))
    await tracker.sample("m0", HOME, Counters(rx_bytes=0, tx_bytes=0), new_session=False)
    fired = await tracker.sample("m0", HOME, Counters(rx_bytes=95, tx_bytes=0), new_session=False)
    assert [a.threshold for a in fired] == [50, 75, 90]
    assert tracker.snapshot(HOME)["total_bytes"] == 95
    await tracker.close()
