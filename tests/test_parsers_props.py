"""Property tests: parsers fail only with ParseError, interpret never raises, and round trips hold."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.at import charset, parsers
from agent.at.replies import interpret
from agent.errors import ParseError

PARSERS: list[Callable[[str], object]] = [
    lambda s: parsers.strip_prefix(s, "+CREG"),
    parsers.split_fields,
    parsers.parse_cme_error,
    parsers.parse_cms_error,
    parsers.parse_cpin,
    parsers.parse_iccid,
    parsers.parse_gsn,
    parsers.parse_csq,
    parsers.parse_cesq,
    parsers.parse_registration,
    parsers.parse_cops_read,
    lambda s: parsers.parse_cops_test(s, "UCS2"),
    parsers.parse_cops_test,
    parsers.parse_cfun,
    parsers.parse_cscs,
    parsers.parse_cgdcont_read,
    parsers.parse_cgdcont_test,
    parsers.parse_cgact_read,
    parsers.parse_cgpaddr,
    parsers.parse_cgcontrdp,
    parsers.parse_cgev,
    parsers.parse_csim,
    parsers.parse_cgla,
    parsers.parse_ccho,
    parsers.csim_pin_retries,
    parsers.parse_crsm,
    parsers.parse_cind_test,
    parsers.parse_cmer_test,
    parsers.parse_cpms_test,
    parsers.parse_qcsq,
    parsers.parse_qeng_servingcell,
    parsers.parse_qnwinfo,
    parsers.parse_hcsq,
    parsers.parse_sysinfo,
    parsers.parse_sysinfoex,
    parsers.parse_smoni,
    parsers.parse_xlec,
    lambda s: charset.decode_text(s, "GSM"),
    lambda s: charset.decode_text(s, "UCS2"),
    lambda s: charset.decode_text(s, "HEX"),
]

COMMANDS = [
    "AT+CREG?", "URC +CEREG", "AT+COPS=?", "AT+COPS?", "AT+CESQ", "AT+CSQ", "AT^HCSQ?",
    "AT^SYSINFO", "AT^SYSINFOEX", "AT^SMONI", "AT+CPIN?", "AT+CFUN?", "AT+CSIM", "AT+CRSM",
    "AT+CGDCONT=?", "AT+CGDCONT?", "AT+CGACT?", "AT!SCACT?", "AT+CPMS=?", "AT+CIND=?",
    "AT+CMER=?", "AT+CCID", "AT+CGSN", "AT+CGCONTRDP=1", "AT+QNWINFO", "AT+XLEC?", "AT+QCSQ",
    "AT+QENG=\"servingcell\"", "AT+CSCS?", "AT+CGPADDR", "URC +CGEV", "AT+UNKNOWN", "", "URC",
]  # fmt: skip

# Text made of the characters AT replies are built from, so examples reach past the first check.
AT_TEXT = st.text(alphabet='0123456789ABCDEFabcdefx,"()-+: .\r\n^!@\x1bCGREQPSMINOLTU', max_size=80)
ANY_TEXT = st.one_of(
    st.text(max_size=80),
    st.binary(max_size=80).map(lambda b: b.decode("latin-1")),
    AT_TEXT,
    st.builds(
        lambda p, t: p + t,
        st.sampled_from(
            ["+CREG: ", "+COPS: (", "+CESQ:", '+CSIM: 4,"', "+CGEV: NW ", "+CGCONTRDP: 1,5,"]
        ),
        AT_TEXT,
    ),
)


@settings(max_examples=150, deadline=None)
@given(text=ANY_TEXT)
def test_every_parser_raises_only_parse_error(text: str) -> None:
    for parse in PARSERS:
        with contextlib.suppress(ParseError):
            parse(text)


@settings(max_examples=300, deadline=None)
@given(command=st.one_of(st.sampled_from(COMMANDS), st.text(max_size=20)), response=ANY_TEXT)
def test_interpret_never_raises(command: str, response: str) -> None:
    result = interpret(command, response)
    assert isinstance(result, dict)
    assert ("error" in result) is (result["ok"] is False)
    assert not str(result.get("error", "")).startswith("internal")


HEX4 = st.integers(min_value=0, max_value=0xFFFF)
CELL = st.integers(min_value=0, max_value=0xFFFFFFF)


@settings(max_examples=200, deadline=None)
@given(
    kind=st.sampled_from(["CREG", "CGREG", "CEREG", "C5GREG"]),
    n=st.integers(min_value=0, max_value=2),
    stat=st.integers(min_value=0, max_value=11),
    area=HEX4,
    cell=CELL,
    act=st.integers(min_value=0, max_value=13),
    solicited=st.booleans(),
    space=st.sampled_from(["", " "]),
)
def test_registration_round_trip(
    *, kind: str, n: int, stat: int, area: int, cell: int, act: int, solicited: bool, space: str
) -> None:
    body = f'{stat},"{area:04X}","{cell:08x}",{act}'
    line = f"+{kind}:{space}{n},{body}" if solicited else f"+{kind}:{space}{body}"
    r = parsers.parse_registration(f"\r\n{line}\r\n")
    assert (r.kind, r.stat, r.cell_id, r.act, r.solicited) == (
        kind,
        stat,
        cell,
        parsers.ACT_NAMES[act],
        solicited,
    )
    assert (r.lac if kind in ("CREG", "CGREG") else r.tac) == area
    assert r.n == (n if solicited else None)
    assert r.state == parsers.reg_state(stat)


@given(rssi=st.integers(min_value=2, max_value=30), ber=st.integers(min_value=0, max_value=7))
def test_csq_round_trip(rssi: int, ber: int) -> None:
    assert parsers.parse_csq(f"+CSQ: {rssi},{ber}") == (-113 + 2 * rssi, ber)


@given(rsrq=st.integers(min_value=0, max_value=34), rsrp=st.integers(min_value=0, max_value=97))
def test_cesq_lte_mapping(rsrq: int, rsrp: int) -> None:
    r = parsers.parse_cesq(f"+CESQ: 99,99,255,255,{rsrq},{rsrp}")
    assert (r.rsrq_db, r.rsrp_dbm) == (rsrq / 2 - 20, rsrp - 141)


@given(digits=st.text(alphabet="0123456789", min_size=16, max_size=18))
def test_iccid_swapped_and_plain_agree(digits: str) -> None:
    iccid = "89" + digits
    padded = iccid + "F" * (len(iccid) % 2)
    swapped = "".join(padded[i + 1] + padded[i] for i in range(0, len(padded), 2))
    assert parsers.parse_iccid(f'+CCID: "{swapped}"') == iccid
    assert parsers.parse_iccid(padded) == iccid


NAME = st.text(
    alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 .&-", max_size=16
)


@settings(max_examples=100, deadline=None)
@given(
    ops=st.lists(
        st.tuples(
            st.integers(min_value=0, max_value=3),
            NAME,
            NAME,
            st.text(alphabet="0123456789", min_size=5, max_size=6),
            st.integers(min_value=0, max_value=13),
        ),
        min_size=1,
        max_size=5,
    ),
    sep=st.sampled_from([",", "", ", "]),
)
def test_cops_test_round_trip_ucs2(ops: list[tuple[int, str, str, str, int]], sep: str) -> None:
    def ucs2(s: str) -> str:
        return s.encode("utf-16-be").hex().upper()

    groups = sep.join(
        f'({st_},"{ucs2(lo)}","{ucs2(sh)}","{num}",{act})' for st_, lo, sh, num, act in ops
    )
    parsed = parsers.parse_cops_test(f"+COPS: {groups},,(0-4),(0-2)", charset="UCS2")
    assert [(o.long, o.short, o.numeric, o.act) for o in parsed] == [
        (lo or None, sh or None, num, parsers.act_family(parsers.ACT_NAMES[act]))
        for _, lo, sh, num, act in ops
    ]


@given(text=st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 "))
def test_gsm_decode_is_identity_on_shared_letters(text: str) -> None:
    assert charset.decode_text(text, "GSM") == text
