"""Per-device limits inside a shared pool, and the record of announced pool thresholds, in the
usage ledger on a real SQLite file (across a restart too)."""

from __future__ import annotations

from pathlib import Path

from agent.config import PoolConfig, UsageConfig
from agent.daemon.usage import UsageTracker
from agent.modem.counters import Counters
from agent.usage.store import QuotaAlert, UsageStore

HOME = "8944476500001224158"
T0 = 1_717_200_000.0  # 2024-06-01T00:00:00Z
JULY = 1_719_792_000.0  # 2024-07-01T00:00:00Z


def family(limits: dict[str, int | str]) -> UsageConfig:
    pool = PoolConfig(
        name="family",
        members=[HOME],
        quota_bytes="1 MB",
        devices=["watch"],
        device_limits=limits,
    )
    return UsageConfig(pools=[pool])


def reading(n: int) -> Counters:
    return Counters(rx_bytes=n, tx_bytes=0)


async def test_a_device_alerts_once_per_threshold_on_its_own_limit(tmp_path: Path) -> None:
    now = [T0]
    alerts: list[QuotaAlert] = []
    tracker = UsageTracker(UsageStore(tmp_path / "usage.db"), alerts.append, clock=lambda: now[0])
    # The watch's limit is the watch's business: this device (phone) alerts on its own only.
    tracker.apply_config(family({"phone": 1_000, "watch": 10}), device_id="phone")
    await tracker.sample("m0", HOME, reading(0), new_session=False)
    for n in (400, 520, 760, 800, 950, 1_000, 1_500, 2_000):
        now[0] += 1
        await tracker.sample("m0", HOME, reading(n), new_session=False)
    mine = [(a.subject, a.threshold) for a in alerts if a.subject != "pool:family"]
    assert mine == [("pool:family/phone", t) for t in (50, 75, 90, 100)]
    assert all(a.quota_bytes == 1_000 for a in alerts if a.subject == "pool:family/phone")
    await tracker.close()

    # A restart remembers what fired this period; a new period starts again.
    alerts.clear()
    restarted = UsageTracker(UsageStore(tmp_path / "usage.db"), alerts.append, clock=lambda: now[0])
    restarted.apply_config(family({"phone": 1_000}), device_id="phone")
    now[0] += 1
    await restarted.sample("m0", HOME, reading(2_100), new_session=False)
    assert alerts == []
    now[0] = JULY + 5
    await restarted.sample("m0", HOME, reading(2_700), new_session=False)
    assert [(a.subject, a.threshold, a.period) for a in alerts] == [
        ("pool:family/phone", 50, "2024-07")
    ]
    assert restarted.device_limit("family") == 1_000
    await restarted.close()


async def test_without_a_device_id_or_limit_no_device_alert(tmp_path: Path) -> None:
    alerts: list[QuotaAlert] = []
    tracker = UsageTracker(UsageStore(tmp_path / "usage.db"), alerts.append, clock=lambda: T0)
    tracker.apply_config(family({"watch": 10}), device_id="phone")
    await tracker.sample("m0", HOME, reading(0), new_session=False)
    await tracker.sample("m0", HOME, reading(10_000), new_session=False)
    assert {a.subject for a in alerts} == set()  # 10 kB of a 1 MB pool: no pool alert either
    assert tracker.device_limit("family") is None
    await tracker.close()


async def test_announcements_are_kept_in_the_ledger(tmp_path: Path) -> None:
    tracker = UsageTracker(UsageStore(tmp_path / "usage.db"), lambda _: None, clock=lambda: T0)
    tracker.apply_config(family({}), device_id="phone")
    assert await tracker.record_announcement("family", "2024-06", 50, "phone")
    assert not await tracker.record_announcement("family", "2024-06", 50, "phone")
    assert await tracker.record_announcement("family", "2024-06", 75, "watch")
    assert await tracker.record_announcement("family", "2024-05", 90, "phone")
    assert tracker.announcements("family", "2024-06") == {50: ["phone"], 75: ["watch"]}
    await tracker.close()
    again = await UsageTracker.open(tmp_path / "usage.db", lambda _: None, clock=lambda: T0)
    assert again.announcements("family", "2024-06") == {50: ["phone"], 75: ["watch"]}
    await again.close()
