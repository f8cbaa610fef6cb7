"""Usage accounting against real SQLite files, including a process killed mid-write."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from agent.usage.store import UsageStore, UsageStoreError, period_of

ICCID = "89000000000000000011"
OTHER = "89000000000000000029"
T0 = 1_717_200_000.0  # 2024-06-01T00:00:00Z


def test_first_reading_is_a_baseline_then_deltas_add(tmp_path: Path) -> None:
    with UsageStore(tmp_path / "usage.db") as store:
        store.record_counters(ICCID, 5_000, 1_000, T0)
        store.record_counters(ICCID, 7_000, 1_500, T0 + 60)
        store.record_counters(ICCID, 9_000, 2_000, T0 + 120)
        u = store.totals(ICCID)
        assert (u.rx_bytes, u.tx_bytes, u.total_bytes) == (4_000, 1_000, 5_000)
        assert u.period == "2024-06"


def test_counter_reset_starts_a_new_segment_and_loses_nothing(tmp_path: Path) -> None:
    with UsageStore(tmp_path / "usage.db") as store:
        store.record_counters(ICCID, 0, 0, T0)
        store.record_counters(ICCID, 10_000, 2_000, T0 + 10)
        store.record_counters(ICCID, 300, 100, T0 + 20)  # modem power-cycled
        store.record_counters(ICCID, 1_300, 600, T0 + 30)
        u = store.totals(ICCID)
        assert u.total_bytes == 10_000 + 2_000 + 300 + 100 + 1_000 + 500
        assert store.segments(ICCID) == 2


def test_new_session_counts_whole_reading(tmp_path: Path) -> None:
    with UsageStore(tmp_path / "usage.db") as store:
        store.record_counters(ICCID, 100, 100, T0)
        # Context re-activated and already past the old value: only the caller knows.
        store.record_counters(ICCID, 500, 200, T0 + 10, new_session=True)
        assert store.totals(ICCID).total_bytes == 700


def test_profiles_are_counted_separately(tmp_path: Path) -> None:
    with UsageStore(tmp_path / "usage.db") as store:
        for iccid, step in ((ICCID, 100), (OTHER, 7)):
            store.record_counters(iccid, 0, 0, T0)
            store.record_counters(iccid, step, step, T0 + 1)
        assert store.totals(ICCID).total_bytes == 200
        assert store.totals(OTHER).total_bytes == 14


def test_alerts_fire_once_per_threshold_and_period(tmp_path: Path) -> None:
    with UsageStore(tmp_path / "usage.db") as store:
        store.set_quota(ICCID, 1_000)
        assert store.record_counters(ICCID, 0, 0, T0) == []
        first = store.record_counters(ICCID, 600, 0, T0 + 1)
        assert [a.threshold for a in first] == [50]
        assert store.record_counters(ICCID, 650, 0, T0 + 2) == []
        jump = store.record_counters(ICCID, 950, 0, T0 + 3)
        assert [a.threshold for a in jump] == [75, 90]
        assert jump[0].used_bytes == 950
        assert jump[0].quota_bytes == 1_000
        assert store.totals(ICCID).percent == 95.0
    # Reopened: already-fired alerts stay fired.
    with UsageStore(tmp_path / "usage.db") as store:
        assert store.record_counters(ICCID, 990, 0, T0 + 4) == []
        # Next month: counting and alerts start over.
        july = T0 + 31 * 86400
        alerts = store.record_counters(ICCID, 1_600, 0, july)
        assert [a.threshold for a in alerts] == [50]
        assert alerts[0].period == "2024-07"
        assert store.totals(ICCID).total_bytes == 610


def test_period_start_day() -> None:
    assert period_of(T0, start_day=1) == "2024-06"
    assert period_of(T0 + 86400 * 5, start_day=15) == "2024-05"  # June 6th is in May's period
    assert period_of(1_704_067_200.0, start_day=2) == "2023-12"  # Jan 1st 2024


def test_pool_totals_and_alerts_include_remote_devices(tmp_path: Path) -> None:
    with UsageStore(tmp_path / "usage.db") as store:
        store.define_pool("family", [ICCID, OTHER], 10_000)
        for iccid in (ICCID, OTHER):
            store.record_counters(iccid, 0, 0, T0)
            store.record_counters(iccid, 1_000, 500, T0 + 1)
        usage = store.pool_totals("family", {"van": 2_000}, T0 + 2)
        assert usage.local_bytes == 3_000
        assert usage.total_bytes == 5_000
        assert usage.percent == 50.0
        alerts = store.pool_alerts("family", {"van": 2_000}, T0 + 2)
        assert [(a.subject, a.threshold) for a in alerts] == [("pool:family", 50)]
        assert store.pool_alerts("family", {"van": 2_100}, T0 + 3) == []
        with pytest.raises(KeyError):
            store.pool_totals("nope", {}, T0)


def test_wal_mode_and_schema_version(tmp_path: Path) -> None:
    UsageStore(tmp_path / "usage.db").close()
    db = sqlite3.connect(tmp_path / "usage.db")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("SELECT version FROM schema_version").fetchall() == [(1,)]
    db.execute("UPDATE schema_version SET version = 99")
    db.commit()
    db.close()
    with pytest.raises(UsageStoreError, match="newer"):
        UsageStore(tmp_path / "usage.db")


def test_unusable_path_is_a_typed_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageStoreError):
        UsageStore(tmp_path / "file" / "usage.db")


WRITER = textwrap.dedent(
    """
    import sys
    from agent.usage.store import UsageStore
    store = UsageStore(sys.argv[1])
    store.record_counters("{iccid}", 0, 0, {t0})
    i = 0
    while True:
        i += 1
        store.record_counters("{iccid}", i * 1000, i * 10, {t0} + i)
        print(i, flush=True)
    """
)


def test_survives_kill_mid_write(tmp_path: Path) -> None:
    db = tmp_path / "usage.db"
    script = WRITER.format(iccid=ICCID, t0=T0)
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(db)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert proc.stdout is not None
    confirmed = 0
    deadline = time.monotonic() + 30
    while confirmed < 200 and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        confirmed = int(line)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    assert confirmed >= 200, "writer did not get going"
    # Lines already in the pipe were committed too: the last one is the last confirmed commit.
    for line in proc.stdout.read().split():
        confirmed = int(line)
    proc.stdout.close()

    with UsageStore(db) as store:
        total = store.totals(ICCID).total_bytes
        # Every confirmed reading is there; at most the one in flight when killed may be too.
        assert total >= confirmed * 1010
        assert total % 1010 == 0
        assert total <= (confirmed + 1) * 1010
        # And counting goes on from the last stored reading.
        n = total // 1010
        store.record_counters(ICCID, n * 1000 + 1000, n * 10 + 10, T0 + n + 1)
        assert store.totals(ICCID).total_bytes == total + 1010
    check = sqlite3.connect(db)
    assert check.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    check.close()
