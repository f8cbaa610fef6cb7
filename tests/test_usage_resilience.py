"""Usage never stops the daemon: read-only, full and corrupt state directories on real filesystems.

The filesystems are small tmpfs mounts under the test's own directory (root only), remounted
read-only or filled to the last byte; every mount is removed in the fixture's finalizer.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.config import UsageConfig
from agent.daemon.usage import UsageTracker
from agent.modem.counters import Counters
from agent.usage.store import QuotaAlert, UsageStore

HOME = "8944476500001224158"
TRAVEL = "89012345678901234567"

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")


class TinyFs:
    """A tmpfs of a few hundred KiB that a test can make read-only or fill."""

    def __init__(self, mountpoint: Path) -> None:
        self.path = mountpoint
        self.filler = mountpoint / "filler"

    def remount(self, mode: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{mode}", str(self.path)], check=True)

    def fill(self) -> None:
        """Write until ENOSPC: the next block anyone asks for is refused."""
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            for size in (65536, 4096, 1):
                with contextlib.suppress(OSError):
                    while os.write(fd, b"\0" * size):
                        pass
        finally:
            os.close(fd)

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[TinyFs]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "fs"
    mnt.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=512k,mode=0700", "esa-usage", str(mnt)], check=True
    )
    try:
        yield TinyFs(mnt)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


class Sink:
    """Collects alerts and problem reports."""

    def __init__(self) -> None:
        self.alerts: list[QuotaAlert] = []
        self.problems: list[dict[str, Any]] = []

    def alert(self, alert: QuotaAlert) -> None:
        self.alerts.append(alert)

    def problem(self, detail: dict[str, Any]) -> None:
        self.problems.append(detail)


def set_aside_files(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if p.name.startswith("usage.db.broken-")]


def file_total(path: Path, iccid: str) -> int:
    with UsageStore(path) as store:
        return store.totals(iccid).total_bytes


async def open_tracker(path: Path, sink: Sink, retry_s: float = 3600.0) -> UsageTracker:
    return await UsageTracker.open(path, sink.alert, on_problem=sink.problem, retry_s=retry_s)


async def feed(tracker: UsageTracker, iccid: str, *readings: int, modem: str = "m0") -> None:
    for n in readings:
        await tracker.sample(modem, iccid, Counters(rx_bytes=n, tx_bytes=0), new_session=False)


@needs_root
async def test_read_only_state_dir_at_start_counts_in_memory_and_catches_up(
    tiny_fs: TinyFs,
) -> None:
    db = tiny_fs.path / "usage.db"
    with UsageStore(db) as store:  # last month's history, written while the disk worked
        store.record_counters(HOME, 0, 0, at=1.0)
    earlier = await open_tracker(db, Sink())
    await feed(earlier, HOME, 0, 500)
    await earlier.close()
    tiny_fs.remount("ro")

    sink = Sink()
    tracker = await open_tracker(db, sink)
    assert tracker.degraded
    assert tracker.snapshot(HOME)["total_bytes"] == 500  # history read from the read-only file
    await feed(tracker, HOME, 0, 300, 700)
    assert tracker.snapshot(HOME)["total_bytes"] == 1_200
    assert len(sink.problems) == 1

    tiny_fs.remount("rw")
    tracker.retry_s = 0.0
    tracker._next_retry = 0.0
    await feed(tracker, HOME, 800)
    assert not tracker.degraded
    await tracker.close()
    assert file_total(db, HOME) == 1_300
    assert len(sink.problems) == 1


@needs_root
async def test_missing_state_dir_on_read_only_media_does_not_raise(tiny_fs: TinyFs) -> None:
    tiny_fs.remount("ro")
    sink = Sink()
    tracker = await open_tracker(tiny_fs.path / "state" / "usage.db", sink)
    await feed(tracker, HOME, 0, 50)
    assert tracker.degraded
    assert tracker.snapshot(HOME)["total_bytes"] == 50
    assert len(sink.problems) == 1
    await tracker.close()


@needs_root
async def test_disk_full_mid_run_keeps_counting_alerts_once_and_recovers(
    tiny_fs: TinyFs,
) -> None:
    db = tiny_fs.path / "usage.db"
    sink = Sink()
    tracker = await open_tracker(db, sink)
    tracker.apply_config(UsageConfig(quotas={HOME: 100_000}))
    await feed(tracker, HOME, 0, 1_000)
    assert not tracker.degraded

    tiny_fs.fill()
    total = 1_000
    for i in range(1, 200):  # each reading is one more WAL frame: the disk refuses one soon
        await feed(tracker, f"89440000000000{i:05d}", 0, modem=f"x{i}")
        await feed(tracker, HOME, 1_000 + 100 * i)
        total += 100
        if tracker.degraded and i > 20:
            break
    assert tracker.degraded
    assert tracker.snapshot(HOME)["total_bytes"] == total
    assert len(sink.problems) == 1
    assert "full" in sink.problems[0]["error"]
    # Quota alerts still fire from memory while the disk is full.
    await feed(tracker, HOME, 60_000)
    assert [a.threshold for a in sink.alerts] == [50]

    tiny_fs.free()
    tracker._next_retry = 0.0
    await feed(tracker, HOME, 60_100)
    assert not tracker.degraded
    await tracker.close()
    assert file_total(db, HOME) == 60_100
    with UsageStore(db) as store:  # the alert fired in memory is not fired again after restart
        assert store.record_counters(HOME, 60_200, 0, at=2e9) == []


async def test_corrupt_file_is_set_aside_and_a_fresh_one_started(tmp_path: Path) -> None:
    db = tmp_path / "usage.db"
    db.write_bytes(b"this is not a database, " * 200)
    sink = Sink()
    tracker = await open_tracker(db, sink)
    await feed(tracker, HOME, 0, 40)
    await tracker.close()
    aside = set_aside_files(tmp_path)
    assert len(aside) == 1
    assert (tmp_path / aside[0]).read_bytes().startswith(b"this is not a database")
    assert not tracker.degraded
    assert file_total(db, HOME) == 40


async def test_damaged_pages_are_found_and_set_aside(tmp_path: Path) -> None:
    db = tmp_path / "usage.db"
    with UsageStore(db) as store:
        for i in range(300):
            store.record_counters(f"8944{i:015d}", 0, 0, at=1.0)
        store._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    raw = bytearray(db.read_bytes())
    page = 4096
    raw[2 * page : 4 * page] = b"\xa5" * (2 * page)  # two pages of garbage after the header
    db.write_bytes(bytes(raw))
    tracker = await open_tracker(db, Sink())
    await feed(tracker, HOME, 0, 10)
    await tracker.close()
    assert set_aside_files(tmp_path)
    assert file_total(db, HOME) == 10


async def test_a_locked_file_never_holds_up_sampling_or_snapshots(tmp_path: Path) -> None:
    """Another process holds the write lock: samples finish from memory, snapshots answer."""
    db = tmp_path / "usage.db"
    tracker = await open_tracker(db, Sink())
    await feed(tracker, HOME, 0)
    other = sqlite3.connect(db, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        await feed(tracker, HOME, 25)
        assert tracker.snapshot(HOME)["total_bytes"] == 25
        still_locked = other.in_transaction
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert still_locked
    await asyncio.sleep(0)
    await tracker.close()
    assert file_total(db, HOME) == 25


async def test_a_reading_past_64_bits_is_refused_not_raised(tmp_path: Path) -> None:
    tracker = await open_tracker(tmp_path / "usage.db", Sink())
    await feed(tracker, HOME, 0, 100)
    assert (
        await tracker.sample("m0", HOME, Counters(rx_bytes=2**64, tx_bytes=0), new_session=False)
        == []
    )
    await feed(tracker, HOME, 150)
    assert tracker.snapshot(HOME)["total_bytes"] == 150
    await tracker.close()


@needs_root
async def test_a_file_found_broken_when_the_disk_returns_is_set_aside(tiny_fs: TinyFs) -> None:
    """The disk fills mid-run; meanwhile the file is damaged: recovery sets it aside, starts a
    fresh one and writes everything counted in memory into it."""
    db = tiny_fs.path / "usage.db"
    sink = Sink()
    tracker = await open_tracker(db, sink)
    await feed(tracker, HOME, 0, 2_000)
    tiny_fs.fill()
    for i in range(1, 200):
        await feed(tracker, f"89440000000000{i:05d}", 0, modem=f"x{i}")
        if tracker.degraded:
            break
    assert tracker.degraded
    await feed(tracker, HOME, 2_500)
    tiny_fs.free()
    for name in ("usage.db", "usage.db-wal", "usage.db-shm"):
        (tiny_fs.path / name).unlink(missing_ok=True)
    db.write_bytes(b"\xde\xad" * 2048)
    tracker._next_retry = 0.0
    await feed(tracker, HOME, 2_600)
    assert not tracker.degraded
    await tracker.close()
    assert set_aside_files(tiny_fs.path)
    assert file_total(db, HOME) == 2_600
    assert len(sink.problems) == 1
