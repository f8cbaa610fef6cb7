"""Sending pending notifications to their SM-DP+ (SGP.22 §3.5, ES9+ handleNotification).

A notification leaves the eUICC (NotificationSent) only after its SM-DP+ accepted it; one that
could not be delivered stays for the next attempt. That matters most for delete notifications:
the only record that a profile was removed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import msgspec
import structlog

from agent.errors import AgentError, ApduError, Es10Error, ParseError
from agent.euicc.lpa import Lpa

log = structlog.get_logger(__name__)


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
    lpa: Lpa, sink_for: Callable[[str], NotificationSink], seq: int | None = None
) -> list[NotificationOutcome]:
    """Send every pending notification (or only seq) to its address; remove the accepted ones."""
    pending = await lpa.retrieve_notifications(seq)
    out: list[NotificationOutcome] = []
    for item in pending:
        meta = item.metadata
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
            continue
        outcome.sent = True
        try:
            await lpa.remove_notification(meta.seq_number)
        except (Es10Error, ApduError, ParseError) as exc:
            outcome.error = f"sent, but not removed from the eUICC: {exc}"
            continue
        outcome.removed = True
        log.info("notification_delivered", seq=meta.seq_number, operation=outcome.operation)
    return out
