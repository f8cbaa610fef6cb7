"""The line reader: framing of modem bytes, robust to any input."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from agent.at.channel import classify_final, expected_prefixes, line_prefix
from agent.at.lines import MAX_LINE, LineReader


def test_splits_on_any_terminator_and_drops_blank_lines() -> None:
    reader = LineReader()
    assert reader.feed(b"\r\n+CSQ: 21,99\r\n\r\nOK\r\n") == ["+CSQ: 21,99", "OK"]
    assert reader.feed(b"AT\rRDY\n\n") == ["AT", "RDY"]


def test_holds_a_partial_line_until_its_terminator() -> None:
    reader = LineReader()
    assert reader.feed(b"+CEREG: 1,") == []
    assert reader.pending() == "+CEREG: 1,"
    assert reader.feed(b'"1F00"\r\n') == ['+CEREG: 1,"1F00"']


def test_strips_control_bytes_inside_a_line() -> None:
    assert LineReader().feed(b"\x00\x07O\x1bK\r\n") == ["OK"]


def test_a_line_without_end_is_bounded() -> None:
    reader = LineReader()
    reader.feed(b"x" * (MAX_LINE + 10))
    assert reader.overflows == 1
    assert reader.feed(b"\r\nOK\r\n") == ["OK"]


@given(st.lists(st.binary(max_size=64), max_size=20))
def test_any_chunking_gives_the_same_lines(chunks: list[bytes]) -> None:
    whole = b"".join(chunks) + b"\r\n"
    one = LineReader().feed(whole)
    reader = LineReader()
    many: list[str] = []
    for chunk in chunks:
        many += reader.feed(chunk)
    many += reader.feed(b"\r\n")
    assert many == one
    assert all(line and "\r" not in line and "\n" not in line for line in many)


def test_prefixes_and_finals() -> None:
    assert line_prefix("+CREG:0,1") == "+CREG"
    assert line_prefix("!ICCID: 8944") == "!ICCID"
    assert line_prefix("RDY") == "RDY"
    assert expected_prefixes("AT+CREG=2;+CREG?") == ("+CREG",)
    assert expected_prefixes('at+qeng="servingcell"') == ("+QENG",)
    assert expected_prefixes("ATI") == ()
    assert classify_final("OK") == "ok"
    assert classify_final("+CME ERROR: 10") == "cme"
    assert classify_final("+CMS ERROR: 500") == "cms"
    assert classify_final("NO CARRIER") == "error"
    assert classify_final("COMMAND NOT SUPPORT") == "error"
    assert classify_final("+CSQ: 1,2") is None
