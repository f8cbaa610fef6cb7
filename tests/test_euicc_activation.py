"""Activation codes as users paste them (SGP.22 §4.1)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.euicc.activation import ActivationCode, ActivationCodeError, parse_activation_code


@pytest.mark.parametrize(
    ("text", "address", "matching_id", "oid", "required"),
    [
        ("LPA:1$smdp.example.com$MATCHING-ID", "smdp.example.com", "MATCHING-ID", None, False),
        ("1$smdp.example.com$ABC", "smdp.example.com", "ABC", None, False),
        ("lpa:1$SMDP.Example.COM$ABC-123", "smdp.example.com", "ABC-123", None, False),
        ("  LPA:1$smdp.example.com$AB CD\n-12 ", "smdp.example.com", "ABCD-12", None, False),
        (
            "LPA:1$smdp.example.com$$1.3.6.1.4.1.31746",
            "smdp.example.com",
            "",
            "1.3.6.1.4.1.31746",
            False,
        ),
        ("LPA:1$smdp.example.com$X$1.2.3$1", "smdp.example.com", "X", "1.2.3", True),
        ("LPA:1$smdp.example.com$X$$1", "smdp.example.com", "X", None, True),
        ("LPA:1$smdp.example.com$X$$", "smdp.example.com", "X", None, False),
        ("LPA:1$127.0.0.1:8443$X", "127.0.0.1:8443", "X", None, False),
    ],
)
def test_pasted_codes_parse(
    text: str, address: str, matching_id: str, oid: str | None, required: bool
) -> None:
    code = parse_activation_code(text)
    assert code.smdp_address == address
    assert code.matching_id == matching_id
    assert code.smdp_oid == oid
    assert code.confirmation_code_required is required


def test_host_and_port() -> None:
    assert parse_activation_code("1$a.example$X").port == 443
    code = parse_activation_code("1$a.example:8443$X")
    assert (code.host, code.port) == ("a.example", 8443)


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("", None),
        ("LPA:", None),
        ("2$smdp.example.com$X", "format"),
        ("1$smdp.example.com", "smdp_address"),
        ("1$$X", "smdp_address"),
        ("1$smdp_example.com$X", "smdp_address"),
        ("1$smdp.example.com:0$X", "smdp_address"),
        ("1$smdp.example.com:70000$X", "smdp_address"),
        ("1$smdp.example.com$X!Y", "matching_id"),
        ("1$smdp.example.com$X$not-an-oid", "smdp_oid"),
        ("1$smdp.example.com$X$1.2$yes", "confirmation_code_required"),
        ("1$smdp.example.com$X$1.2$1$extra", None),
        ("https://smdp.example.com/X", "format"),
    ],
)
def test_bad_codes_name_the_field(text: str, field: str | None) -> None:
    with pytest.raises(ActivationCodeError) as info:
        parse_activation_code(text)
    assert info.value.field == field


labels = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
codes = st.builds(
    ActivationCode,
    smdp_address=st.lists(labels, min_size=1, max_size=4).map(".".join),
    matching_id=st.from_regex(r"[0-9A-Za-z-]{0,40}", fullmatch=True),
    smdp_oid=st.none() | st.from_regex(r"[0-2](\.(0|[1-9][0-9]{0,5})){1,6}", fullmatch=True),
    confirmation_code_required=st.booleans(),
)


@given(codes, st.booleans())
def test_round_trip(code: ActivationCode, prefixed: bool) -> None:
    text = ("LPA:" if prefixed else "") + code.text()
    assert parse_activation_code(text) == code


@given(st.text(max_size=200))
def test_any_text_parses_or_raises_typed(text: str) -> None:
    try:
        code = parse_activation_code(text)
    except ActivationCodeError:
        return
    assert parse_activation_code(code.text()) == code
