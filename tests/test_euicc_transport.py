"""Pure parts of the AT APDU transport: the reply dialects real modems speak."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.errors import ParseError
from agent.euicc.transport import (
    cgla_command,
    channel_for_session,
    csim_command,
    parse_apdu_reply,
    parse_session_id,
)


@pytest.mark.parametrize(
    ("lines", "session"),
    [
        (["+CCHO: 1"], "1"),
        (["+CCHO:2"], "2"),
        (["+CCHO: 00000000038aa32f"], "00000000038aa32f"),  # Sierra MC7455
        (["1"], "1"),  # Fibocom FM350-GL: a bare line
        (['+CCHO: "3"'], "3"),
    ],
)
def test_session_id_forms(lines: list[str], session: str) -> None:
    assert parse_session_id(lines) == session


def test_session_id_missing_is_a_parse_error() -> None:
    with pytest.raises(ParseError):
        parse_session_id([])
    with pytest.raises(ParseError):
        parse_session_id(["+CCHO: "])


@pytest.mark.parametrize(
    "line",
    ['+CGLA: 4,"611A"', '+CGLA:4,"611a"', "+CGLA: 4,611A", '+CGLA: 6,"611A"', '4,"611A"'],
)
def test_cgla_reply_forms(line: str) -> None:
    assert parse_apdu_reply([line], "+CGLA") == bytes.fromhex("611A")


@pytest.mark.parametrize("line", ['+CGLA: 3,"61A"', '+CGLA: 4,"XYZW"', '+CGLA: 2,"90"'])
def test_bad_cgla_payload_is_a_parse_error(line: str) -> None:
    with pytest.raises(ParseError):
        parse_apdu_reply([line], "+CGLA")


def test_commands_are_upper_case_and_count_hex_characters() -> None:
    assert cgla_command("00000000038aa32f", bytes.fromhex("80e2910006bf3e035c015a")) == (
        'AT+CGLA=00000000038aa32f,22,"80E2910006BF3E035C015A"'
    )
    assert csim_command(bytes.fromhex("0070000001")) == 'AT+CSIM=10,"0070000001"'


def test_channel_for_session() -> None:
    assert channel_for_session("2") == 2
    assert channel_for_session("00000000038aa32f") == 0
    assert channel_for_session("4000") == 0


@settings(deadline=None)
@given(st.lists(st.text(max_size=40), max_size=3), st.sampled_from(["+CGLA", "+CSIM"]))
def test_random_replies_raise_only_parse_errors(lines: list[str], prefix: str) -> None:
    with contextlib.suppress(ParseError):
        parse_apdu_reply(lines, prefix)
    with contextlib.suppress(ParseError):
        parse_session_id(lines)
