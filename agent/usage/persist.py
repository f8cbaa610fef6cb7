"""Keeps the usage file in step with the in-memory ledger, on one writer thread, and survives it.

Usage is bookkeeping: the daemon counts in an in-memory UsageStore and this writer applies the
same calls to the SQLite file behind it. Every file operation runs on one dedicated thread, in
order, so the event loop never waits for a disk. When the file fails (read-only, full, corrupt),
the writer drops it and skips further calls; `recover(image)` later reopens it (a corrupt file is
renamed aside with a UTC timestamp and a fresh one started) and writes the whole in-memory ledger
into it, so nothing counted meanwhile is lost.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import datetime as dt
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import structlog

from agent.usage.store import UsageStore, UsageStoreError

log = structlog.get_logger(__name__)

# SQLite's primary result codes for a file that is not (or no longer) a database.
_CORRUPT_CODES = {11, 26}  # SQLITE_CORRUPT, SQLITE_NOTADB

StoreOp = Callable[[UsageStore], object]


class StoreUnavailable(UsageStoreError):
    """The usage file is not open (it failed earlier and has not been recovered yet)."""


class CorruptStore(UsageStoreError):
    """The usage file fails SQLite's integrity check."""


def _corrupt(exc: BaseException) -> bool:
    """True when an error (or its cause) says the file itself is damaged, not the disk."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, CorruptStore):
            return True
        code = getattr(seen, "sqlite_errorcode", None)
        if isinstance(code, int) and code & 0xFF in _CORRUPT_CODES:
            return True
        seen = seen.__cause__
    return False


def set_aside(path: Path, now: dt.datetime | None = None) -> Path:
    """Rename a broken database (and its -wal/-shm) to `<name>.broken-<UTC time>`; OSError if not."""
    stamp = (now or dt.datetime.now(tz=dt.UTC)).strftime("%Y%m%dT%H%M%S%fZ")
    target = path.with_name(f"{path.name}.broken-{stamp}")
    path.rename(target)
    for suffix in ("-wal", "-shm"):
        side = path.with_name(path.name + suffix)
        with contextlib.suppress(FileNotFoundError):
            side.rename(target.with_name(target.name + suffix))
    return target


def read_image(path: Path) -> bytes | None:
    """The database's content without writing anything (read-only media too); None if unreadable."""
    if not path.exists():
        return None
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True)
        try:
            db.execute("PRAGMA quick_check").fetchone()
            return db.serialize()
        finally:
            db.close()
    except sqlite3.Error:
        return None


class UsageFile:
    """The usage SQLite file, touched only from its own writer thread."""

    def __init__(
        self, path: Path, thresholds: Sequence[int] = (50, 75, 90), period_start_day: int = 1
    ) -> None:
        self.path = path
        self.thresholds = tuple(thresholds)
        self.period_start_day = period_start_day
        self.store: UsageStore | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="usage-db"
        )

    # --- run on the writer thread ------------------------------------------------------------

    def open_sync(self) -> bytes | None:
        """Open the file (setting a corrupt one aside); returns its content to seed memory with.

        Raises UsageStoreError when the file cannot be opened for writing; the caller then seeds
        memory from read_image() if the file is still readable.
        """
        try:
            self.store = self._open()
        except UsageStoreError as exc:
            if not _corrupt(exc):
                raise
            aside = set_aside(self.path)
            log.error("usage_store_set_aside", path=str(self.path), moved_to=str(aside))
            self.store = self._open()
        return self.store._db.serialize()

    def _open(self) -> UsageStore:
        store = UsageStore(self.path, self.thresholds, self.period_start_day)
        try:
            row = store._db.execute("PRAGMA quick_check").fetchone()
        except sqlite3.Error as exc:
            store.close()
            raise UsageStoreError(f"{self.path}: {exc}") from exc
        if not row or row[0] != "ok":
            store.close()
            raise CorruptStore(f"{self.path}: integrity check failed: {row[0] if row else '?'}")
        return store

    def apply_sync(self, op: StoreOp) -> object:
        """Apply one ledger call to the file; on failure drop the file and re-raise."""
        if self.store is None:
            raise StoreUnavailable(f"{self.path}: not open")
        try:
            return op(self.store)
        except (sqlite3.Error, OSError, UsageStoreError) as exc:
            self._drop()
            raise UsageStoreError(f"{self.path}: {exc}") from exc

    def recover_sync(self, image: bytes, seeded: bool) -> Path | None:
        """Reopen the file and write image (the whole ledger) into it; returns where a set-aside
        file went. A file the ledger was not seeded from is set aside rather than overwritten."""
        aside: Path | None = None
        if self.store is None:
            if not seeded and self.path.exists():
                aside = set_aside(self.path)
            try:
                self.store = self._open()
            except UsageStoreError as exc:
                if not _corrupt(exc):
                    raise
                aside = set_aside(self.path)
                self.store = self._open()
        source = sqlite3.connect(":memory:")
        try:
            source.deserialize(image)
            source.backup(self.store._db)
        except sqlite3.Error as exc:
            self._drop()
            raise UsageStoreError(f"{self.path}: {exc}") from exc
        finally:
            source.close()
        return aside

    def _drop(self) -> None:
        if self.store is not None:
            with contextlib.suppress(sqlite3.Error):
                self.store.close()
            self.store = None

    # --- called from the event loop -------------------------------------------------------

    def submit(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        """Queue fn(*args) on the writer thread; the future completes with its outcome."""
        return asyncio.wrap_future(self._executor.submit(fn, *args))

    def close_sync(self) -> None:
        """Close the file (on the writer thread)."""
        self._drop()

    async def close(self, timeout: float) -> None:
        """Finish queued writes (bounded), close the file and stop the thread."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.submit(self.close_sync), timeout)
        self._executor.shutdown(wait=False, cancel_futures=True)
