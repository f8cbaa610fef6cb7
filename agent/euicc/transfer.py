"""Moving a profile to another device, as a pure machine: `transition(record, event)`.

SGP.22 has no transfer: the operator issues a new activation code for the target device. What
makes the move safe is the order: the target downloads, enables and verifies the new profile
(registered, data path up) before the source disables and deletes its copy. The record is what
the daemon journals after every transition, so a restart resumes from the step reached; the
source's profile is touched only once a target answered "verified", never before.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final

import msgspec

#: The target is asked again after a silent or "in progress" answer; silence backs off to this.
ASK_RETRY_MAX_S: Final = 60.0
#: A source step that failed after the target verified is retried (never abandoned) up to this.
SOURCE_RETRY_MAX_S: Final = 300.0


class Step(StrEnum):
    """How far a transfer got; the journal stores it after every transition."""

    ASKING = "asking"  # the target is asked (maybe more than once); the source is untouched
    TARGET_VERIFIED = "target_verified"  # the target runs the new profile, verified
    SOURCE_DISABLED = "source_disabled"  # the source's copy is disabled
    SOURCE_DELETED = "source_deleted"  # the source's copy is deleted (its notification queued)
    DONE = "done"
    FAILED = "failed"  # ended before the target verified: the source is untouched


TERMINAL: Final = frozenset({Step.DONE, Step.FAILED})
#: Steps at which the source's profile may be (or has been) changed.
SOURCE_STEPS: Final = frozenset(
    {Step.TARGET_VERIFIED, Step.SOURCE_DISABLED, Step.SOURCE_DELETED, Step.DONE}
)


class Transfer(msgspec.Struct, frozen=True, kw_only=True):
    """One transfer as journaled on the source. Times are wall-clock seconds (they survive a
    restart); `code` and `confirmation_code` are kept so a resumed transfer can ask again."""

    id: str
    from_iccid: str
    modem: str
    to: str
    code: str
    confirmation_code: str | None = None
    step: Step = Step.ASKING
    started_at: float
    deadline_at: float
    target_iccid: str | None = None
    target_installed: bool = False
    asks: int = 0
    source_failures: int = 0
    notification: str | None = None  # "sent" | "pending" once the source's side ended
    error: str | None = None

    @property
    def finished(self) -> bool:
        """DONE or FAILED."""
        return self.step in TERMINAL

    def public(self) -> dict[str, object]:
        """The record without the codes (for answers, events and `status`)."""
        out: dict[str, object] = msgspec.to_builtins(self)
        out.pop("code", None)
        out.pop("confirmation_code", None)
        return out


# ---------------------------------------------------------------------------------- events


class Begin(msgspec.Struct, frozen=True, kw_only=True):
    """A new transfer was journaled."""

    now: float


class Resume(msgspec.Struct, frozen=True, kw_only=True):
    """The daemon restarted and found the record unfinished."""

    now: float


class TargetAnswer(msgspec.Struct, frozen=True, kw_only=True):
    """The target's answer: in_progress, installed (not verified yet), verified or failed."""

    state: str
    now: float
    iccid: str | None = None
    error: str | None = None


class TargetSilent(msgspec.Struct, frozen=True, kw_only=True):
    """No answer in time (broker down, target offline or busy): not a failure by itself."""

    now: float
    error: str = "no answer"


class SourceDone(msgspec.Struct, frozen=True, kw_only=True):
    """A source step finished: disabled, deleted, or notified (sent says whether the SM-DP+
    took the notification or it stays pending on the card)."""

    what: str
    now: float
    sent: bool = False


class SourceFailed(msgspec.Struct, frozen=True, kw_only=True):
    """A source step failed (modem offline, eUICC error)."""

    what: str
    now: float
    error: str


Event = Begin | Resume | TargetAnswer | TargetSilent | SourceDone | SourceFailed


# --------------------------------------------------------------------------------- actions


class Emit(msgspec.Struct, frozen=True, kw_only=True):
    """An event for MQTT and the log, by its stable name."""

    name: str
    data: dict[str, object] = msgspec.field(default_factory=dict)


class AskTarget(msgspec.Struct, frozen=True, kw_only=True):
    """Ask the target (again) to install and verify; after delay_s."""

    delay_s: float = 0.0


class DisableSource(msgspec.Struct, frozen=True, kw_only=True):
    """Disable the source's copy (done when it is already disabled or gone)."""

    delay_s: float = 0.0


class DeleteSource(msgspec.Struct, frozen=True, kw_only=True):
    """Delete the source's copy (done when it is already gone)."""

    delay_s: float = 0.0


class NotifySource(msgspec.Struct, frozen=True, kw_only=True):
    """Send the source's pending notifications for the old profile (delete above all)."""

    delay_s: float = 0.0


Action = Emit | AskTarget | DisableSource | DeleteSource | NotifySource
Effect = AskTarget | DisableSource | DeleteSource | NotifySource

_SOURCE_ACTION: Final[dict[Step, type[Effect]]] = {
    Step.TARGET_VERIFIED: DisableSource,
    Step.SOURCE_DISABLED: DeleteSource,
    Step.SOURCE_DELETED: NotifySource,
}
_NEXT: Final = {
    ("disabled", Step.TARGET_VERIFIED): Step.SOURCE_DISABLED,
    ("deleted", Step.SOURCE_DISABLED): Step.SOURCE_DELETED,
    ("notified", Step.SOURCE_DELETED): Step.DONE,
}
_EMITTED: Final = {
    Step.SOURCE_DISABLED: "transfer_source_disabled",
    Step.SOURCE_DELETED: "transfer_source_deleted",
}


def _backoff(n: int, cap: float) -> float:
    return float(min(cap, 2 ** min(n, 16)))


def _names(t: Transfer) -> dict[str, object]:
    return {"id": t.id, "from_iccid": t.from_iccid, "modem": t.modem, "to": t.to}


def _fail(t: Transfer, error: str) -> tuple[Transfer, list[Action]]:
    t = msgspec.structs.replace(t, step=Step.FAILED, error=error)
    data = {**_names(t), "error": error, "source_untouched": True}
    return t, [Emit(name="transfer_failed", data=data)]


def _source_action(t: Transfer, delay: float = 0.0) -> list[Action]:
    kind = _SOURCE_ACTION.get(t.step)
    return [] if kind is None else [kind(delay_s=delay)]


def transition(t: Transfer, event: Event) -> tuple[Transfer, list[Action]]:
    """The next record and what to do; pure (no clock, no I/O). At most one effect per call."""
    if t.finished:
        return t, []
    if isinstance(event, Begin | Resume):
        out: list[Action] = []
        if isinstance(event, Resume):
            out.append(Emit(name="transfer_resumed", data={**_names(t), "step": t.step.value}))
        else:
            out.append(Emit(name="transfer_started", data=_names(t)))
        if t.step is Step.ASKING:
            if event.now >= t.deadline_at:
                t, fail = _fail(t, "the target did not verify the profile before the deadline")
                return t, out + fail
            return msgspec.structs.replace(t, asks=t.asks + 1), [*out, AskTarget()]
        return t, out + _source_action(t)
    if isinstance(event, TargetAnswer | TargetSilent):
        if t.step is not Step.ASKING:
            return t, []  # a late or repeated answer changes nothing once the target verified
        if isinstance(event, TargetAnswer) and event.state == "verified":
            t = msgspec.structs.replace(
                t, step=Step.TARGET_VERIFIED, target_iccid=event.iccid or t.target_iccid
            )
            data = {**_names(t), "target_iccid": t.target_iccid}
            return t, [Emit(name="transfer_target_verified", data=data), DisableSource()]
        if isinstance(event, TargetAnswer) and event.state == "failed":
            return _fail(t, f"the target failed: {event.error or 'no reason given'}")
        out = []
        if isinstance(event, TargetAnswer) and event.state == "installed":
            if not t.target_installed:
                data = {**_names(t), "target_iccid": event.iccid}
                out.append(Emit(name="transfer_target_installed", data=data))
            t = msgspec.structs.replace(
                t, target_installed=True, target_iccid=event.iccid or t.target_iccid
            )
        if event.now >= t.deadline_at:
            t, fail = _fail(t, "the target did not verify the profile before the deadline")
            return t, out + fail
        delay = 0.0 if isinstance(event, TargetAnswer) else _backoff(t.asks, ASK_RETRY_MAX_S)
        t = msgspec.structs.replace(t, asks=t.asks + 1)
        return t, [*out, AskTarget(delay_s=delay)]
    if isinstance(event, SourceDone):
        nxt = _NEXT.get((event.what, t.step))
        if nxt is None:
            return t, []  # an answer for a step already passed
        t = msgspec.structs.replace(t, step=nxt, source_failures=0)
        if nxt is Step.DONE:
            t = msgspec.structs.replace(t, notification="sent" if event.sent else "pending")
            data = {**_names(t), "target_iccid": t.target_iccid, "notification": t.notification}
            return t, [Emit(name="transfer_done", data=data)]
        return t, [Emit(name=_EMITTED[nxt], data=_names(t)), *_source_action(t)]
    # SourceFailed: the target already runs the new profile, so the source's side is finished
    # later rather than abandoned (a restart resumes it too).
    if t.step not in _SOURCE_ACTION:
        return t, []
    n = t.source_failures + 1
    t = msgspec.structs.replace(t, source_failures=n, error=event.error)
    delay = _backoff(n, SOURCE_RETRY_MAX_S)
    data = {**_names(t), "step": event.what, "error": event.error, "retry_in_s": delay}
    return t, [Emit(name="transfer_source_retry", data=data), *_source_action(t, delay)]


def may_touch_source(t: Transfer) -> bool:
    """Whether the source's profile may be changed at this record (the target verified)."""
    return t.step in SOURCE_STEPS
