"""Per-profile data usage on SQLite: a stored baseline plus deltas, so counter resets lose nothing.

Modem byte counters restart from zero on power cycle and on data-context re-activation. Every
reading is compared with the previous one for the same ICCID: growth is added to the current
period; a lower reading means the counter restarted, so a new segment begins and the whole
reading counts. The first reading ever seen for an ICCID only sets the baseline (we cannot know
which profile the bytes before it belong to). Each call is one transaction in WAL mode, so a
killed process loses at most the reading it was writing.

The store is synchronous and fast (local file); from asyncio call it via asyncio.to_thread.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Literal

import msgspec
import structlog

from agent.errors import AgentError

log = structlog.get_logger(__name__)

SCHEMA_VERSION = 1
_BUSY_TIMEOUT_S = 5.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS readings (
    iccid TEXT PRIMARY KEY,
    rx INTEGER NOT NULL,
    tx INTEGER NOT NULL,
    at REAL NOT NULL,
    segment INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS segments (
    iccid TEXT NOT NULL,
    segment INTEGER NOT NULL,
    started_at REAL NOT NULL,
    reason TEXT NOT NULL,
    PRIMARY KEY (iccid, segment)
);
CREATE TABLE IF NOT EXISTS usage (
    iccid TEXT NOT NULL,
    period TEXT NOT NULL,
    rx INTEGER NOT NULL DEFAULT 0,
    tx INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (iccid, period)
);
CREATE TABLE IF NOT EXISTS quotas (iccid TEXT PRIMARY KEY, quota_bytes INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS pools (
    name TEXT PRIMARY KEY,
    members TEXT NOT NULL,
    quota_bytes INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS alerts (
    subject TEXT NOT NULL,
    period TEXT NOT NULL,
    threshold INTEGER NOT NULL,
    fired_at REAL NOT NULL,
    PRIMARY KEY (subject, period, threshold)
);
CREATE TABLE IF NOT EXISTS link_readings (
    iccid TEXT PRIMARY KEY,
    ifname TEXT NOT NULL,
    ifindex INTEGER NOT NULL,
    rx INTEGER NOT NULL,
    tx INTEGER NOT NULL,
    at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS crosscheck (
    iccid TEXT NOT NULL,
    period TEXT NOT NULL,
    link_bytes INTEGER NOT NULL DEFAULT 0,
    modem_bytes INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (iccid, period)
);
CREATE TABLE IF NOT EXISTS pool_announcements (
    pool TEXT NOT NULL,
    period TEXT NOT NULL,
    threshold INTEGER NOT NULL,
    device TEXT NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (pool, period, threshold, device)
);
CREATE TABLE IF NOT EXISTS probe_usage (
    layer TEXT NOT NULL,
    iccid TEXT NOT NULL,
    period TEXT NOT NULL,
    tx INTEGER NOT NULL DEFAULT 0,
    rx INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (layer, iccid, period)
);
"""

#: How a link reading counts (see UsageStore.record_link).
LinkMode = Literal["delta", "whole", "baseline"]


class UsageStoreError(AgentError):
    """The usage database cannot be opened or has a schema this version does not know."""


class Usage(msgspec.Struct, kw_only=True):
    """One profile's usage in the current period."""

    iccid: str
    period: str
    rx_bytes: int
    tx_bytes: int
    total_bytes: int
    quota_bytes: int | None = None
    percent: float | None = None


class ProbeUsage(msgspec.Struct, kw_only=True):
    """Bytes a layer's health probes cost in one period, per profile it ran on."""

    layer: str
    period: str
    tx_bytes: int
    rx_bytes: int
    total_bytes: int
    by_profile: dict[str, int]


class PoolUsage(msgspec.Struct, kw_only=True):
    """A shared pool: local members' usage plus what other devices reported."""

    name: str
    period: str
    local_bytes: int
    remote_bytes: dict[str, int]
    total_bytes: int
    quota_bytes: int
    percent: float


class QuotaAlert(msgspec.Struct, kw_only=True):
    """A threshold crossed for the first time this period; subject is an ICCID or `pool:<name>`."""

    subject: str
    period: str
    threshold: int
    used_bytes: int
    quota_bytes: int
    at: float


def period_of(at: float, start_day: int = 1) -> str:
    """The billing period ("YYYY-MM", named by the month it starts in) holding UTC time `at`."""
    t = dt.datetime.fromtimestamp(at, tz=dt.UTC)
    year, month = t.year, t.month
    if t.day < start_day:
        year, month = (year - 1, 12) if month == 1 else (year, month - 1)
    return f"{year:04d}-{month:02d}"


def counter_delta(prev: tuple[int, int] | None, rx: int, tx: int) -> tuple[int, int, bool]:
    """(rx delta, tx delta, reset?) from the previous reading; a drop in either means a reset."""
    if prev is None:
        return 0, 0, False
    prx, ptx = prev
    if rx < prx or tx < ptx:
        return rx, tx, True
    return rx - prx, tx - ptx, False


def crossed(used: int, quota: int, thresholds: Iterable[int]) -> list[int]:
    """Thresholds (percent) that `used` has reached against `quota`."""
    if quota <= 0:
        return []
    return [t for t in thresholds if used * 100 >= t * quota]


class UsageStore:
    """Usage accounting on one SQLite file; one transaction per call."""

    def __init__(
        self,
        path: str | Path,
        thresholds: Sequence[int] = (50, 75, 90),
        period_start_day: int = 1,
    ) -> None:
        self.path = Path(path)
        self.thresholds = tuple(sorted(thresholds))
        self.period_start_day = period_start_day
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(
                self.path, timeout=_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._migrate()
        except (sqlite3.Error, OSError) as exc:
            raise UsageStoreError(f"{self.path}: {exc}") from exc

    def _migrate(self) -> None:
        # executescript manages its own transaction, so the schema is one script.
        self._db.executescript(f"BEGIN IMMEDIATE;{_SCHEMA}COMMIT;")
        with self._tx():
            row = self._db.execute("SELECT max(version) FROM schema_version").fetchone()
            version = row[0] if row else None
            if version is None:
                self._db.execute("INSERT INTO schema_version VALUES (?)", (SCHEMA_VERSION,))
            elif version > SCHEMA_VERSION:
                raise UsageStoreError(
                    f"{self.path}: schema version {version} is newer than this agent ({SCHEMA_VERSION})"
                )

    def _tx(self) -> _Transaction:
        return _Transaction(self._db)

    def close(self) -> None:
        """Close the database; the WAL is checkpointed by SQLite."""
        self._db.close()

    def __enter__(self) -> UsageStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- recording ---------------------------------------------------------------------

    def record_counters(
        self, iccid: str, rx_bytes: int, tx_bytes: int, at: float, new_session: bool = False
    ) -> list[QuotaAlert]:
        """Add a counter reading; returns alerts crossed for the first time this period.

        new_session says the counter is known to have restarted (context re-activated, profile
        switched), so the whole reading counts even if it is not lower than the last one.
        """
        if rx_bytes < 0 or tx_bytes < 0:
            raise ValueError("byte counters cannot be negative")
        period = period_of(at, self.period_start_day)
        with self._tx():
            row = self._db.execute(
                "SELECT rx, tx, segment FROM readings WHERE iccid = ?", (iccid,)
            ).fetchone()
            if row is None:
                drx, dtx, reset = (rx_bytes, tx_bytes, True) if new_session else (0, 0, False)
                segment = 0
                self._db.execute(
                    "INSERT INTO segments VALUES (?, ?, ?, ?)", (iccid, 0, at, "first reading")
                )
            else:
                drx, dtx, reset = counter_delta((row[0], row[1]), rx_bytes, tx_bytes)
                if new_session and not reset:
                    drx, dtx, reset = rx_bytes, tx_bytes, True
                segment = row[2] + 1 if reset else row[2]
                if reset:
                    self._db.execute(
                        "INSERT INTO segments VALUES (?, ?, ?, ?)",
                        (iccid, segment, at, "new session" if new_session else "counter reset"),
                    )
            self._db.execute(
                "INSERT INTO readings VALUES (?, ?, ?, ?, ?) ON CONFLICT(iccid) DO UPDATE SET "
                "rx = excluded.rx, tx = excluded.tx, at = excluded.at, segment = excluded.segment",
                (iccid, rx_bytes, tx_bytes, at, segment),
            )
            self._db.execute(
                "INSERT INTO usage VALUES (?, ?, ?, ?) ON CONFLICT(iccid, period) DO UPDATE SET "
                "rx = rx + excluded.rx, tx = tx + excluded.tx",
                (iccid, period, drx, dtx),
            )
            alerts = self._fire(iccid, period, self._used(iccid, period), self._quota(iccid), at)
        if reset:
            log.info("usage_counter_reset", iccid=iccid, segment=segment, new_session=new_session)
        for alert in alerts:
            log.warning("usage_quota_alert", **msgspec.to_builtins(alert))
        return alerts

    def _used(self, iccid: str, period: str) -> int:
        row = self._db.execute(
            "SELECT rx + tx FROM usage WHERE iccid = ? AND period = ?", (iccid, period)
        ).fetchone()
        return int(row[0]) if row else 0

    def _quota(self, iccid: str) -> int | None:
        row = self._db.execute(
            "SELECT quota_bytes FROM quotas WHERE iccid = ?", (iccid,)
        ).fetchone()
        return int(row[0]) if row else None

    def _fire(
        self,
        subject: str,
        period: str,
        used: int,
        quota: int | None,
        at: float,
        *,
        thresholds: Sequence[int] | None = None,
    ) -> list[QuotaAlert]:
        if quota is None:
            return []
        alerts = []
        for t in crossed(used, quota, self.thresholds if thresholds is None else thresholds):
            cur = self._db.execute(
                "INSERT OR IGNORE INTO alerts VALUES (?, ?, ?, ?)", (subject, period, t, at)
            )
            if cur.rowcount:
                alerts.append(
                    QuotaAlert(
                        subject=subject,
                        period=period,
                        threshold=t,
                        used_bytes=used,
                        quota_bytes=quota,
                        at=at,
                    )
                )
        return alerts

    # --- interface counters, cross-check, probe bytes ------------------------------------

    def record_link(
        self,
        iccid: str,
        ifname: str,
        ifindex: int,
        *,
        rx_bytes: int,
        tx_bytes: int,
        at: float,
        mode: LinkMode = "delta",
    ) -> list[QuotaAlert]:
        """Add a reading of the interface's (netlink) counters while `iccid` is the active profile.

        The interface counter keeps running across profile switches, so it has its own baseline
        per ICCID: "delta" adds the growth since this ICCID's last link reading (a lower reading
        means the counter restarted: the whole reading counts; a first reading, or one from
        another interface, only sets the baseline); "whole" counts the whole reading (the
        interface was created while this profile was active); "baseline" counts nothing (the
        profile just became active on an interface that has been counting for another).
        """
        if rx_bytes < 0 or tx_bytes < 0:
            raise ValueError("byte counters cannot be negative")
        period = period_of(at, self.period_start_day)
        with self._tx():
            row = self._db.execute(
                "SELECT ifname, ifindex, rx, tx FROM link_readings WHERE iccid = ?", (iccid,)
            ).fetchone()
            drx = dtx = 0
            if mode == "whole":
                drx, dtx = rx_bytes, tx_bytes
            elif mode == "delta" and row is not None and (row[0], row[1]) == (ifname, ifindex):
                drx, dtx, _ = counter_delta((row[2], row[3]), rx_bytes, tx_bytes)
            self._db.execute(
                "INSERT INTO link_readings VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(iccid) DO UPDATE "
                "SET ifname = excluded.ifname, ifindex = excluded.ifindex, rx = excluded.rx, "
                "tx = excluded.tx, at = excluded.at",
                (iccid, ifname, ifindex, rx_bytes, tx_bytes, at),
            )
            self._db.execute(
                "INSERT INTO usage VALUES (?, ?, ?, ?) ON CONFLICT(iccid, period) DO UPDATE SET "
                "rx = rx + excluded.rx, tx = tx + excluded.tx",
                (iccid, period, drx, dtx),
            )
            alerts = self._fire(iccid, period, self._used(iccid, period), self._quota(iccid), at)
        for alert in alerts:
            log.warning("usage_quota_alert", **msgspec.to_builtins(alert))
        return alerts

    def add_crosscheck(
        self, iccid: str, link_bytes: int, modem_bytes: int, at: float
    ) -> tuple[int, int]:
        """Add bytes counted over the same window by the interface and by the modem; returns
        this period's running totals (link, modem)."""
        period = period_of(at, self.period_start_day)
        with self._tx():
            self._db.execute(
                "INSERT INTO crosscheck VALUES (?, ?, ?, ?) ON CONFLICT(iccid, period) DO UPDATE "
                "SET link_bytes = link_bytes + excluded.link_bytes, "
                "modem_bytes = modem_bytes + excluded.modem_bytes",
                (iccid, period, link_bytes, modem_bytes),
            )
            row = self._db.execute(
                "SELECT link_bytes, modem_bytes FROM crosscheck WHERE iccid = ? AND period = ?",
                (iccid, period),
            ).fetchone()
        return int(row[0]), int(row[1])

    def add_probe_bytes(
        self, layer: str, iccid: str, tx_bytes: int, rx_bytes: int, at: float
    ) -> None:
        """Count bytes a layer's health probes sent and received while `iccid` was active."""
        if tx_bytes < 0 or rx_bytes < 0:
            raise ValueError("byte counts cannot be negative")
        period = period_of(at, self.period_start_day)
        with self._tx():
            self._db.execute(
                "INSERT INTO probe_usage VALUES (?, ?, ?, ?, ?) ON CONFLICT(layer, iccid, period) "
                "DO UPDATE SET tx = tx + excluded.tx, rx = rx + excluded.rx",
                (layer, iccid, period, tx_bytes, rx_bytes),
            )

    def probe_totals(self, layer: str, at: float) -> ProbeUsage:
        """A layer's probe bytes in the period holding `at`."""
        period = period_of(at, self.period_start_day)
        rows = self._db.execute(
            "SELECT iccid, tx, rx FROM probe_usage WHERE layer = ? AND period = ?", (layer, period)
        ).fetchall()
        tx = sum(int(r[1]) for r in rows)
        rx = sum(int(r[2]) for r in rows)
        return ProbeUsage(
            layer=layer,
            period=period,
            tx_bytes=tx,
            rx_bytes=rx,
            total_bytes=tx + rx,
            by_profile={str(r[0]): int(r[1]) + int(r[2]) for r in rows},
        )

    # --- quotas and pools --------------------------------------------------------------

    def set_quota(self, iccid: str, quota_bytes: int | None) -> None:
        """Set (or with None remove) a profile's quota per period."""
        with self._tx():
            if quota_bytes is None:
                self._db.execute("DELETE FROM quotas WHERE iccid = ?", (iccid,))
            else:
                self._db.execute(
                    "INSERT INTO quotas VALUES (?, ?) ON CONFLICT(iccid) DO UPDATE "
                    "SET quota_bytes = excluded.quota_bytes",
                    (iccid, quota_bytes),
                )

    def define_pool(self, name: str, members: Sequence[str], quota_bytes: int) -> None:
        """Create or replace a shared pool."""
        with self._tx():
            self._db.execute(
                "INSERT INTO pools VALUES (?, ?, ?) ON CONFLICT(name) DO UPDATE SET "
                "members = excluded.members, quota_bytes = excluded.quota_bytes",
                (name, ",".join(members), quota_bytes),
            )

    # --- reading -----------------------------------------------------------------------

    def totals(self, iccid: str, at: float | None = None) -> Usage:
        """Usage of one profile in the period holding `at` (default: the latest reading's)."""
        period = self._period_for(iccid, at)
        row = self._db.execute(
            "SELECT rx, tx FROM usage WHERE iccid = ? AND period = ?", (iccid, period)
        ).fetchone()
        rx, tx = (int(row[0]), int(row[1])) if row else (0, 0)
        quota = self._quota(iccid)
        total = rx + tx
        return Usage(
            iccid=iccid,
            period=period,
            rx_bytes=rx,
            tx_bytes=tx,
            total_bytes=total,
            quota_bytes=quota,
            percent=round(100.0 * total / quota, 2) if quota else None,
        )

    def _period_for(self, iccid: str, at: float | None) -> str:
        if at is not None:
            return period_of(at, self.period_start_day)
        row = self._db.execute(
            "SELECT max(at) FROM (SELECT at FROM readings WHERE iccid = ?1 "
            "UNION ALL SELECT at FROM link_readings WHERE iccid = ?1)",
            (iccid,),
        ).fetchone()
        if row is None or row[0] is None:
            return period_of(dt.datetime.now(tz=dt.UTC).timestamp(), self.period_start_day)
        return period_of(float(row[0]), self.period_start_day)

    def segments(self, iccid: str) -> int:
        """How many counter segments (first reading plus resets) this profile has had."""
        row = self._db.execute("SELECT count(*) FROM segments WHERE iccid = ?", (iccid,)).fetchone()
        return int(row[0])

    def pool_totals(self, pool: str, remote_usage: Mapping[str, int], at: float) -> PoolUsage:
        """A pool's usage in the period holding `at`: local members plus other devices' reports."""
        name, members, quota = self._pool(pool)
        period = period_of(at, self.period_start_day)
        local = sum(self._used(m, period) for m in members)
        remote = {k: int(v) for k, v in remote_usage.items()}
        total = local + sum(remote.values())
        return PoolUsage(
            name=name,
            period=period,
            local_bytes=local,
            remote_bytes=remote,
            total_bytes=total,
            quota_bytes=quota,
            percent=round(100.0 * total / quota, 2) if quota else 0.0,
        )

    def pool_alerts(
        self, pool: str, remote_usage: Mapping[str, int], at: float
    ) -> list[QuotaAlert]:
        """Alerts for a pool's thresholds crossed for the first time this period."""
        usage = self.pool_totals(pool, remote_usage, at)
        with self._tx():
            return self._fire(
                f"pool:{pool}", usage.period, usage.total_bytes, usage.quota_bytes, at
            )

    def device_limit_alerts(
        self, pool: str, device: str, limit: int, thresholds: Sequence[int], at: float
    ) -> list[QuotaAlert]:
        """Alerts for this device's own limit inside a pool (its local members' usage), each
        threshold once per period; subject `pool:<pool>/<device>`."""
        _, members, _ = self._pool(pool)
        period = period_of(at, self.period_start_day)
        used = sum(self._used(m, period) for m in members)
        with self._tx():
            return self._fire(
                f"pool:{pool}/{device}", period, used, limit, at, thresholds=thresholds
            )

    def record_announcement(
        self, pool: str, period: str, threshold: int, device: str, at: float
    ) -> bool:
        """Remember that `device` announced a pool threshold this period; True when new."""
        with self._tx():
            cur = self._db.execute(
                "INSERT OR IGNORE INTO pool_announcements VALUES (?, ?, ?, ?, ?)",
                (pool, period, threshold, device, at),
            )
            return bool(cur.rowcount)

    def announcements(self, pool: str, period: str) -> dict[int, list[str]]:
        """Pool thresholds announced in a period → the devices that announced them."""
        rows = self._db.execute(
            "SELECT threshold, device FROM pool_announcements WHERE pool = ? AND period = ? "
            "ORDER BY threshold, at",
            (pool, period),
        ).fetchall()
        out: dict[int, list[str]] = {}
        for threshold, device in rows:
            out.setdefault(int(threshold), []).append(str(device))
        return out

    def _pool(self, pool: str) -> tuple[str, list[str], int]:
        row = self._db.execute(
            "SELECT name, members, quota_bytes FROM pools WHERE name = ?", (pool,)
        ).fetchone()
        if row is None:
            raise KeyError(pool)
        return str(row[0]), [m for m in str(row[1]).split(",") if m], int(row[2])


class _Transaction:
    """BEGIN IMMEDIATE … COMMIT, ROLLBACK on error: one writer, whole records or nothing."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self._db.execute("COMMIT")
        else:
            self._db.execute("ROLLBACK")
