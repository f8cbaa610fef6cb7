"""The notification courier: every pending eUICC notification goes to its SM-DP+ on its own.

Enable, disable, delete and install each leave a signed notification on the eUICC (SGP.22
§3.5); the operator learns of the change only when it reaches the SM-DP+. The courier sends them
over the working layer, and removes one from the card only after its SM-DP+ accepted it: a
delete notification is the only record that a profile was removed, so it is never dropped unsent.

When: after any change of a modem's profile list (a switch, disable, delete or download, whoever
asked for it), when a working layer comes up, and when an SM-DP+'s backoff ends. The eUICC is
read and written under the modem's lock and never while a switch holds the modem; the lock is
not held while the SM-DP+ is talked to (a switch must not wait for the network).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, Final, cast

import structlog

from agent.daemon.provision import NoWorkingLink
from agent.errors import AgentError
from agent.euicc.es9 import Es9Error
from agent.euicc.es10 import NotificationMetadata, PendingNotification
from agent.euicc.lpa import Lpa
from agent.euicc.notifications import (
    NotificationOutcome,
    NotificationSink,
    RetrySchedule,
    deliver,
    remove_sent,
)
from agent.health.probes import LinkBinding

if TYPE_CHECKING:
    from agent.daemon.app import Daemon
    from agent.daemon.session import ModemSession

log = structlog.get_logger(__name__)

#: One eUICC read or NotificationSent round, the wait for the modem's lock included.
EUICC_TIMEOUT_S: Final = 90.0
#: A modem that could not be read (offline, busy card) is tried again after this backoff.
EUICC_RETRY_INITIAL_S: Final = 5.0
EUICC_RETRY_MAX_S: Final = 300.0
#: A modem waiting for its switch to end is looked at again this often (its updates wake us too).
BLOCKED_RECHECK_S: Final = 5.0

SinkFactory = Callable[[str], NotificationSink]


def _wall(monotonic_at: float) -> str:
    """A monotonic instant as UTC wall-clock text, for status."""
    at = time.time() + (monotonic_at - time.monotonic())
    return datetime.datetime.fromtimestamp(at, datetime.UTC).isoformat(timespec="seconds")


class NotificationCourier:
    """One per daemon; `run` is a supervised task. Others call `kick(modem)` after an eUICC
    change the profile list does not show; profile-list changes are noticed on their own."""

    def __init__(self, daemon: Daemon, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.d = daemon
        self._clock = clock
        self._wake = asyncio.Event()
        #: Modems whose eUICC may hold notifications not yet tried.
        self._dirty: set[str] = set()
        #: Modems whose count (for status) is stale; read even without a working link.
        self._uncounted: set[str] = set()
        #: What each modem's eUICC held at the last read (metadata only).
        self._pending: dict[str, list[NotificationMetadata]] = {}
        self._profiles_seen: dict[str, tuple[tuple[str | None, str | None], ...]] = {}
        self._usable = False
        self._errors: dict[str, str] = {}
        #: A modem's eUICC read in flight (a pass or a count), and each (modem, SM-DP+) batch.
        self._reading: dict[str, asyncio.Task[None]] = {}
        self._inflight: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._jobs: set[asyncio.Task[None]] = set()
        self.sent = 0
        self.failed = 0
        self._schedule_params: tuple[float, float] | None = None
        self.schedule = self._new_schedule()
        #: Where a notification goes: an ES9+ client on the working layer's link (replaceable).
        self.sink_for: SinkFactory = self._es9_client

    # ---- what the daemon tells us ----------------------------------------------------------

    @property
    def enabled(self) -> bool:
        """`[rsp] notifications` (on by default when CI roots are configured)."""
        return self.d.cfg.rsp.notifications_on

    def kick(self, modem: str | None = None) -> None:
        """New notifications may be on modem's eUICC (every modem's when None): look soon."""
        modems = [modem] if modem is not None else list(self.d.sessions)
        self._dirty.update(modems)
        self._uncounted.update(modems)
        self._wake.set()

    def session_updated(self, session: ModemSession) -> None:
        """A modem reported in: a changed profile list means an enable, disable, delete or
        install happened, and each leaves a notification."""
        if not session.online or not session.profiles:
            if session.switching or not session.online:
                self._wake.set()  # a modem coming back may free a blocked pass
            return
        seen = tuple((p.iccid, p.state) for p in session.profiles)
        if self._profiles_seen.get(session.id) != seen:
            self._profiles_seen[session.id] = seen
            self.kick(session.id)
        elif session.id in self._dirty:
            self._wake.set()  # maybe no longer blocked

    def link_changed(self) -> None:
        """The active layer or its health changed: a working link may have come up."""
        self._wake.set()

    # ---- status ----------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """`status`'s `notifications` object (docs/euicc.md)."""
        now = self._clock()
        modems: dict[str, Any] = {}
        total: int | None = 0
        for modem_id in self.d.sessions:
            known = self._pending.get(modem_id)
            if known is None:
                total = None
            elif total is not None:
                total += len(known)
            modems[modem_id] = {
                "pending": None if known is None else len(known),
                "operations": None
                if known is None
                else [n.profile_management_operation for n in known],
                "last_error": self._errors.get(modem_id),
            }
        next_at = self._next_retry(now)
        return {
            "enabled": self.enabled,
            "link_usable": self._usable,
            "pending": total,
            "next_retry_s": None if next_at is None else round(max(0.0, next_at - now), 1),
            "next_retry_at": None if next_at is None else _wall(next_at),
            "sent": self.sent,
            "failed": self.failed,
            "modems": modems,
        }

    def _next_retry(self, now: float) -> float | None:
        """When a notification still on a card is due again (None: none waits)."""
        times = []
        for modem_id, known in self._pending.items():
            if modem_id not in self.d.sessions:
                continue
            for n in known:
                if not n.notification_address:
                    continue
                for key in (n.notification_address, (n.notification_address, n.seq_number)):
                    t = self.schedule.waiting(key, now)
                    if t is not None:
                        times.append(t)
        return min(times, default=None)

    # ---- the loop --------------------------------------------------------------------------

    async def run(self) -> None:
        """Wait for a reason, then carry notifications; runs until cancelled."""
        self.kick()
        try:
            await self._loop()
        finally:
            await self.stop()

    async def _loop(self) -> None:
        while True:
            timeout = self._sleep_for()
            if timeout is None or timeout > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await self._wake.wait()
            self._wake.clear()
            self._refresh_schedule()
            if not self.enabled:
                continue
            usable = self._link_usable()
            if usable and not self._usable:
                log.info(
                    "notification_link_up", layer=self.d.policy.active if self.d.policy else None
                )
                self.schedule.link_up()
                self._dirty.update(m for m, known in self._pending.items() if known)
            self._usable = usable
            for session in list(self.d.sessions.values()):
                if session.id in self._reading or not self._free(session):
                    continue
                if usable and self._wants(session):
                    self._reading[session.id] = self._spawn(self._pass(session))
                elif session.id in self._uncounted:
                    self._reading[session.id] = self._spawn(self._count(session))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """A courier job: the loop never waits on the network or a card itself, so a slow
        SM-DP+ or modem holds back nothing else. Its end wakes the loop."""
        task = asyncio.create_task(coro)
        self._jobs.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self._jobs.discard(t)
            for modem in [k for k, v in self._reading.items() if v is t]:
                del self._reading[modem]
            for pair in [k for k, v in self._inflight.items() if v is t]:
                del self._inflight[pair]
            if not t.cancelled() and (exc := t.exception()) is not None:
                log.error("notification_job_failed", error=repr(exc), exc_info=exc)
            self._wake.set()

        task.add_done_callback(done)
        return task

    async def stop(self) -> None:
        """End every job (the supervisor cancels run; this ends what it started)."""
        for job in list(self._jobs):
            job.cancel()
        if self._jobs:
            await asyncio.wait(self._jobs, timeout=5)

    def _sleep_for(self) -> float | None:
        """Seconds until the next reason to look without being woken (None: only when woken).
        Never zero twice in a row for the same reason: every branch leads to a wait."""
        if not self.enabled:
            return None
        now = self._clock()
        candidates: list[float] = []
        if self._usable:
            next_at = self._next_retry(now)
            if next_at is not None:
                candidates.append(next_at - now)
        eu = [
            t
            for m in self.d.sessions
            if (t := self.schedule.waiting(("euicc", m), now)) is not None
        ]
        candidates.extend(t - now for t in eu)
        waiting = self._dirty if self._usable else self._uncounted
        sessions = self.d.sessions
        if any(
            m in sessions and sessions[m].eid is not None and not self._free(sessions[m])
            for m in waiting
        ):
            candidates.append(BLOCKED_RECHECK_S)
        return max(0.05, min(candidates)) if candidates else None

    def _link_usable(self) -> bool:
        """Whether a working layer carries traffic now."""
        return self._working_link() is not None

    def _free(self, session: ModemSession) -> bool:
        """Whether the courier may touch this modem's eUICC now: online, not switching, and no
        switch holding its layers (the same hold the actuator puts on)."""
        if session.id in self._reading:
            return False  # its own read is in flight
        if not session.online or session.switching or session.eid is None:
            return False  # eid None: no eUICC answered (a plain SIM), nothing to carry
        if session.lock.locked():
            return False  # a poll, a download or another eUICC operation: look again after
        if self.schedule.waiting(("euicc", session.id), self._clock()) is not None:
            return False
        d = self.d
        return not any(
            d.monitors[x.name].paused
            for x in d.cfg.layers
            if x.modem == session.id and x.name in d.monitors
        )

    def _wants(self, session: ModemSession) -> bool:
        """A pass is worth it: the card may hold something new, or a known one is due."""
        if session.id in self._dirty:
            return True
        now = self._clock()
        return any(
            n.notification_address
            and (session.id, n.notification_address) not in self._inflight
            and self.schedule.due(n.notification_address, now)
            and self.schedule.due((n.notification_address, n.seq_number), now)
            for n in self._pending.get(session.id, ())
        )

    # ---- one modem -------------------------------------------------------------------------

    async def _euicc(self, session: ModemSession, op: Callable[[Lpa], Any]) -> Any:
        """One eUICC step under the modem's lock, bounded; a failure backs the modem off."""
        try:
            async with asyncio.timeout(EUICC_TIMEOUT_S):
                result = await session.with_lpa(op)
        except (AgentError, TimeoutError) as exc:
            error = f"{type(exc).__name__}: {exc}"
            self._errors[session.id] = error
            delay = self.schedule.failed(("euicc", session.id), self._clock()) - self._clock()
            log.warning(
                "notification_euicc_unavailable",
                modem=session.id,
                error=error,
                retry_in_s=round(delay, 1),
            )
            return None
        self.schedule.accepted(("euicc", session.id))
        return result

    async def _count(self, session: ModemSession) -> None:
        """Without a working link: read what waits (for status), send nothing."""

        async def op(lpa: Lpa) -> list[NotificationMetadata]:
            return await lpa.list_notifications()

        known = await self._euicc(session, op)
        if known is not None:
            self._pending[session.id] = known
            self._uncounted.discard(session.id)

    async def _pass(self, session: ModemSession) -> None:
        """Read the pending notifications, send the due ones, remove the accepted ones."""
        self._dirty.discard(session.id)

        async def retrieve(lpa: Lpa) -> list[PendingNotification]:
            return await lpa.retrieve_notifications()

        items: list[PendingNotification] | None = await self._euicc(session, retrieve)
        if items is None:
            self._dirty.add(session.id)  # read again once the backoff ends
            return
        self._pending[session.id] = [i.metadata for i in items]
        self._uncounted.discard(session.id)
        if not items:
            return
        batches: dict[str | None, list[PendingNotification]] = {}
        for item in items:
            batches.setdefault(item.metadata.notification_address, []).append(item)
        # One SM-DP+ per batch, side by side: each removes what its server accepted as soon as
        # it is done, so a slow or dead SM-DP+ holds back nobody else's notifications.
        for address, batch in batches.items():
            key = (session.id, address or "")
            if key not in self._inflight:  # one in flight: its items are looked at again after
                self._inflight[key] = self._spawn(self._batch(session, batch))

    async def _batch(self, session: ModemSession, items: list[PendingNotification]) -> None:
        link = self._working_link()
        outcomes = await deliver(items, self.sink_for, schedule=self.schedule, now=self._clock())
        sent = [o for o in outcomes if o.sent]
        if sent:

            async def remove(lpa: Lpa) -> bool:
                await remove_sent(lpa, sent)
                return True  # None from _euicc means the step failed

            if await self._euicc(session, remove) is None:
                for o in sent:
                    o.error = "sent, but not removed from the eUICC (sent again later)"
        removed = {o.seq_number for o in outcomes if o.removed}
        if removed:
            self._pending[session.id] = [
                n for n in self._pending.get(session.id, []) if n.seq_number not in removed
            ]
        self._report(session, outcomes, link[0] if link else None)

    async def process_now(
        self, session: ModemSession, seq: int | None
    ) -> list[NotificationOutcome]:
        """`notification process` through the daemon: every pending notification (or only seq)
        now, whatever the backoff says; the accepted ones removed. Raises AgentError when the
        eUICC cannot be read."""
        if not self.d.cfg.rsp.ci_certs:
            raise AgentError("no [rsp] ci_certs configured: no SM-DP+ can be trusted")

        async def retrieve(lpa: Lpa) -> list[PendingNotification]:
            return await lpa.retrieve_notifications(seq)

        async with asyncio.timeout(EUICC_TIMEOUT_S):
            items = cast("list[PendingNotification]", await session.with_lpa(retrieve))
        outcomes = await deliver(items, lambda a: self._es9_client(a, require_link=False))
        sent = [o for o in outcomes if o.sent]
        if sent:

            async def remove(lpa: Lpa) -> None:
                await remove_sent(lpa, sent)

            async with asyncio.timeout(EUICC_TIMEOUT_S):
                await session.with_lpa(remove)
        for o in sent:
            if o.address:
                self.schedule.accepted(o.address)
                self.schedule.accepted((o.address, o.seq_number))
        link = self._working_link()
        self._report(session, outcomes, link[0] if link else None)
        self.kick(session.id)  # recount for status
        return outcomes

    def _report(
        self, session: ModemSession, outcomes: Sequence[NotificationOutcome], layer: str | None
    ) -> None:
        now = self._clock()
        for o in outcomes:
            data: dict[str, Any] = {
                "modem": session.id,
                "seq_number": o.seq_number,
                "operation": o.operation,
                "iccid": o.iccid,
                "address": o.address,
                "layer": layer,
            }
            if o.sent:
                self.sent += 1
                data["removed"] = o.removed
                if o.error:
                    data["error"] = o.error
                log.info("notification_sent", **data)
                self.d.publisher.event("notification_sent", data)
                continue
            self.failed += 1
            self._errors[session.id] = o.error or "not accepted"
            retry = None
            if o.address:
                retry = self.schedule.waiting(o.address, now) or self.schedule.waiting(
                    (o.address, o.seq_number), now
                )
            data["error"] = o.error
            data["next_retry_s"] = None if retry is None else round(retry - now, 1)
            log.warning("notification_failed", **data)
            self.d.publisher.event("notification_failed", data)
        if outcomes and all(o.removed for o in outcomes):
            self._errors.pop(session.id, None)

    # ---- configuration ---------------------------------------------------------------------

    def _new_schedule(self) -> RetrySchedule:
        rsp = self.d.cfg.rsp
        self._schedule_params = (rsp.notification_retry_initial, rsp.notification_retry_max)
        return RetrySchedule(
            initial=rsp.notification_retry_initial, maximum=rsp.notification_retry_max
        )

    def _refresh_schedule(self) -> None:
        """A reload that changed the backoff bounds starts a fresh schedule."""
        rsp = self.d.cfg.rsp
        if self._schedule_params != (rsp.notification_retry_initial, rsp.notification_retry_max):
            self.schedule = self._new_schedule()

    def _working_link(self) -> tuple[str, LinkBinding | None] | None:
        """The working layer and the binding its traffic leaves by (None: host routes): the
        same rule downloads follow (Provisioner.working_layer); None when there is none."""
        try:
            return self.d.provision.working_layer()
        except NoWorkingLink:
            return None

    def _es9_client(self, address: str, *, require_link: bool = True) -> NotificationSink:
        """An ES9+ client for address that leaves by the working layer's link (the bound
        connection downloads use), TLS checked against ci_certs. Without a working layer:
        an error, or (by hand, require_link False) the host's routes."""
        link = self._working_link()
        if link is None and require_link:
            raise Es9Error(address, "no working link")
        return self.d.provision.es9_client(address, link[1] if link is not None else None)
