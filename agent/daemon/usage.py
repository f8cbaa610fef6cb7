"""Feeds modem byte counters into the usage ledger while the daemon runs, and reports quota alerts.

The store keeps a baseline per ICCID and adds deltas; this tracker adds what only the daemon
knows: which modem a reading came from. A modem whose ICCID changed since its last reading has
switched profiles, and its counter restarted with the new data context, so the whole reading
belongs to the new profile (new session).

Usage is bookkeeping and never stops failover. The ledger the daemon reads and writes lives in
memory (an in-memory SQLite database: no file, no lock, so a call returns in microseconds on the
event loop); agent.usage.persist.UsageFile applies the same calls to the file on its own thread.
When the file fails, the tracker logs and reports it once, keeps counting in memory, and tries
again every RETRY_S seconds, writing the whole ledger back when the file works again.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import msgspec
import structlog

from agent.config import UsageConfig, normalize_iccid, parse_size
from agent.errors import AgentError
from agent.modem.counters import Counters
from agent.net.linkwatch import CounterReader, LinkCounters, LinkError
from agent.usage.persist import StoreUnavailable, UsageFile, read_image
from agent.usage.plan import limit_thresholds
from agent.usage.store import LinkMode, QuotaAlert, UsageStore, UsageStoreError, period_of

log = structlog.get_logger(__name__)

STORE_TIMEOUT_S = 15.0  # opening the file at start, and finishing writes at close
WRITE_WAIT_S = 2.0  # how long a sample waits for its write before leaving it queued
RETRY_S = 30.0  # between attempts to bring a failed file back
MAX_BACKLOG = 256  # writes queued behind a stuck disk before the file counts as failed
#: Interface and modem counters disagree by framing (Ethernet headers on ECM/NCM links, local
#: ARP/DHCP the modem never forwards) and by when each was read: tolerate this much.
CROSSCHECK_TOLERANCE_BYTES = 1 << 20
CROSSCHECK_TOLERANCE_RATIO = 0.10

ProblemCallback = Callable[[dict[str, Any]], None]


class UsageTimeout(AgentError, TimeoutError):
    """The usage database did not answer in time (another process holds its write lock)."""


def period_start(period: str, start_day: int) -> str:
    """ISO-8601 UTC start of a billing period named "YYYY-MM" (the month it starts in)."""
    return f"{period}-{start_day:02d}T00:00:00Z"


def _unwal(image: bytes) -> bytes:
    """An image of a WAL-mode file made loadable in memory (header bytes 18-19: rollback mode)."""
    if len(image) >= 20 and image[18:20] == b"\x02\x02":
        return image[:18] + b"\x01\x01" + image[20:]
    return image


class UsageTracker:
    """Per-modem counter readings → per-profile usage; alerts go to on_alert and are returned."""

    def __init__(
        self,
        store: UsageStore | None,
        on_alert: Callable[[QuotaAlert], None],
        *,
        clock: Callable[[], float] = time.time,
        on_problem: ProblemCallback | None = None,
        file: UsageFile | None = None,
        image: bytes | None = None,
        retry_s: float = RETRY_S,
    ) -> None:
        """store: an open file store to persist to (tests); the daemon uses open() instead."""
        if file is None:
            if store is None:
                raise ValueError("a store or a file is needed")
            file = UsageFile(store.path, store.thresholds, store.period_start_day)
            file.store = store
            image = store._db.serialize()
        self._file = file
        self.memory = UsageStore(":memory:", file.thresholds, file.period_start_day)
        if image is not None:
            self.memory._db.deserialize(_unwal(image))
            with contextlib.suppress(UsageStoreError, sqlite3.Error):
                self.memory._migrate()  # tables added since a read-only file was written
        # The file holds what memory holds, or is set aside before memory is written into it.
        self._seeded = image is not None
        self._broken = file.store is None
        self._recovering = False
        self._reported = False
        self._next_retry = time.monotonic() + retry_s
        self.retry_s = retry_s
        self._on_alert = on_alert
        self._on_problem = on_problem
        self._clock = clock
        # modem id -> ICCID of its last recorded reading
        self._last: dict[str, str] = {}
        self._quotas: set[str] = set()
        self._pools: dict[str, tuple[frozenset[str], frozenset[str]]] = {}
        self._remote: dict[str, dict[str, int]] = {}
        # This device's own limit per pool (bytes), and the thresholds its alerts use.
        self._device: str | None = None
        self._limits: dict[str, int] = {}
        self._limit_thresholds: tuple[int, ...] = ()
        self._pending: set[asyncio.Future[Any]] = set()
        self._slow = False  # a write outlived WRITE_WAIT_S and others queue behind it
        # modem id -> (ICCID, ifindex) of its last interface reading, and the readings
        self._links: dict[str, tuple[str, int]] = {}
        self._link_prev: dict[str, LinkCounters] = {}
        self._modem_prev: dict[str, Counters] = {}
        self._mismatched: set[str] = set()
        self._readers: dict[str | None, CounterReader] = {}

    @classmethod
    async def open(
        cls,
        path: Path,
        on_alert: Callable[[QuotaAlert], None],
        *,
        thresholds: tuple[int, ...] = (50, 75, 90),
        period_start_day: int = 1,
        on_problem: ProblemCallback | None = None,
        clock: Callable[[], float] = time.time,
        retry_s: float = RETRY_S,
    ) -> UsageTracker:
        """Open the usage file on its writer thread; never raises for a file that fails (the
        tracker then counts in memory, seeded from the file if it can still be read)."""
        file = UsageFile(path, thresholds, period_start_day)
        error: BaseException | None = None
        try:
            image = await asyncio.wait_for(file.submit(file.open_sync), STORE_TIMEOUT_S)
        except (UsageStoreError, OSError, sqlite3.Error, TimeoutError) as exc:
            error = exc
            try:
                image = await asyncio.wait_for(file.submit(read_image, path), STORE_TIMEOUT_S)
            except TimeoutError:
                image = None
        tracker = cls(
            None,
            on_alert,
            clock=clock,
            on_problem=on_problem,
            file=file,
            image=image,
            retry_s=retry_s,
        )
        if error is not None:
            tracker._failed(error)
        return tracker

    @property
    def store(self) -> UsageStore | None:
        """The file store while it works; None while usage is counted in memory only. Its
        connection belongs to the writer thread: read it only when no write is queued."""
        return self._file.store

    @property
    def degraded(self) -> bool:
        """True while the file has failed and usage lives in memory only."""
        return self._broken

    async def close(self) -> None:
        """Finish queued writes (bounded) and close the file and the netlink readers."""
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()
        await self._file.close(STORE_TIMEOUT_S)

    # --- configuration -------------------------------------------------------------------

    def apply_config(self, cfg: UsageConfig, device_id: str | None = None) -> None:
        """Apply `[usage]`: thresholds, period start day, quotas (sizes parsed) and pools, and
        with `device_id` this device's own limits inside pools (`device_limits`).

        Quotas this tracker applied before and the new config drops are removed. ValueError for
        a size parse_size rejects (load_config has already checked them).
        """
        quotas = {normalize_iccid(k): parse_size(v) for k, v in cfg.quotas.items()}
        pools = [
            (p.name, [normalize_iccid(m) for m in p.members], parse_size(p.quota_bytes))
            for p in cfg.pools
        ]
        thresholds = tuple(sorted(cfg.alert_thresholds))
        dropped = self._quotas - quotas.keys()

        def apply(store: UsageStore) -> None:
            store.thresholds = thresholds
            store.period_start_day = cfg.period_start_day
            for iccid in dropped:
                store.set_quota(iccid, None)
            for iccid, quota in quotas.items():
                store.set_quota(iccid, quota)
            for name, members, quota in pools:
                store.define_pool(name, members, quota)

        apply(self.memory)
        self._file.thresholds = thresholds
        self._file.period_start_day = cfg.period_start_day
        self._persist_later(apply)
        self._quotas = set(quotas)
        self._pools = {
            p.name: (frozenset(normalize_iccid(m) for m in p.members), frozenset(p.devices))
            for p in cfg.pools
        }
        self._remote = {name: self._remote.get(name, {}) for name in self._pools}
        self._device = device_id
        self._limits = {
            p.name: parse_size(p.device_limits[device_id])
            for p in cfg.pools
            if device_id is not None and device_id in p.device_limits
        }
        self._limit_thresholds = limit_thresholds(thresholds)
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
        Nothing is recorded without both an ICCID and counters. Never raises for the file.
        """
        if iccid is None or counters is None:
            return []
        iccid = normalize_iccid(iccid)
        rx, tx = counters.rx_bytes, counters.tx_bytes
        last = self._last.get(modem_id)
        switched = last is not None and last != iccid
        if switched:
            log.info("usage_profile_changed", modem=modem_id, old=last, new=iccid)
        at, fresh = self._clock(), new_session or switched

        def op(store: UsageStore) -> list[QuotaAlert]:
            return self._record(store, iccid, (rx, tx), at, new_session=fresh)

        try:
            alerts = op(self.memory)
        except (sqlite3.Error, ValueError, OverflowError) as exc:
            # A reading the ledger cannot take (a counter past 64 bits, memory exhausted):
            # bookkeeping loses one reading, the caller (a poll, a switch) carries on.
            log.error("usage_sample_refused", modem=modem_id, iccid=iccid, error=str(exc))
            return []
        self._last[modem_id] = iccid
        await self._persist(op)
        self._deliver(alerts)
        return alerts

    def _record(
        self,
        store: UsageStore,
        iccid: str,
        counters: tuple[int, int],
        at: float,
        *,
        new_session: bool,
    ) -> list[QuotaAlert]:
        alerts = store.record_counters(iccid, *counters, at, new_session=new_session)
        return alerts + self._pool_alerts_for(store, iccid, at)

    async def sample_interface(
        self,
        modem_id: str,
        iccid: str | None,
        ifname: str,
        *,
        netns: str | None = None,
        modem_counters: Counters | None = None,
    ) -> list[QuotaAlert]:
        """Record the modem's network interface counters (netlink) for its current profile.

        Works for every vendor. `modem_counters` (AT+QGDCNT where the vendor has one) is kept as
        a cross-check only. An unreadable interface records nothing (the next reading's delta
        covers the gap) and is logged as `usage_link_unreadable`. Never raises for the file.
        """
        if iccid is None:
            return []
        reader = self._readers.get(netns)
        if reader is None:
            reader = self._readers[netns] = CounterReader(netns)
        try:
            reading = await reader.read(ifname)
        except LinkError as exc:
            log.warning("usage_link_unreadable", modem=modem_id, interface=ifname, error=str(exc))
            return []
        return await self.sample_link(modem_id, iccid, reading, modem_counters)

    async def sample_link(
        self,
        modem_id: str,
        iccid: str,
        reading: LinkCounters,
        modem_counters: Counters | None = None,
    ) -> list[QuotaAlert]:
        """Record one interface reading of a modem for its current profile; returns new alerts.

        The interface counts across profile switches, so a switch starts the new profile from
        the current reading; an interface re-created (new ifindex) while the daemon watched
        counts whole for the profile; the first reading after a start continues the stored
        baseline when it is the same interface (same name and index), else it is a baseline.
        """
        iccid = normalize_iccid(iccid)
        last = self._links.get(modem_id)
        mode: LinkMode = "delta"
        if last is not None and last[1] != reading.ifindex:
            mode = "whole"
            log.info("usage_link_recreated", modem=modem_id, interface=reading.ifname)
        elif last is not None and last[0] != iccid:
            mode = "baseline"
            log.info("usage_profile_changed", modem=modem_id, old=last[0], new=iccid)
        at = self._clock()
        op = partial(self._record_link, iccid, reading, at, mode)
        try:
            alerts = op(self.memory)
        except (sqlite3.Error, ValueError, OverflowError) as exc:
            log.error("usage_sample_refused", modem=modem_id, iccid=iccid, error=str(exc))
            return []
        previous = self._link_prev.get(modem_id)
        self._links[modem_id] = (iccid, reading.ifindex)
        self._link_prev[modem_id] = reading
        await self._persist(op)
        if modem_counters is not None:
            prev_modem = self._modem_prev.get(modem_id)
            self._modem_prev[modem_id] = modem_counters
            if mode == "delta" and previous is not None and prev_modem is not None:
                await self._crosscheck(iccid, (previous, reading), (prev_modem, modem_counters), at)
        self._deliver(alerts)
        return alerts

    def _record_link(
        self, iccid: str, reading: LinkCounters, at: float, mode: LinkMode, store: UsageStore
    ) -> list[QuotaAlert]:
        alerts = store.record_link(
            iccid,
            reading.ifname,
            reading.ifindex,
            rx_bytes=reading.rx_bytes,
            tx_bytes=reading.tx_bytes,
            at=at,
            mode=mode,
        )
        return alerts + self._pool_alerts_for(store, iccid, at)

    def _pool_alerts_for(self, store: UsageStore, iccid: str, at: float) -> list[QuotaAlert]:
        """The pools `iccid` is in: their own thresholds, then this device's limit in each."""
        alerts: list[QuotaAlert] = []
        for name, (members, _) in self._pools.items():
            if iccid in members:
                alerts += store.pool_alerts(name, self._remote.get(name, {}), at)
                limit = self._limits.get(name)
                if limit is not None and self._device is not None:
                    alerts += store.device_limit_alerts(
                        name, self._device, limit, self._limit_thresholds, at
                    )
        return alerts

    async def _crosscheck(
        self,
        iccid: str,
        links: tuple[LinkCounters, LinkCounters],
        modems: tuple[Counters, Counters],
        at: float,
    ) -> None:
        """Compare what the interface and the modem counted over the same window."""
        (link_prev, link), (modem_prev, modem) = links, modems
        link_bytes = link.rx_bytes + link.tx_bytes - link_prev.rx_bytes - link_prev.tx_bytes
        modem_bytes = modem.rx_bytes + modem.tx_bytes - modem_prev.rx_bytes - modem_prev.tx_bytes
        if link_bytes < 0 or modem_bytes < 0:
            return  # one of them restarted in this window: nothing comparable

        def op(store: UsageStore) -> tuple[int, int]:
            return store.add_crosscheck(iccid, link_bytes, modem_bytes, at)

        try:
            totals = op(self.memory)
        except (sqlite3.Error, ValueError, OverflowError) as exc:
            log.error("usage_crosscheck_refused", iccid=iccid, error=str(exc))
            return
        await self._persist(op)
        if crosscheck_mismatch(*totals):
            if iccid not in self._mismatched:
                self._mismatched.add(iccid)
                log.warning(
                    "usage_crosscheck_mismatch",
                    iccid=iccid,
                    link_bytes=totals[0],
                    modem_bytes=totals[1],
                )
        elif iccid in self._mismatched:
            self._mismatched.discard(iccid)
            log.info("usage_crosscheck_agrees", iccid=iccid, link_bytes=totals[0])

    async def record_probe_bytes(self, layer: str, iccid: str | None, tx: int, rx: int) -> None:
        """Count a layer's probe bytes (LayerMonitor.take_probe_bytes()) against its profile."""
        if tx <= 0 and rx <= 0:
            return
        key = normalize_iccid(iccid) if iccid else "-"
        at = self._clock()

        def op(store: UsageStore) -> None:
            store.add_probe_bytes(layer, key, tx, rx, at)

        try:
            op(self.memory)
        except (sqlite3.Error, ValueError, OverflowError) as exc:
            log.error("usage_probe_bytes_refused", layer=layer, error=str(exc))
            return
        await self._persist(op)

    def probe_snapshot(self, layer: str) -> dict[str, Any] | None:
        """JSON-ready probe bytes of a layer this period (for status), from memory; None when
        the ledger cannot say."""
        try:
            usage = self.memory.probe_totals(layer, self._clock())
        except sqlite3.Error as exc:
            log.warning("usage_probe_snapshot_failed", layer=layer, error=str(exc))
            return None
        out: dict[str, Any] = msgspec.to_builtins(usage)
        return out

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
        op = partial(_pool_alerts, pool, remote, self._clock())
        try:
            alerts = op(self.memory)
        except (sqlite3.Error, ValueError, OverflowError) as exc:
            log.error("usage_remote_refused", pool=pool, device=device, error=str(exc))
            return []
        await self._persist(op)
        self._deliver(alerts)
        return alerts

    async def record_announcement(
        self, pool: str, period: str, threshold: int, device: str
    ) -> bool:
        """Remember that `device` announced a pool threshold this period (ours or a sibling's
        retained record); True when it is news. Kept in the ledger, so a restart remembers."""
        at = self._clock()

        def op(store: UsageStore) -> bool:
            return store.record_announcement(pool, period, threshold, device, at)

        try:
            new = op(self.memory)
        except (sqlite3.Error, ValueError, OverflowError) as exc:
            log.error("usage_announcement_refused", pool=pool, error=str(exc))
            return False
        if new:
            await self._persist(op)
        return new

    def announcements(self, pool: str, period: str) -> dict[int, list[str]]:
        """Pool thresholds announced in a period (by anyone we heard of) → who announced them."""
        return self.memory.announcements(pool, period)

    def device_limit(self, pool: str) -> int | None:
        """This device's own limit inside a pool (bytes), if it has one."""
        return self._limits.get(pool)

    def forget_modem(self, modem_id: str) -> None:
        """Drop what the tracker remembers of a modem (removed from the configuration)."""
        self._last.pop(modem_id, None)
        self._links.pop(modem_id, None)
        self._link_prev.pop(modem_id, None)
        self._modem_prev.pop(modem_id, None)

    # --- reporting -----------------------------------------------------------------------

    def snapshot(self, iccid: str) -> dict[str, Any]:
        """JSON-ready usage of one profile this period (for MQTT and status), from memory."""
        usage = self.memory.totals(normalize_iccid(iccid))
        out: dict[str, Any] = msgspec.to_builtins(usage)
        out["period_start"] = period_start(usage.period, self.memory.period_start_day)
        return out

    def pool_snapshot(self, pool: str) -> dict[str, Any]:
        """JSON-ready usage of a shared pool this period; KeyError for an unknown pool."""
        if pool not in self._pools:
            raise KeyError(pool)
        at = self._clock()
        usage = self.memory.pool_totals(pool, dict(self._remote.get(pool, {})), at)
        out: dict[str, Any] = msgspec.to_builtins(usage)
        out["period_start"] = period_start(usage.period, self.memory.period_start_day)
        return out

    def current_period(self) -> str:
        """The billing period holding now."""
        return period_of(self._clock(), self.memory.period_start_day)

    # --- the file ------------------------------------------------------------------------

    async def _persist(self, op: Callable[[UsageStore], object]) -> None:
        """Apply op to the file too, waiting at most WRITE_WAIT_S; failures are handled here."""
        if self._broken and not self._recovering:
            await self._maybe_recover()
            if self._broken and not self._recovering:
                return  # memory has it; the next recovery writes the whole ledger
        fut = self._file.submit(self._file.apply_sync, op)
        self._track(fut)
        if self._slow:
            # Earlier writes are still queued behind a slow disk: memory has this reading, so
            # waiting again would only hold up the poll (or the switch) that sampled it.
            if len(self._pending) > MAX_BACKLOG:
                self._failed(
                    UsageStoreError(f"{self._file.path}: {len(self._pending)} writes queued")
                )
            return
        try:
            await asyncio.wait_for(asyncio.shield(fut), WRITE_WAIT_S)
        except TimeoutError:
            self._slow = True
            log.warning("usage_store_slow", path=str(self._file.path), waited_s=WRITE_WAIT_S)
        except StoreUnavailable:
            pass
        except (UsageStoreError, OSError, sqlite3.Error) as exc:
            self._failed(exc)

    def _persist_later(self, op: Callable[[UsageStore], object]) -> None:
        """Queue op for the file without waiting (from synchronous callers)."""
        if self._broken and not self._recovering:
            return
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # no running loop: nothing else runs, apply on the spot
            try:
                self._file.apply_sync(op)
            except (UsageStoreError, OSError, sqlite3.Error) as exc:
                self._failed(exc)
            return
        self._track(self._file.submit(self._file.apply_sync, op))

    def _track(self, fut: asyncio.Future[Any]) -> None:
        self._pending.add(fut)
        fut.add_done_callback(self._settled)

    def _settled(self, fut: asyncio.Future[Any]) -> None:
        self._pending.discard(fut)
        if not self._pending:
            self._slow = False
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is not None and not isinstance(exc, StoreUnavailable):
            self._failed(exc)

    def _failed(self, exc: BaseException) -> None:
        """The file failed: count in memory from now on; log and report once per outage."""
        if self._broken and self._reported:
            return
        self._broken = True
        self._next_retry = time.monotonic() + self.retry_s
        if self._reported:
            return
        self._reported = True
        detail = {"path": str(self._file.path), "error": str(exc), "retry_s": self.retry_s}
        log.error("usage_store_failed", counting="memory", **detail)
        if self._on_problem is not None:
            try:
                self._on_problem(detail)
            except Exception:
                log.exception("usage_problem_callback_failed")

    async def _maybe_recover(self) -> None:
        if self._recovering or time.monotonic() < self._next_retry:
            return
        self._recovering = True
        image = self.memory._db.serialize()
        try:
            aside = await asyncio.wait_for(
                self._file.submit(self._file.recover_sync, image, self._seeded), STORE_TIMEOUT_S
            )
        except (UsageStoreError, OSError, sqlite3.Error, TimeoutError) as exc:
            self._next_retry = time.monotonic() + self.retry_s
            log.info("usage_store_retry_failed", path=str(self._file.path), error=str(exc))
            return
        finally:
            self._recovering = False
        self._broken = False
        self._reported = False
        self._seeded = True
        log.warning(
            "usage_store_recovered",
            path=str(self._file.path),
            set_aside=str(aside) if aside is not None else None,
        )

    # --- plumbing ------------------------------------------------------------------------

    def _deliver(self, alerts: list[QuotaAlert]) -> None:
        for alert in alerts:
            try:
                self._on_alert(alert)
            except Exception:
                # A failing publisher must not stop accounting; the alert stays in the store.
                log.exception("usage_alert_callback_failed", subject=alert.subject)


def _pool_alerts(
    pool: str, remote: Mapping[str, int], at: float, store: UsageStore
) -> list[QuotaAlert]:
    return store.pool_alerts(pool, remote, at)


def crosscheck_mismatch(link_bytes: int, modem_bytes: int) -> bool:
    """Whether the interface's and the modem's totals differ beyond framing and timing."""
    allowed = max(
        CROSSCHECK_TOLERANCE_BYTES, CROSSCHECK_TOLERANCE_RATIO * max(link_bytes, modem_bytes)
    )
    return abs(link_bytes - modem_bytes) > allowed
