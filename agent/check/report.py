"""The check's result: items with pass/fail/skip and how to fix a failure; a stable JSON shape."""

from __future__ import annotations

from typing import Literal

import msgspec

Status = Literal["pass", "fail", "skip"]


class CheckItem(msgspec.Struct, kw_only=True):
    """One line of the checklist."""

    id: str
    title: str
    status: Status
    detail: str
    fix: str | None = None


class CheckSummary(msgspec.Struct, kw_only=True):
    """How many items passed, failed and were skipped."""

    passed: int = msgspec.field(name="pass", default=0)
    failed: int = msgspec.field(name="fail", default=0)
    skipped: int = msgspec.field(name="skip", default=0)


class CheckReport(msgspec.Struct, kw_only=True):
    """`esim-agent check --json`."""

    ok: bool
    config: str
    via: Literal["daemon", "direct"] | None
    items: list[CheckItem]
    summary: CheckSummary


def make_report(
    config: str, via: Literal["daemon", "direct"] | None, items: list[CheckItem]
) -> CheckReport:
    """A report whose ok and summary follow from the items."""
    summary = CheckSummary(
        passed=sum(i.status == "pass" for i in items),
        failed=sum(i.status == "fail" for i in items),
        skipped=sum(i.status == "skip" for i in items),
    )
    return CheckReport(ok=summary.failed == 0, config=config, via=via, items=items, summary=summary)
