"""Data-connection replies (CGDCONT?, CGACT?, CGCONTRDP, CGPADDR, +CGEV) read as the fixture says."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.at import parsers
from agent.errors import ParseError
from tests.test_conformance import _check

FIXTURE = Path(__file__).resolve().parent / "fixtures/at-replies-datapath.json"
ENTRIES: list[dict[str, Any]] = json.loads(FIXTURE.read_text(encoding="utf-8"))


@pytest.mark.parametrize("entry", ENTRIES, ids=[e["id"] for e in ENTRIES])
def test_datapath_reply_matches_expectation(entry: dict[str, Any]) -> None:
    assert _check(entry) == []


def test_fixture_covers_every_data_command() -> None:
    commands = {e["command"].split("=")[0].rstrip("?") for e in ENTRIES}
    assert {"AT+CGDCONT", "AT+CGACT", "AT+CGCONTRDP", "AT+CGPADDR", "URC +CGEV"} <= commands
    assert sum("error" in e["expect"] for e in ENTRIES) >= 5


def test_cgev_event_properties() -> None:
    lost = parsers.parse_cgev("\r\n+CGEV: NW PDN DEACT 1\r\n")
    assert (lost.name, lost.cid, lost.context_lost, lost.context_up) == (
        "nw_pdn_deact",
        1,
        True,
        False,
    )
    assert parsers.parse_cgev("+CGEV: ME PDN ACT 3").context_up


FIELD = st.one_of(
    st.integers(min_value=0, max_value=300).map(str),
    st.sampled_from(['"IP"', "IPV4V6", '"10.0.0.1"', "", '"internet"', "255.255.255.0", "x"]),
    st.text(alphabet='0123456789.:/ ,"ABCDEFabcdef', max_size=40),
)
LINE = st.builds(
    lambda head, fields: head + ",".join(fields),
    st.sampled_from(
        [
            "+CGEV: ",
            "+CGEV: NW PDN DEACT ",
            "+CGEV: NW DEACT ",
            "+CGEV: ME ",
            "+CGCONTRDP: ",
            "+CGCONTRDP: 1,5,",
            "+CGPADDR: ",
            "+CGACT: ",
            "+CGDCONT: ",
        ]
    ),
    st.lists(FIELD, max_size=8),
)


@settings(max_examples=300, deadline=None)
@given(text=LINE)
def test_data_parsers_fail_only_with_parse_error(text: str) -> None:
    for parse in (
        parsers.parse_cgev,
        parsers.parse_cgcontrdp,
        parsers.parse_cgpaddr,
        parsers.parse_cgact_read,
        parsers.parse_cgdcont_read,
    ):
        with contextlib.suppress(ParseError):
            parse(text)
