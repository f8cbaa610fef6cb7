"""Unit tests for the AT reply parsers and character sets, including vendor forms the fixtures lack."""

from __future__ import annotations

import pytest

from agent.at import charset, parsers
from agent.at.replies import interpret
from agent.errors import ParseError

# --------------------------------------------------------------------------- helpers


@pytest.mark.parametrize(
    "line",
    ["+CSQ: 15,99", "+CSQ:15,99", "+csq:  15,99", "15,99", "\r\n+CSQ: 15,99\r\n"],
)
def test_strip_prefix_accepts_every_spelling(line: str) -> None:
    assert parsers.strip_prefix(line, "+CSQ") == "15,99"


def test_split_fields_honours_quotes_and_parentheses() -> None:
    assert parsers.split_fields(' 1, "a,b" ,(0-3,5), "x" ,') == ["1", "a,b", "(0-3,5)", "x", ""]


# --------------------------------------------------------------------------- charset


def test_gsm_default_alphabet_maps_codes_to_characters() -> None:
    assert charset.decode_text("AT&T@", "GSM") == "AT&T¡"
    assert charset.decode_text("\x00\x01\x02\x11", "GSM") == "@£$_"


def test_gsm_extension_table_via_escape() -> None:
    assert charset.decode_text("5\x1be", "GSM") == "5€"
    assert charset.decode_text("\x1b(x\x1b)", "GSM") == "{x}"


def test_ucs2_decodes_hex_and_falls_back_on_garbage() -> None:
    assert charset.decode_text("004F00720061006E00670065", "UCS2") == "Orange"
    assert charset.decode_text("041C04220421", "ucs2") == "МТС"
    assert charset.decode_text("Orange", "UCS2") == "Orange"


def test_hex_and_passthrough_charsets() -> None:
    assert charset.decode_text("414243", "HEX") == "ABC"
    assert charset.decode_text("Telekom.de", "IRA") == "Telekom.de"
    assert charset.decode_text("Telekom.de", "8859-1") == "Telekom.de"
    assert charset.decode_text("x@y", "SOMETHING") == "x@y"


# --------------------------------------------------------------------------- errors


def test_cme_numeric_maps_to_2707_text() -> None:
    assert parsers.parse_cme_error("+CME ERROR: 10") == (10, "SIM not inserted")
    assert parsers.parse_cme_error("+CME ERROR:3") == (3, "Operation not allowed")
    assert parsers.parse_cme_error("+CME ERROR: 999") == (999, None)


def test_cme_verbose_keeps_text() -> None:
    assert parsers.parse_cme_error("\r\n+CME ERROR: Parameters error\r\n") == (
        None,
        "Parameters error",
    )


def test_cms_error() -> None:
    assert parsers.parse_cms_error("+CMS ERROR: 310") == (310, "SIM not inserted")


def test_interpret_reports_plain_error_final() -> None:
    result = interpret('AT+CCHO="A000"', "\r\nERROR\r\n")
    assert result["ok"] is False
    assert result["error"]


# --------------------------------------------------------------------------- SIM, identity


@pytest.mark.parametrize(
    ("reply", "state"),
    [
        ("+CPIN: READY", "ready"),
        ('+CPIN: "SIM PIN"', "sim-pin"),
        ("+CPIN:PH-NETSUB PIN", "ph-netsub-pin"),
        ("PH-CORP PIN", "ph-corp-pin"),
        ("+CPIN: PH-SP PIN", "ph-sp-pin"),
        ("+CPIN: SIM not inserted", "absent"),
        ("+CPIN: NOT INSERTED", "absent"),
        ("+CPIN: WHATEVER", "unknown"),
    ],
)
def test_cpin(reply: str, state: str) -> None:
    assert parsers.parse_cpin(reply) == state


@pytest.mark.parametrize(
    "reply",
    [
        "+CCID: 89882390000012345678",
        "+ICCID: 89882390000012345678",
        "^ICCID: 98883209000021436587",
        '+QCCID: "89882390000012345678"',
        "+CICCID:89882390000012345678",
        "ICCID: 89882390000012345678",
        "!ICCID: 89882390000012345678",
    ],
)
def test_iccid_vendor_prefixes(reply: str) -> None:
    assert parsers.parse_iccid(reply) == "89882390000012345678"


@pytest.mark.parametrize("reply", ["8988239000001234", "89882390000012345678901234", "", "89 zz"])
def test_iccid_rejects_bad_length_or_chars(reply: str) -> None:
    with pytest.raises(ParseError):
        parsers.parse_iccid(reply)


def test_gsn_forms() -> None:
    assert parsers.parse_gsn("356938035643809") == ("356938035643809", None, None)
    assert parsers.parse_gsn("+GSN: 0x6030c012") == (None, "6030C012", None)
    assert parsers.parse_gsn("A100001D0B5F33") == (None, None, "A100001D0B5F33")
    with pytest.raises(ParseError):
        parsers.parse_gsn("12345")


# --------------------------------------------------------------------------- signal


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("+CSQ: 0,0", (-113, 0)),
        ("+CSQ: 1,99", (-111, None)),
        ("+CSQ: 2,7", (-109, 7)),
        ("+CSQ: 30,3", (-53, 3)),
        ("+CSQ: 31,99", (-51, None)),
        ("+CSQ: 99,99", (None, None)),
    ],
)
def test_csq(reply: str, expected: tuple[int | None, int | None]) -> None:
    assert parsers.parse_csq(reply) == expected


def test_cesq_physical_values() -> None:
    r = parsers.parse_cesq("+CESQ: 10,6,95,40,255,255")
    assert (r.rssi_dbm, r.rscp_dbm, r.ecno_db) == (-101, -26, -4.5)
    assert (r.rsrp_dbm, r.rsrq_db) == (None, None)
    lte = parsers.parse_cesq("+CESQ:99,99,255,255,34,97")
    assert (lte.rsrq_db, lte.rsrp_dbm, lte.rssi_dbm) == (-3.0, -44, None)


def test_quectel_qcsq_lte_and_noservice() -> None:
    r = parsers.parse_qcsq('+QCSQ: "LTE",-52,-81,195,-10')
    assert (r.rat, r.rssi_dbm, r.rsrp_dbm, r.sinr_db, r.rsrq_db) == ("lte", -52, -81, 19.0, -10)
    assert parsers.parse_qcsq('+QCSQ: "NOSERVICE"').rat == "unknown"
    assert parsers.parse_qcsq('+QCSQ: "GSM",-71').rssi_dbm == -71


def test_quectel_qeng_lte_servingcell() -> None:
    reply = (
        '+QENG: "servingcell","NOCONN","LTE","FDD",262,01,2A3B4C5,123,1300,3,5,5,'
        "1A2B,-95,-11,-65,10,0,-,30"
    )
    (cell,) = parsers.parse_qeng_servingcell(reply)
    assert cell.state == "NOCONN"
    assert (cell.rat, cell.mcc, cell.mnc) == ("lte", "262", "01")
    assert (cell.cell_id, cell.pci, cell.earfcn, cell.band) == (0x2A3B4C5, 123, 1300, 3)
    assert (cell.tac, cell.rsrp_dbm, cell.rsrq_db, cell.rssi_dbm) == (0x1A2B, -95, -11, -65)
    assert cell.sinr_db == -18.0


def test_quectel_qeng_nsa_rows() -> None:
    reply = (
        '+QENG: "servingcell","NOCONN"\r\n'
        '+QENG: "LTE","FDD",262,01,2A3B4C5,123,1300,3,5,5,1A2B,-95,-11,-65,10,0,-,30\r\n'
        '+QENG: "NR5G-NSA",262,01,500,-90,15,-11,627264,78\r\n'
    )
    lte, nr = parsers.parse_qeng_servingcell(reply)
    assert (lte.rat, nr.rat) == ("lte", "5gnr")
    assert (nr.pci, nr.rsrp_dbm, nr.sinr_db, nr.band) == (500, -90, 15.0, 78)
    assert nr.state == "NOCONN"


def test_quectel_qeng_search_only() -> None:
    (cell,) = parsers.parse_qeng_servingcell('+QENG: "servingcell","SEARCH"')
    assert (cell.state, cell.rat) == ("SEARCH", "unknown")


def test_huawei_hcsq_noservice_is_rejected() -> None:
    assert parsers.parse_hcsq('^HCSQ: "WCDMA",30,30,58').act == "umts"
    with pytest.raises(ParseError):
        parsers.parse_hcsq('^HCSQ: "NOSERVICE"')


def test_smoni_2g() -> None:
    r = parsers.parse_smoni("^SMONI: 2G,71,-61,262,02,0143,83BA,33,33,3,6,G,NOCONN")
    assert (r.tech, r.rssi_dbm) == ("2g", -61)


# --------------------------------------------------------------------------- registration


Layout = tuple[str, int, int | None, int | None, str, int | None]


@pytest.mark.parametrize(
    ("reply", "want"),
    [
        ("+CREG: 0,1", ("CREG", 1, None, None, "unknown", 0)),
        ('+CREG: 2,5,"0502","0404736D",2', ("CREG", 5, 0x502, 0x404736D, "umts", 2)),
        ('+CGREG: 1,"1422","00000142",3,"00"', ("CGREG", 1, 0x1422, 0x142, "edge", None)),
        ("+CREG:2,1,0001,0010", ("CREG", 1, 1, 16, "unknown", 2)),
        ("+CREG: 1,0001,0010,0", ("CREG", 1, 1, 16, "gsm", None)),
        ("+CREG: 2,1,  0 5, 2715", ("CREG", 1, 5, 0x2715, "unknown", 2)),
    ],
)
def test_registration_layouts(reply: str, want: Layout) -> None:
    r = parsers.parse_registration(reply)
    assert (r.kind, r.stat, r.lac, r.cell_id, r.act, r.n) == want


def test_cereg_carries_tac_and_unsolicited_rac_form() -> None:
    r = parsers.parse_registration("+CEREG: 1, 1F00, 20 ,79D903 ,7")
    assert (r.tac, r.lac, r.cell_id, r.act, r.solicited) == (0x1F00, None, 0x79D903, "lte", False)


def test_registration_without_prefix_uses_kind() -> None:
    r = parsers.parse_registration('2,10,"8d83","671f98a",7', kind="CEREG")
    assert (r.kind, r.state, r.tac, r.cell_id) == ("CEREG", "roaming", 0x8D83, 0x671F98A)


@pytest.mark.parametrize(
    ("stat", "state"),
    [(0, "not_registered"), (1, "home"), (2, "searching"), (3, "denied"), (4, "unknown"),
     (5, "roaming"), (6, "home"), (7, "roaming"), (8, "unknown"), (9, "home"), (10, "roaming"),
     (11, "unknown"), (42, "unknown")],
)  # fmt: skip
def test_reg_state_folding(stat: int, state: str) -> None:
    assert parsers.reg_state(stat) == state


def test_act_family_folding() -> None:
    folded = {name: parsers.act_family(name) for name in parsers.ACT_NAMES.values()}
    assert folded == {
        "gsm": "gsm", "gsm-compact": "gsm", "umts": "umts", "edge": "edge", "hsdpa": "umts",
        "hsupa": "umts", "hspa": "umts", "lte": "lte", "ec-gsm-iot": "gsm", "nb-iot": "lte",
        "lte-5gc": "lte", "5gnr": "5gnr", "ng-ran": "5gnr", "en-dc": "5gnr",
    }  # fmt: skip
    assert parsers.act_name(42) == "unknown"


def test_registration_garbage_raises() -> None:
    with pytest.raises(ParseError):
        parsers.parse_registration("+CREG: x,y")


# --------------------------------------------------------------------------- operators


def test_cops_test_ucs2_names() -> None:
    reply = '+COPS: (2,"004F00720061006E00670065","004F00720061006E","20801",7),,(0-4),(0-2)'
    (op,) = parsers.parse_cops_test(reply, charset="UCS2")
    assert (op.long, op.short, op.numeric, op.status, op.act) == (
        "Orange",
        "Oran",
        "20801",
        "current",
        "lte",
    )


def test_cops_test_ucs2_names_even_when_cscs_says_gsm() -> None:
    (op,) = parsers.parse_cops_test('+COPS: (1,"041C042204210020005200550053","MTS","25001",2)')
    assert (op.long, op.act) == ("МТС RUS", "umts")


def test_cops_test_survives_stray_parens_and_spaces() -> None:
    reply = '+COPS: ( 1 , "A" , "B" , "00101" , 7 ))(3,"C","D","00102",0),,(0-4),(0-2)'
    ops = parsers.parse_cops_test(reply)
    assert [(o.numeric, o.status) for o in ops] == [("00101", "available"), ("00102", "forbidden")]


def test_cops_read_decodes_name_and_keeps_numeric() -> None:
    assert parsers.parse_cops_read('+COPS: 0,0,"AT&T@",7').operator == "AT&T¡"
    r = parsers.parse_cops_read('+COPS: 0,2,"26202",7')
    assert (r.mode, r.format, r.operator, r.act) == (0, 2, "26202", "lte")
    assert parsers.parse_cops_read("+COPS: 2").operator is None


# --------------------------------------------------------------------------- PDP and misc


def test_cgdcont_read() -> None:
    reply = '+CGDCONT: 1,"IP","internet","0.0.0.0",0,0\r\n+CGDCONT: 2,"IPV4V6","ims",,0,0\r\nOK'
    assert parsers.parse_cgdcont_read(reply) == [
        parsers.PdpContext(1, "IP", "internet"),
        parsers.PdpContext(2, "IPV4V6", "ims"),
    ]


def test_cgpaddr_dotted_ipv6() -> None:
    reply = '+CGPADDR: 1,"10.1.2.3","32.1.13.184.0.0.0.0.0.0.0.0.0.0.0.1"'
    assert parsers.parse_cgpaddr(reply) == [(1, ["10.1.2.3", "2001:db8::1"])]


def test_cgcontrdp_combined_address_and_mask() -> None:
    (row,) = parsers.parse_cgcontrdp(
        '+CGCONTRDP: 1,5,"internet","10.57.14.22.255.255.255.0","10.57.14.1","80.58.61.250"'
    )
    assert (row.local_address, row.subnet, row.gateway, row.dns_primary) == (
        "10.57.14.22",
        "255.255.255.0",
        "10.57.14.1",
        "80.58.61.250",
    )


def test_cscs_and_cfun() -> None:
    assert parsers.parse_cscs('+CSCS: "UCS2"') == "UCS2"
    assert parsers.parse_cfun("+CFUN: 4,0") == 4


def test_csim_and_crsm() -> None:
    assert parsers.parse_csim('+CSIM: 4,"63c3"') == (4, "63C3")
    assert parsers.csim_pin_retries("63C3") == 3
    with pytest.raises(ParseError):
        parsers.parse_csim("+CSIM: 4,63C3")
    assert parsers.parse_crsm("+CRSM: 106,130") == (106, 130, "")


def test_qnwinfo_and_xlec() -> None:
    r = parsers.parse_qnwinfo('+QNWINFO: "NR5G-SA","46001","NR5G BAND 78",627264')
    assert (r.act, r.band, r.channel) == ("5gnr", "NR5G BAND 78", 627264)
    x = parsers.parse_xlec("+XLEC: 0,2,5,3,BAND_LTE_3,BAND_LTE_7")
    assert (x.num_cc, x.primary_band, x.bands) == (2, "BAND_LTE_3", ("BAND_LTE_3", "BAND_LTE_7"))


def test_cind_cmer_cpms() -> None:
    (ind,) = parsers.parse_cind_test('+CIND: ("Signal",(0,1,2,3,4,5))')
    assert (ind.name, ind.index, ind.min, ind.max) == ("signal", 1, 0, 5)
    assert parsers.parse_cmer_test("+CMER: (0-3),(0),(0),(0-2),(0-1)") == ([0, 1, 2, 3], [0, 1, 2])
    assert parsers.parse_cpms_test('+CPMS: ("SM","ME"),("SM"),("MT")') == (
        ["sm", "me"],
        ["sm"],
        ["mt"],
    )


def test_quectel_qeng_wcdma_row() -> None:
    reply = '+QENG: "servingcell","LIMSRV","WCDMA",460,01,A2C1,1E9B53,10713,318,21,-78,-3,-,-,-,-,-'
    (cell,) = parsers.parse_qeng_servingcell(reply)
    assert (cell.state, cell.rat, cell.lac, cell.cell_id) == ("LIMSRV", "umts", 0xA2C1, 0x1E9B53)
    assert (cell.earfcn, cell.pci, cell.rscp_dbm) == (10713, 318, -78)


@pytest.mark.parametrize(
    ("reply", "session"),
    [
        ("+CCHO: 1", "1"),
        ("+CCHO:2", "2"),
        ("1", "1"),  # Fibocom FM350-GL: the bare id on a line of its own
        ("+CCHO: 00000000038aa32f", "00000000038aa32f"),  # Sierra: a long hex token
        ('+CCHO: "7"', "7"),
    ],
)
def test_ccho_session_id_is_an_opaque_token(reply: str, session: str) -> None:
    assert parsers.parse_ccho(reply) == session


def test_cgla_reply_length_counts_hex_characters() -> None:
    assert parsers.parse_cgla('+CGLA:4,"611a"') == (4, "611A")
    with pytest.raises(ParseError):
        parsers.parse_ccho("+CCHO: session one")


@pytest.mark.parametrize("reply", ["63C:", "63CG", "6 C3", "9x00"])
def test_csim_status_word_must_be_hex(reply: str) -> None:
    with pytest.raises(ParseError):
        parsers.csim_pin_retries(reply)


@pytest.mark.parametrize(
    "reply",
    ['+CGLA: 4,"9000"', "+CGLA: 4,9000", "+CGLA:4,9000", '+CGLA: 4,"90 00"', '4,"9000"'],
)
def test_cgla_reply_is_read_liberally(reply: str) -> None:
    # 27.007 quotes the hex; field firmware drops the quotes, the space, or the prefix.
    assert parsers.parse_cgla(reply) == (4, "9000")


@pytest.mark.parametrize("reply", ['+CGLA: "9000"', '+CGLA: 2,"90"', "+CGLA: 4,90G0", "+CGLA: 4"])
def test_cgla_reply_without_length_or_status_word_is_rejected(reply: str) -> None:
    with pytest.raises(ParseError):
        parsers.parse_cgla(reply)


def test_transport_and_interpret_read_apdu_replies_alike() -> None:
    from agent.at.replies import interpret
    from agent.euicc.transport import parse_apdu_reply, parse_session_id

    for reply in ("+CGLA: 4,9000", '+CGLA:6,"61 1A"', "+CGLA: 4, 9000"):
        got = interpret('AT+CGLA=1,10,"80E2910000"', reply)
        assert got["ok"] is True
        assert parse_apdu_reply(reply.splitlines(), "+CGLA").hex().upper() == got["hex"]
    for bad in ("+CGLA: 9000", '+CGLA: 2,"90"', "+CSIM: 4,9000"):
        assert (
            interpret('AT+CSIM=10,"0070000001"' if "CSIM" in bad else "AT+CGLA", bad)["ok"] is False
        )
        with pytest.raises(ParseError):
            parse_apdu_reply([bad], "+CSIM" if "CSIM" in bad else "+CGLA")
    for reply, session in (
        ("1", "1"),
        ("+CCHO:2", "2"),
        ('+CCHO: "00000000038aa32f"', "00000000038aa32f"),
    ):
        assert parse_session_id([reply]) == interpret("AT+CCHO", reply)["session_id"] == session
