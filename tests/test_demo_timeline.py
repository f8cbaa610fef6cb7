"""The demo's closing timeline table: columns line up whatever the transition ids look like."""

from __future__ import annotations

import pytest

from agent.demo.run import _timeline


def row(id_: str, kind: str, to: str | None) -> dict[str, object]:
    return {
        "id": id_,
        "kind": kind,
        "from_layer": None,
        "to_layer": to,
        "outcome": "switched",
        "timings_ms": {
            "detect_to_decide": 0.0,
            "decide_to_switch": 1023.4,
            "switch_to_verify": None,
            "total": 1026.0,
        },
    }


def test_columns_line_up_with_long_transition_ids(capsys: pytest.CaptureFixture[str]) -> None:
    _timeline([row("demo-mxbhre8n-1", "initial", "primary"), row("t-2", "failback", None)])
    lines = capsys.readouterr().out.splitlines()
    header, first, second = lines[-3:]
    col = header.index("kind")
    assert first[col:].startswith("initial")
    assert second[col:].startswith("failback")
    total = header.index("total") + len("total")
    assert first[:total].endswith("1026")
    assert second[:total].endswith("1026")
    assert "-" in second.split()  # a missing layer or time shows as "-"
