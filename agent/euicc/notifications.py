"""Sending pending notifications to their SM-DP+ (SGP.22 §3.5, ES9+ handleNotification).

A notification leaves the eUICC (NotificationSent) only after its SM-DP+ accepted it; one that
could not be delivered stays for the next attempt. That matters most for delete notifications:
the only record that a profile was removed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, Protocol

import msgspec
import structlog

from agent.backoff import backoff_delay
from agent.errors import AgentError, ApduError, Es10Error, ParseError
from agent.euicc.lpa import Lpa

log = structlog.get_logger(__name__)

RETRY_INITIAL_S: Final = 30.0
RETRY_MAX_S: Final = 3600.0  # an SM-DP+ down for a day is still tried every hour


@dataclass
class RetrySchedule:
    """Per-notification backoff, pure: the caller passes the clock. Keyed by sequence number, so
    it survives nothing on its own — after a restart every notification is simply due again."""

    initial: float = RETRY_INITIAL_S
    maximum: float = RETRY_MAX_S
    rand: Callable[[], float] | None = None
    _failures: dict[int, int] = field(default_factory=dict)
    _next: dict[int, float] = field(default_factory=dict)

    def due(self, seq: int, now: float) -> bool:
        """Whether seq may be tried at now."""
        return self._next.get(seq, float("-inf")) <= now

    def failed(self, seq: int, now: float) -> float:
        """Record a failed attempt; returns when the next one is due."""
        attempt = self._failures.get(seq, 0)
        self._failures[seq] = attempt + 1
        kwargs = {} if self.rand is None else {"rand": self.rand}
        self._next[seq] = now + backoff_delay(attempt, self.initial, self.maximum, **kwargs)
        return self._next[seq]

    def accepted(self, seq: int) -> None:
        """Forget seq: it left the card."""
        self._failures.pop(seq, None)
        self._next.pop(seq, None)

    def link_up(self) -> None:
        """A new good link: everything is due now (the SM-DP+ may have been unreachable only
        because we were)."""
        self._next.clear()


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
    out: list[NotificationOutcome] = []
    for item in pending:
        meta = item.metadata
        if schedule is not None and not schedule.due(meta.seq_number, now):
            continue
        outcome = NotificationOutcome(
            seq_number=meta.seq_number,
            operation=meta.profile_management_operation,
            iccid=meta.iccid,
            address=meta.notification_address,
            sent=False,
            removed=False,
        )
        out.append(outcome)
        if not meta.notification_address:
            outcome.error = "no notification address"
            continue
        try:
            await sink_for(meta.notification_address).handle_notification(bytes.fromhex(item.raw))
        except AgentError as exc:
            outcome.error = str(exc)
            log.info("notification_not_accepted", seq=meta.seq_number, error=str(exc))
            if schedule is not None:
                schedule.failed(meta.seq_number, now)
            continue
        outcome.sent = True
        if schedule is not None:
            schedule.accepted(meta.seq_number)
        try:
            await lpa.remove_notification(meta.seq_number)
        except (Es10Error, ApduError, ParseError) as exc:
            outcome.error = f"sent, but not removed from the eUICC: {exc}"
            continue
        outcome.removed = True
        log.info("notification_delivered", seq=meta.seq_number, operation=outcome.operation)
    return out
