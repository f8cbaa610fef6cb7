"""Feeds modem byte counters into the usage store while the daemon runs, and reports quota alerts.

The store keeps a baseline per ICCID and adds deltas; this tracker adds what only the daemon
knows: which modem a reading came from. A modem whose ICCID changed since its last reading has
switched profiles, and its counter restarted with the new data context, so the whole reading
belongs to the new profile (new session). Store calls are synchronous SQLite work: they run in a
worker thread, one at a time, behind a lock that snapshot() shares.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import msgspec
import structlog

from agent.config import UsageConfig, normalize_iccid, parse_size
from agent.errors import AgentError
from agent.modem.counters import Counters
from agent.usage.store import QuotaAlert, UsageStore, period_of

log = structlog.get_logger(__name__)

STORE_TIMEOUT_S = 15.0


class UsageTimeout(AgentError, TimeoutError):
    """The usage database did not answer in time (another process holds its write lock)."""


def period_start(period: str, start_day: int) -> str:
    """ISO-8601 UTC start of a billing period named "YYYY-MM" (the month it starts in)."""
    return f"{period}-{start_day:02d}T00:00:00Z"


class UsageTracker:
    """Per-modem counter readings → per-profile usage; alerts go to on_alert and are returned."""

    def __init__(
        self,
        store: UsageStore,
        on_alert: Callable[[QuotaAlert], None],
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self._on_alert = on_alert
        self._clock = clock
        self._lock = threading.Lock()
        # modem id -> ICCID of its last recorded reading
        self._last: dict[str, str] = {}
        self._quotas: set[str] = set()
        self._pools: dict[str, tuple[frozenset[str], frozenset[str]]] = {}
        self._remote: dict[str, dict[str, int]] = {}

    # --- configuration -------------------------------------------------------------------

    def apply_config(self, cfg: UsageConfig) -> None:
        """Apply `[usage]`: thresholds, period start day, quotas (sizes parsed) and pools.

        Quotas this tracker applied before and the new config drops are removed. ValueError for
        a size parse_size rejects (load_config has already checked them).
        """
        quotas = {normalize_iccid(k): parse_size(v) for k, v in cfg.quotas.items()}
        pools = [(p, parse_size(p.quota_bytes)) for p in cfg.pools]
        with self._lock:
            self.store.thresholds = tuple(sorted(cfg.alert_thresholds))
            self.store.period_start_day = cfg.period_start_day
            for iccid in self._quotas - quotas.keys():
                self.store.set_quota(iccid, None)
            for iccid, quota in quotas.items():
                self.store.set_quota(iccid, quota)
            for pool, quota in pools:
                members = [normalize_iccid(m) for m in pool.members]
                self.store.define_pool(pool.name, members, quota)
        self._quotas = set(quotas)
        self._pools = {
            p.name: (frozenset(normalize_iccid(m) for m in p.members), frozenset(p.devices))
            for p, _ in pools
        }
        self._remote = {name: self._remote.get(name, {}) for name in self._pools}
        log.info("usage_config_applied", quotas=len(quotas), pools=len(self._pools))

    # --- sampling ------------------------------------------------------------------------

    async def sample(
        self,
        modem_id: str,
        iccid: str | None,
        counters: Counters | None,
        *,
        new_session: bool,
    ) -> list[QuotaAlert]:
        """Record one counter reading of a modem for its current profile; returns new alerts.

        new_session: the caller knows the counter restarted (context re-activated, modem reset).
        Nothing is recorded without both an ICCID and counters.
        """
        if iccid is None or counters is None:
            return []
        iccid = normalize_iccid(iccid)
        rx, tx = counters.rx_bytes, counters.tx_bytes
        last = self._last.get(modem_id)
        switched = last is not None and last != iccid
        if switched:
            log.info("usage_profile_changed", modem=modem_id, old=last, new=iccid)
        at = self._clock()
        alerts = await self._in_thread(self._record, iccid, rx, tx, at, new_session or switched)
        self._last[modem_id] = iccid
        self._deliver(alerts)
        return alerts

    def _record(
        self, iccid: str, rx: int, tx: int, at: float, new_session: bool
    ) -> list[QuotaAlert]:
        with self._lock:
            alerts = self.store.record_counters(iccid, rx, tx, at, new_session=new_session)
            for name, (members, _) in self._pools.items():
                if iccid in members:
                    alerts += self.store.pool_alerts(name, self._remote.get(name, {}), at)
            return alerts

    async def remote_usage(self, pool: str, device: str, used_bytes: int) -> list[QuotaAlert]:
        """Another device's usage of a shared pool this period; returns the pool's new alerts.

        Reports for unknown pools or from devices the pool does not list are ignored.
        """
        entry = self._pools.get(pool)
        if entry is None or device not in entry[1] or used_bytes < 0:
            log.warning("usage_remote_ignored", pool=pool, device=device)
            return []
        self._remote.setdefault(pool, {})[device] = int(used_bytes)
        remote = dict(self._remote[pool])
        alerts = await self._in_thread(self._pool_alerts, pool, remote, self._clock())
        self._deliver(alerts)
        return alerts

    def _pool_alerts(self, pool: str, remote: Mapping[str, int], at: float) -> list[QuotaAlert]:
        with self._lock:
            return self.store.pool_alerts(pool, remote, at)

    def forget_modem(self, modem_id: str) -> None:
        """Drop what the tracker remembers of a modem (removed from the configuration)."""
        self._last.pop(modem_id, None)

    # --- reporting -----------------------------------------------------------------------

    def snapshot(self, iccid: str) -> dict[str, Any]:
        """JSON-ready usage of one profile this period (for MQTT and status); quick SQLite read."""
        with self._lock:
            usage = self.store.totals(normalize_iccid(iccid))
            start_day = self.store.period_start_day
        out: dict[str, Any] = msgspec.to_builtins(usage)
        out["period_start"] = period_start(usage.period, start_day)
        return out

    def pool_snapshot(self, pool: str) -> dict[str, Any]:
        """JSON-ready usage of a shared pool this period; KeyError for an unknown pool."""
        if pool not in self._pools:
            raise KeyError(pool)
        at = self._clock()
        with self._lock:
            usage = self.store.pool_totals(pool, dict(self._remote.get(pool, {})), at)
            start_day = self.store.period_start_day
        out: dict[str, Any] = msgspec.to_builtins(usage)
        out["period_start"] = period_start(usage.period, start_day)
        return out

    def current_period(self) -> str:
        """The billing period holding now."""
        return period_of(self._clock(), self.store.period_start_day)

    # --- plumbing ------------------------------------------------------------------------

    async def _in_thread(self, fn: Callable[..., list[QuotaAlert]], *args: Any) -> list[QuotaAlert]:
        try:
            return await asyncio.wait_for(asyncio.to_thread(fn, *args), STORE_TIMEOUT_S)
        except TimeoutError as exc:
            raise UsageTimeout(f"usage database busy for {STORE_TIMEOUT_S} s") from exc

    def _deliver(self, alerts: list[QuotaAlert]) -> None:
        for alert in alerts:
            try:
                self._on_alert(alert)
            except Exception:
                # A failing publisher must not stop accounting; the alert stays in the store.
                log.exception("usage_alert_callback_failed", subject=alert.subject)
