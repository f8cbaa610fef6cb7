"""The plan manager's duty on MQTT: who publishes a shared pool's own alerts.

The decisions are pure (agent/usage/plan.py); this module observes the duty order's retained
availability (decoded by agent.siblings.view.SiblingDecoder), the retained records of what each
device announced (`<base>/<device>/usage/pool/<pool>/alerts`), and this device's broker
connection, and publishes the pool's `quota_alert` events while it holds the duty.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

import structlog

from agent.config import Config, PoolConfig
from agent.daemon.publish import StatePublisher
from agent.daemon.usage import UsageTracker
from agent.siblings.view import SiblingAvailability, SiblingDecoder, SiblingObservation, observe
from agent.usage.plan import PoolAlertRecord, decode_record, duty_holder, to_announce

log = structlog.get_logger(__name__)

#: The broker connection is looked at this often (a reconnect restarts the settle time).
CONNECTION_CHECK_S = 1.0


def record_topic(base: str, device: str, pool: str) -> str:
    """Where a device keeps its retained record of a pool's announced thresholds."""
    return f"{base}/{device}/usage/pool/{pool}/alerts"


def duty_filters(cfg: Config) -> list[str]:
    """What the duty subscribes to: the duty orders' availability and every managed pool's
    records (`<base>/+/usage/pool/<pool>/alerts`)."""
    base, me = cfg.mqtt.base_topic, cfg.device_id
    pools = [p for p in cfg.usage.pools if p.manager and cfg.mqtt.enabled]
    devices = sorted({d for p in pools for d in p.duty_order(me) if d != me})
    return [f"{base}/{d}/availability" for d in devices] + [
        record_topic(base, "+", p.name) for p in pools
    ]


class PlanManager:
    """The duty of every pool that names a `manager`; one per Metering."""

    def __init__(
        self,
        cfg: Config,
        tracker: UsageTracker,
        publisher: StatePublisher,
        connected: Callable[[], bool],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._tracker = tracker
        self._publisher = publisher
        self._connected = connected
        self._clock = clock
        self._listening_since = clock()
        self._presence: dict[str, SiblingObservation] = {}
        self._me_since: float | None = None
        #: Holder per pool as last decided (None: nobody yet).
        self.holders: dict[str, str | None] = {}
        self._logged: set[tuple[str, str]] = set()
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self.reconfigure(cfg)

    def reconfigure(self, cfg: Config) -> None:
        """A reloaded config: pools and orders change, what was observed stays."""
        self.cfg = cfg
        self.me = cfg.device_id
        self.base = cfg.mqtt.base_topic
        # Without MQTT there is nobody to share the duty with: the pool alerts stay local.
        self.pools: dict[str, PoolConfig] = {
            p.name: p for p in cfg.usage.pools if p.manager and cfg.mqtt.enabled
        }
        others = {d for p in self.pools.values() for d in p.duty_order(self.me) if d != self.me}
        # The group name only matters for claim topics, which the duty never reads.
        group = cfg.group.name if cfg.group is not None else "pools"
        self._decoder = SiblingDecoder(self.base, group, others)
        self.poke()

    # ---- what arrives -------------------------------------------------------------------

    def on_message(self, topic: str, payload: bytes) -> None:
        """A sibling's availability or a device's record (ours too, retained from before)."""
        if topic.endswith("/availability"):
            msg = self._decoder.decode(topic, payload)
            if isinstance(msg, SiblingAvailability):
                now = self._clock()
                seen = self._presence.get(msg.device, SiblingObservation(since=now))
                self._presence[msg.device] = observe(seen, msg, now)
                self.poke()
            return
        rest = topic.removeprefix(f"{self.base}/").split("/")
        if len(rest) != 5 or rest[1:3] != ["usage", "pool"] or rest[4] != "alerts":
            return
        device, pool = rest[0], rest[3]
        cfg = self.pools.get(pool)
        if cfg is None:
            return
        if device not in cfg.pool_devices(self.me):
            self._drop(device, "device not in the pool")
            return
        if not payload:
            return  # a record deleted: what it announced stays remembered
        record = decode_record(payload)
        if record is None or record.device != device or record.pool != pool:
            self._drop(device, "pool alert record fails its schema")
            return
        self._spawn_remember(record)

    def _spawn_remember(self, record: PoolAlertRecord) -> None:
        task = asyncio.get_running_loop().create_task(self._remember(record))
        # The loop keeps only weak references to tasks: hold it until it is done.
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(_log_failure)

    async def _remember(self, record: PoolAlertRecord) -> None:
        for threshold in record.thresholds:
            await self._tracker.record_announcement(
                record.pool, record.period, threshold, record.device
            )
        self.poke()

    def cancel(self) -> None:
        """Drop records still being remembered (the ledger is closing)."""
        for task in list(self._tasks):
            task.cancel()

    def poke(self) -> None:
        """Decide again soon (usage, presence or records changed)."""
        self._wake.set()

    def _drop(self, device: str, reason: str) -> None:
        if (device, reason) not in self._logged:
            self._logged.add((device, reason))
            log.warning("sibling_message_ignored", device=device[:64], reason=reason)

    # ---- deciding -----------------------------------------------------------------------

    async def run(self) -> None:
        """Decide on every change, when a takeover period ends, and as the connection moves."""
        while True:
            self._wake.clear()
            recheck = await self.step()
            timeout = CONNECTION_CHECK_S
            if recheck is not None:
                timeout = min(timeout, max(0.0, recheck - self._clock()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    async def step(self) -> float | None:
        """One decision for every pool; returns when a decision may change without news."""
        now = self._clock()
        if not self._connected():
            self._me_since = None
        elif self._me_since is None:
            self._me_since = now
        recheck: float | None = None
        for name, pool in self.pools.items():
            duty = duty_holder(
                pool.duty_order(self.me),
                self.me,
                now,
                self._presence,
                me_since=self._me_since,
                takeover_s=pool.manager_takeover,
                listening_since=self._listening_since,
            )
            if duty.recheck_at is not None:
                recheck = duty.recheck_at if recheck is None else min(recheck, duty.recheck_at)
            if self.holders.get(name, "?") != duty.holder:
                self._changed(pool, duty.holder, duty.skipped)
            if duty.holder == self.me:
                await self._announce(pool)
        return recheck

    def _changed(self, pool: PoolConfig, holder: str | None, skipped: tuple[str, ...]) -> None:
        before = self.holders.get(pool.name)
        self.holders[pool.name] = holder
        log.info("pool_duty", pool=pool.name, holder=holder, before=before, skipped=skipped)
        if holder == self.me:
            taking_over = holder != pool.manager
            self._publisher.event(
                "pool_manager_takeover" if taking_over else "pool_manager_duty",
                {
                    "pool": pool.name,
                    "device": self.me,
                    "manager": pool.manager,
                    "offline": list(skipped),
                },
            )

    async def _announce(self, pool: PoolConfig) -> None:
        try:
            snap = self._tracker.pool_snapshot(pool.name)
        except (KeyError, ValueError) as exc:
            log.warning("pool_duty_snapshot_failed", pool=pool.name, error=str(exc))
            return
        period = str(snap["period"])
        announced = self._tracker.announcements(pool.name, period)
        fresh = to_announce(
            int(snap["total_bytes"]),
            int(snap["quota_bytes"]),
            self.cfg.usage.alert_thresholds,
            announced,
        )
        news = [
            t
            for t in fresh
            if await self._tracker.record_announcement(pool.name, period, t, self.me)
        ]
        mine = sorted(
            t
            for t, devices in self._tracker.announcements(pool.name, period).items()
            if self.me in devices
        )
        if mine:
            # The record before the events: the bridge sends retained state first, so a device
            # that takes over after we die has seen what we announced.
            record = PoolAlertRecord(pool=pool.name, device=self.me, period=period, thresholds=mine)
            self._publisher.state(f"usage/pool/{pool.name}/alerts", record)
        for threshold in news:
            data: dict[str, Any] = {
                "subject": f"pool:{pool.name}",
                "period": period,
                "threshold": threshold,
                "used_bytes": int(snap["total_bytes"]),
                "quota_bytes": int(snap["quota_bytes"]),
                "at": time.time(),
                "by": self.me,
            }
            log.warning("quota_alert", **data)
            self._publisher.event("quota_alert", data)


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("pool_record_failed", error=repr(task.exception()))
