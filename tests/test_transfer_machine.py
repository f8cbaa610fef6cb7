"""The transfer machine (agent/euicc/transfer.py): the source's profile is touched only after the
target verified, whatever the answers, failures and crashes in between."""

from __future__ import annotations

from collections.abc import Sequence

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.euicc.transfer import (
    Action,
    AskTarget,
    Begin,
    DeleteSource,
    DisableSource,
    Emit,
    Event,
    NotifySource,
    Resume,
    SourceDone,
    SourceFailed,
    Step,
    TargetAnswer,
    TargetSilent,
    Transfer,
    may_touch_source,
    transition,
)

SOURCE_ACTIONS = (DisableSource, DeleteSource, NotifySource)
ORDER = [Step.ASKING, Step.TARGET_VERIFIED, Step.SOURCE_DISABLED, Step.SOURCE_DELETED, Step.DONE]


def fresh(deadline: float = 1000.0) -> Transfer:
    return Transfer(
        id="t1",
        from_iccid="8944476500001224158",
        modem="m0",
        to="van",
        code="LPA:1$smdp.test$X",
        started_at=0.0,
        deadline_at=deadline,
    )


def names(actions: Sequence[Action]) -> list[str]:
    return [a.name for a in actions if isinstance(a, Emit)]


def effects(actions: Sequence[Action]) -> list[Action]:
    return [a for a in actions if not isinstance(a, Emit)]


def test_the_whole_way_in_order() -> None:
    t, a = transition(fresh(), Begin(now=0))
    assert names(a) == ["transfer_started"]
    assert effects(a) == [AskTarget()]
    t, a = transition(t, TargetAnswer(state="in_progress", now=1))
    assert effects(a) == [AskTarget()]
    assert t.step is Step.ASKING
    t, a = transition(t, TargetAnswer(state="installed", iccid="8988", now=2))
    assert names(a) == ["transfer_target_installed"]
    assert effects(a) == [AskTarget()]
    t, a = transition(t, TargetAnswer(state="installed", iccid="8988", now=3))
    assert names(a) == [], "installed is announced once"
    t, a = transition(t, TargetAnswer(state="verified", iccid="8988", now=4))
    assert names(a) == ["transfer_target_verified"]
    assert effects(a) == [DisableSource()]
    assert t.step is Step.TARGET_VERIFIED
    assert t.target_iccid == "8988"
    t, a = transition(t, SourceDone(what="disabled", now=5))
    assert names(a) == ["transfer_source_disabled"]
    assert effects(a) == [DeleteSource()]
    t, a = transition(t, SourceDone(what="deleted", now=6))
    assert names(a) == ["transfer_source_deleted"]
    assert effects(a) == [NotifySource()]
    t, a = transition(t, SourceDone(what="notified", now=7, sent=True))
    assert names(a) == ["transfer_done"]
    assert effects(a) == []
    assert t.step is Step.DONE
    assert t.notification == "sent"
    assert transition(t, Resume(now=8)) == (t, [])


def test_a_failing_target_ends_it_with_the_source_untouched() -> None:
    t, _ = transition(fresh(), Begin(now=0))
    t, a = transition(t, TargetAnswer(state="failed", error="wrong confirmation code", now=1))
    assert t.step is Step.FAILED
    assert not may_touch_source(t)
    assert names(a) == ["transfer_failed"]
    failed = next(x for x in a if isinstance(x, Emit))
    assert failed.data["source_untouched"] is True
    assert "wrong confirmation code" in str(failed.data["error"])
    # A verified answer arriving after the failure (a stale retry) changes nothing.
    assert transition(t, TargetAnswer(state="verified", now=2)) == (t, [])


def test_silence_asks_again_with_backoff_until_the_deadline() -> None:
    t, _ = transition(fresh(deadline=100), Begin(now=0))
    t, a = transition(t, TargetSilent(now=10))
    ask = effects(a)[0]
    assert isinstance(ask, AskTarget)
    assert ask.delay_s > 0
    t, a = transition(t, TargetSilent(now=100))
    assert t.step is Step.FAILED
    assert names(a) == ["transfer_failed"]


def test_resume_does_what_the_step_needs() -> None:
    base = fresh()
    cases = {
        Step.ASKING: [AskTarget()],
        Step.TARGET_VERIFIED: [DisableSource()],
        Step.SOURCE_DISABLED: [DeleteSource()],
        Step.SOURCE_DELETED: [NotifySource()],
    }
    for step, expected in cases.items():
        t = Transfer(**{**base.public(), "code": base.code, "step": step})  # type: ignore[arg-type]
        _t2, a = transition(t, Resume(now=1))
        assert names(a)[0] == "transfer_resumed"
        assert effects(a) == expected, step


def test_resume_after_the_deadline_before_verified_gives_up_without_touching_the_source() -> None:
    t, a = transition(fresh(deadline=10), Resume(now=11))
    assert t.step is Step.FAILED
    assert not any(isinstance(x, SOURCE_ACTIONS) for x in a)


def test_a_failed_source_step_is_retried_not_abandoned() -> None:
    t, _ = transition(fresh(), Begin(now=0))
    t, _ = transition(t, TargetAnswer(state="verified", now=1))
    t, a = transition(t, SourceFailed(what="disabled", error="modem offline", now=2))
    assert t.step is Step.TARGET_VERIFIED
    assert names(a) == ["transfer_source_retry"]
    (retry,) = effects(a)
    assert isinstance(retry, DisableSource)
    assert retry.delay_s > 0


# ------------------------------------------------------------------ any crash, any answer

ANSWERS = ["in_progress", "installed", "verified", "failed", "silent"]


@settings(max_examples=400)
@given(st.data())
def test_no_crash_point_or_answer_order_touches_the_source_before_the_target_verified(
    data: st.DataObject,
) -> None:
    journal = fresh(deadline=data.draw(st.floats(10, 500)))
    record, actions = transition(journal, Begin(now=0.0))
    journal = record  # persisted before its actions run
    now = 0.0
    verified_fed = False
    failed_before_verified = False
    source_actions = 0
    for _ in range(80):
        for action in actions:
            if isinstance(action, SOURCE_ACTIONS):
                source_actions += 1
                assert verified_fed, "the source was touched before the target verified"
                assert may_touch_source(record)
        pending = effects(actions)
        if record.finished or not pending:
            break
        now += data.draw(st.floats(0, 30))
        event: Event
        if data.draw(st.integers(0, 9)) == 0:
            # SIGKILL: whatever was in flight is lost; the restart reads the journal.
            record, event = journal, Resume(now=now)
        elif isinstance(pending[0], AskTarget):
            answer = data.draw(st.sampled_from(ANSWERS))
            if answer == "silent":
                event = TargetSilent(now=now)
            else:
                event = TargetAnswer(state=answer, now=now, iccid="8988")
                verified_fed = verified_fed or answer == "verified"
                if answer == "failed" and not verified_fed:
                    failed_before_verified = True
        else:
            first = pending[0]
            name = (
                "disabled"
                if isinstance(first, DisableSource)
                else "deleted"
                if isinstance(first, DeleteSource)
                else "notified"
            )
            if data.draw(st.booleans()):
                event = SourceDone(what=name, now=now, sent=data.draw(st.booleans()))
            else:
                event = SourceFailed(what=name, now=now, error="eUICC busy")
        before = ORDER.index(record.step) if record.step in ORDER else len(ORDER)
        record, actions = transition(record, event)
        after = ORDER.index(record.step) if record.step in ORDER else len(ORDER)
        assert after >= before or record.step is Step.FAILED, "steps never go back"
        journal = record
    if failed_before_verified:
        assert record.step is Step.FAILED
        assert source_actions == 0
    if record.step is Step.FAILED:
        assert source_actions == 0
    if record.step is Step.DONE:
        assert verified_fed
        assert record.notification in ("sent", "pending")
