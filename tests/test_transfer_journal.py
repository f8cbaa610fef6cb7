"""The transfer journal (agent/daemon/transfer.py): atomic files only we can read, codes dropped
once a transfer ends, a corrupt file skipped rather than fatal, finished records pruned."""

from __future__ import annotations

import stat
from pathlib import Path

import msgspec
import pytest
from structlog.testing import capture_logs

from agent.daemon.transfer import KEEP_FINISHED, Incoming, Journal
from agent.euicc.transfer import Step, Transfer


def record(n: int = 1, step: Step = Step.ASKING) -> Transfer:
    return Transfer(
        id=f"{n:016x}",
        from_iccid="8944476500001224158",
        modem="m0",
        to="van",
        code="LPA:1$smdp.example.com$SECRET",
        confirmation_code="2468",
        step=step,
        started_at=float(n),
        deadline_at=float(n) + 1800,
    )


def test_an_unfinished_record_keeps_its_codes_in_a_file_only_we_can_read(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "transfers")
    journal.save(record())
    (path,) = (tmp_path / "transfers").iterdir()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "transfers").stat().st_mode) == 0o700
    (back,) = journal.outgoing()
    assert back == record(), "a resumed transfer can ask the target again"


def test_a_finished_record_drops_the_codes(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.save(record(step=Step.DONE))
    (back,) = journal.outgoing()
    assert back.code == ""
    assert back.confirmation_code is None
    assert "SECRET" not in (tmp_path / f"out-{back.id}.json").read_text()
    assert "code" not in back.public()


def test_rewrites_replace_the_file_whole(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.save(record())
    journal.save(msgspec.structs.replace(record(), step=Step.TARGET_VERIFIED))
    assert [t.step for t in journal.outgoing()] == [Step.TARGET_VERIFIED]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"out-{record().id}.json"]


def test_a_corrupt_record_is_skipped_and_logged(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.save(record(1))
    (tmp_path / "out-garbage.json").write_bytes(b'{"id": "x", "step": ')
    with capture_logs() as logs:
        found = journal.outgoing()
    assert [t.id for t in found] == [record(1).id]
    assert [e["event"] for e in logs] == ["transfer_journal_unreadable"]


def test_finished_records_are_pruned_to_the_newest(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.save(record(999))  # unfinished: never pruned
    for n in range(KEEP_FINISHED + 5):
        journal.save(record(n, Step.FAILED))
    kept = journal.outgoing()
    assert len([t for t in kept if t.finished]) == KEEP_FINISHED
    assert any(t.id == record(999).id for t in kept)


@pytest.mark.parametrize("garbage", [b"", b"[]", b'{"id": 1}'])
def test_target_records_read_back_or_count_as_none(tmp_path: Path, garbage: bytes) -> None:
    journal = Journal(tmp_path)
    journal.save_in(Incoming(id="abcdef0123456789", modem="m0", step="installed", iccid="8988"))
    back = journal.load_in("abcdef0123456789")
    assert back is not None
    assert (back.step, back.iccid) == ("installed", "8988")
    (tmp_path / "in-0000000000000000.json").write_bytes(garbage)
    assert journal.load_in("0000000000000000") is None
    assert journal.load_in("1111111111111111") is None
