"""Sending pending notifications to their SM-DP+ (SGP.22 §3.5, ES9+ handleNotification).

A notification leaves the eUICC (NotificationSent) only after its SM-DP+ accepted it; one that
could not be delivered stays for the next attempt. That matters most for delete notifications:
the only record that a profile was removed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol

import msgspec
import structlog

from agent.backoff import backoff_delay
from agent.errors import AgentError, ApduError, Es10Error, ParseError
from agent.euicc.es9 import Es9Refused
from agent.euicc.es10 import PendingNotification
from agent.euicc.lpa import Lpa

log = structlog.get_logger(__name__)

RETRY_INITIAL_S: Final = 30.0
RETRY_MAX_S: Final = 3600.0  # an SM-DP+ down for a day is still tried every hour


@dataclass
class RetrySchedule:
    """Backoff per key, pure: the caller passes the clock. A key is an SM-DP+ address (it is
    unreachable: all its notifications wait) or an (address, seq) pair (it refused that one
    notification). Kept in memory only: after a restart everything is simply due again."""

    initial: float = RETRY_INITIAL_S
    maximum: float = RETRY_MAX_S
    rand: Callable[[], float] | None = None
    _failures: dict[Hashable, int] = field(default_factory=dict)
    _next: dict[Hashable, float] = field(default_factory=dict)

    def due(self, key: Hashable, now: float) -> bool:
        """Whether key may be tried at now."""
        return self._next.get(key, float("-inf")) <= now

    def failed(self, key: Hashable, now: float) -> float:
        """Record a failed attempt; returns when the next one is due."""
        attempt = self._failures.get(key, 0)
        self._failures[key] = attempt + 1
        kwargs = {} if self.rand is None else {"rand": self.rand}
        self._next[key] = now + backoff_delay(attempt, self.initial, self.maximum, **kwargs)
        return self._next[key]

    def accepted(self, key: Hashable) -> None:
        """Forget key: it worked."""
        self._failures.pop(key, None)
        self._next.pop(key, None)

    def link_up(self) -> None:
        """A new good link: everything is due now (the SM-DP+ may have been unreachable only
        because we were). The failure counts stay, so a server that is really down keeps its
        long steps after its next failure."""
        self._next.clear()

    def next_due(self, now: float) -> float | None:
        """The earliest time after now that some key waits for, if any still waits."""
        return min((t for t in self._next.values() if t > now), default=None)

    def waiting(self, key: Hashable, now: float) -> float | None:
        """When key is due again, if it waits at now."""
        t = self._next.get(key)
        return t if t is not None and t > now else None

    def failures(self, key: Hashable) -> int:
        """Failed attempts of key since it last worked."""
        return self._failures.get(key, 0)


class NotificationSink(Protocol):
    """An SM-DP+ that takes notifications (agent.euicc.es9.Es9Client)."""

    async def handle_notification(self, pending_notification: bytes) -> None:
        """handleNotification; raises when the SM-DP+ did not accept it."""
        ...


class NotificationOutcome(msgspec.Struct, kw_only=True):
    """`notification process --json`: one entry per notification tried."""

    seq_number: int
    operation: str | None
    iccid: str | None
    address: str | None
    sent: bool
    removed: bool
    error: str | None = None


#: Bound on one handleNotification beyond the client's own deadlines (any sink, any transport).
DELIVERY_TIMEOUT_S: Final = 90.0


def outcome_of(item: PendingNotification) -> NotificationOutcome:
    """A not-yet-tried outcome for one pending notification."""
    meta = item.metadata
    return NotificationOutcome(
        seq_number=meta.seq_number,
        operation=meta.profile_management_operation,
        iccid=meta.iccid,
        address=meta.notification_address,
        sent=False,
        removed=False,
    )


async def deliver(
    pending: Sequence[PendingNotification],
    sink_for: Callable[[str], NotificationSink],
    *,
    schedule: RetrySchedule | None = None,
    now: float = 0.0,
    timeout: float = DELIVERY_TIMEOUT_S,
) -> list[NotificationOutcome]:
    """Send each notification to its SM-DP+; nothing is removed here (the caller removes the
    sent ones from the eUICC). With a schedule, what is not due at now is skipped; an SM-DP+ that
    cannot be reached backs off as a whole (its other notifications are not tried in this pass:
    their outcomes say "not tried")
    and one that refuses a notification backs off that notification only."""
    tried: list[NotificationOutcome] = []
    batches: dict[str, list[tuple[NotificationOutcome, PendingNotification]]] = {}
    for item in pending:
        outcome = outcome_of(item)
        address = outcome.address
        if not address:
            outcome.error = "no notification address"
            tried.append(outcome)
            continue
        if schedule is not None and (
            not schedule.due(address, now) or not schedule.due((address, outcome.seq_number), now)
        ):
            continue
        batches.setdefault(address, []).append((outcome, item))

    async def one_server(
        address: str, batch: list[tuple[NotificationOutcome, PendingNotification]]
    ) -> None:
        # In order within one SM-DP+; an unreachable one ends its batch (tried next time).
        unreachable: str | None = None
        for outcome, item in batch:
            seq = outcome.seq_number
            tried.append(outcome)
            if unreachable is not None:
                outcome.error = f"not tried: {unreachable}"
                continue
            try:
                async with asyncio.timeout(timeout):
                    await sink_for(address).handle_notification(bytes.fromhex(item.raw))
            except (AgentError, TimeoutError) as exc:
                outcome.error = str(exc) or f"no answer within {timeout:g} s"
                refused = isinstance(exc, Es9Refused)
                log.info(
                    "notification_not_accepted",
                    seq=seq,
                    address=address,
                    refused=refused,
                    error=outcome.error,
                )
                if schedule is not None:
                    schedule.failed((address, seq) if refused else address, now)
                if not refused:
                    unreachable = outcome.error
                continue
            outcome.sent = True
            if schedule is not None:
                schedule.accepted(address)
                schedule.accepted((address, seq))

    # Servers side by side: a slow or dead SM-DP+ never holds back the others.
    await asyncio.gather(*(one_server(a, b) for a, b in batches.items()))
    order = {item.metadata.seq_number: i for i, item in enumerate(pending)}
    return sorted(tried, key=lambda o: order.get(o.seq_number, 0))


async def remove_sent(lpa: Lpa, outcomes: Sequence[NotificationOutcome]) -> None:
    """NotificationSent for every outcome the SM-DP+ accepted; marks each removed or says why
    not (it is then sent again later: SM-DP+ servers take a repeated notification)."""
    for outcome in outcomes:
        if not outcome.sent:
            continue
        try:
            await lpa.remove_notification(outcome.seq_number)
        except (Es10Error, ApduError, ParseError) as exc:
            outcome.error = f"sent, but not removed from the eUICC: {exc}"
            continue
        outcome.removed = True
        log.info("notification_delivered", seq=outcome.seq_number, operation=outcome.operation)


async def process_notifications(
    lpa: Lpa,
    sink_for: Callable[[str], NotificationSink],
    seq: int | None = None,
    *,
    schedule: RetrySchedule | None = None,
    now: float = 0.0,
) -> list[NotificationOutcome]:
    """Send every pending notification (or only seq) to its address; remove the accepted ones.
    With a schedule, notifications not due at now are skipped and failures back off."""
    pending = await lpa.retrieve_notifications(seq)
    out = await deliver(pending, sink_for, schedule=schedule, now=now)
    await remove_sent(lpa, out)
    return out
