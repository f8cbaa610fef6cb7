"""Every recorded modem reply in the conformance file reads back as the file's `expect` says."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from agent.at.replies import interpret

SHARED = Path(__file__).resolve().parents[2] / "shared/conformance/at-replies.json"
LOCAL = Path(__file__).resolve().parent / "fixtures/at-replies.json"

# Keys that describe the recording rather than a value read from it.
PROSE = frozenset(
    {"note", "device", "source", "context", "expect_origin", "lac_tac_ci_encoding", "charset"}
)


def _fixture_path() -> Path | None:
    candidates = [SHARED]
    env = os.environ.get("ESIM_CONFORMANCE")
    if env:
        candidates.append(Path(env))
    candidates.append(LOCAL)
    return next((p for p in candidates if p.is_file()), None)


def _load(path: Path | None) -> list[dict[str, Any]]:
    if path is None:
        return []
    data = json.loads(path.read_text(encoding="utf-8"))
    assert isinstance(data, list)
    return data


FIXTURE = _fixture_path()
ENTRIES = _load(FIXTURE)


def _op_key(op: object) -> str:
    return json.dumps(op, sort_keys=True, ensure_ascii=False)


def _check(entry: dict[str, Any]) -> list[str]:
    got = interpret(entry["command"], entry["response"])
    problems: list[str] = []
    for key, want in entry["expect"].items():
        if key in PROSE:
            continue
        if key == "error":
            if not got.get("error"):
                problems.append(f"error expected ({want!r}), got {got!r}")
            continue
        if key not in got:
            problems.append(f"{key}: missing in {got!r}")
            continue
        have = got[key]
        if key == "operators":
            assert isinstance(have, list)
            if sorted(map(_op_key, have)) != sorted(map(_op_key, want)):
                problems.append(f"operators: want {want!r}, got {have!r}")
        elif have != want:
            problems.append(f"{key}: want {want!r}, got {have!r}")
    expect = entry["expect"]
    invalid = "error" in expect or False in (expect.get("ok"), expect.get("parse_ok"))
    if not invalid and got.get("error"):
        problems.append(f"unexpected error {got['error']!r}")
    return problems


@pytest.mark.skipif(FIXTURE is None, reason="conformance file absent")
@pytest.mark.parametrize("entry", ENTRIES, ids=[e["id"] for e in ENTRIES])
def test_reply_matches_expectation(entry: dict[str, Any]) -> None:
    assert _check(entry) == []


@pytest.mark.skipif(not LOCAL.is_file(), reason="local copy absent")
def test_local_copy_passes_too() -> None:
    entries = _load(LOCAL)
    assert len(entries) >= 78
    failures = {e["id"]: p for e in entries if (p := _check(e))}
    assert failures == {}


@pytest.mark.skipif(not (SHARED.is_file() and LOCAL.is_file()), reason="one copy absent")
def test_local_copy_is_in_sync_with_shared() -> None:
    assert _load(LOCAL) == _load(SHARED)


FIELD = Path(__file__).resolve().parent / "fixtures/at-replies-field.json"
FIELD_ENTRIES = _load(FIELD)


@pytest.mark.parametrize("entry", FIELD_ENTRIES, ids=[e["id"] for e in FIELD_ENTRIES])
def test_field_reply_matches_expectation(entry: dict[str, Any]) -> None:
    # Replies real modems send that this project once misread (issue 9); same checker as above.
    assert _check(entry) == []
