"""ES10b download codec: tags as SGP.22's ASN.1 gives them, BPP segmentation (§2.5.5), errors."""

from __future__ import annotations

import contextlib
import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.errors import Es10Error, ParseError
from agent.euicc import es10b, tlv
from agent.euicc.es10b import CancelSessionReason
from agent.euicc.tlv import TlvError

TID = bytes(range(16))


def tags(data: bytes) -> list[int]:
    return [item.tag for item in tlv.decode_all(data)]


def test_fixed_encodings() -> None:
    assert es10b.get_euicc_challenge_request().hex().upper() == "BF2E00"
    assert (
        es10b.cancel_session_request(TID, CancelSessionReason.LOAD_BPP_EXECUTION_ERROR)
        .hex()
        .upper()
        == "BF4115" + "8010" + TID.hex().upper() + "810105"
    )


def test_authenticate_server_layout() -> None:
    request = es10b.authenticate_server_request(
        tlv.encode(0x30, tlv.encode(0x80, TID)),
        tlv.encode(0x5F37, bytes(64)),
        tlv.encode(0x04, bytes(20)),
        tlv.encode(0x30, b"cert"),
        matching_id="ABC-1",
        device_info_content=es10b.device_info(b"\x35\x29\x06\x11"),
    )
    head = tlv.decode_one(request)[0]
    assert head.tag == 0xBF38
    assert [c.tag for c in head.children()] == [0x30, 0x5F37, 0x04, 0x30, 0xA0]
    ctx = head.children()[4]
    assert [c.tag for c in ctx.children()] == [0x80, 0xA1]  # matchingId, deviceInfo
    assert ctx.children()[0].value == b"ABC-1"
    device = ctx.children()[1]
    assert [c.tag for c in device.children()] == [0x80, 0xA1]  # tac, deviceCapabilities


def test_authenticate_server_refuses_foreign_blobs() -> None:
    with pytest.raises(TlvError):
        es10b.authenticate_server_request(
            tlv.encode(0x31, b""),
            tlv.encode(0x5F37, bytes(64)),
            tlv.encode(0x04, bytes(20)),
            tlv.encode(0x30, b""),
            matching_id=None,
            device_info_content=es10b.device_info(bytes(4)),
        )


def test_prepare_download_layout_and_hash_cc() -> None:
    signed2 = tlv.encode(0x30, tlv.encode(0x80, TID) + tlv.encode(0x01, b"\xff"))
    assert es10b.smdp_signed2_fields(signed2) == (TID, True)
    hash_cc = es10b.confirmation_code_hash("1234", TID)
    assert hash_cc == hashlib.sha256(hashlib.sha256(b"1234").digest() + TID).digest()
    request = es10b.prepare_download_request(
        signed2, tlv.encode(0x5F37, bytes(64)), tlv.encode(0x30, b"pb"), hash_cc
    )
    head = tlv.decode_one(request)[0]
    assert head.tag == 0xBF21
    assert [c.tag for c in head.children()] == [0x30, 0x5F37, 0x04, 0x30]
    plain = es10b.prepare_download_request(
        signed2, tlv.encode(0x5F37, bytes(64)), tlv.encode(0x30, b"pb")
    )
    assert tags(tlv.decode_one(plain)[0].value) == [0x30, 0x5F37, 0x30]


@pytest.mark.parametrize(
    ("function", "data", "reason"),
    [
        (es10b.check_authenticate_server, "BF3808A106800101020107", "ciPKUnknown"),
        (es10b.check_prepare_download, "BF2108A106800101020102", "invalidSignature"),
        (es10b.check_cancel_session, "BF4103810105", "invalidTransactionId"),
    ],
)
def test_error_choices_raise_named_reasons(function: object, data: str, reason: str) -> None:
    assert callable(function)
    with pytest.raises(Es10Error) as info:
        function(bytes.fromhex(data))
    assert info.value.reason == reason


def _bpp(n87: int, n88: int, second: int, n86: int, size: int) -> bytes:
    isc = tlv.encode(0xBF23, tlv.encode(0x82, b"\x01") + tlv.encode(0x80, TID))
    body = isc + tlv.encode(0xA0, b"".join(tlv.encode(0x87, bytes(size)) for _ in range(n87)))
    body += tlv.encode(0xA1, b"".join(tlv.encode(0x88, bytes(size)) for _ in range(n88)))
    if second:
        body += tlv.encode(0xA2, b"".join(tlv.encode(0x87, bytes(size)) for _ in range(second)))
    body += tlv.encode(0xA3, b"".join(tlv.encode(0x86, bytes(size)) for _ in range(n86)))
    return tlv.encode(0xBF36, body)


def test_bpp_segments_follow_section_2_5_5() -> None:
    bpp = _bpp(1, 2, 1, 3, 20)
    segments = es10b.bpp_segments(bpp)
    assert b"".join(segments) == bpp
    assert segments[0].startswith(bytes.fromhex("BF36"))
    assert tlv.decode_one(segments[0][4:])[0].tag == 0xBF23
    assert [s[0] for s in segments[1:]] == [0xA0, 0xA1, 0x88, 0x88, 0xA2, 0xA3, 0x86, 0x86, 0x86]
    assert len(segments[2]) == 2  # A1 header alone
    assert len(segments) == 10


@given(
    st.integers(1, 3), st.integers(1, 3), st.integers(0, 2), st.integers(1, 6), st.integers(0, 300)
)
def test_bpp_segments_reassemble(n87: int, n88: int, second: int, n86: int, size: int) -> None:
    bpp = _bpp(n87, n88, second, n86, size)
    segments = es10b.bpp_segments(bpp)
    assert b"".join(segments) == bpp
    assert len(segments) == 3 + n88 + (1 if second else 0) + 1 + n86


def test_bpp_out_of_order_is_refused() -> None:
    isc = tlv.encode(0xBF23, b"")
    bad = tlv.encode(
        0xBF36, isc + tlv.encode(0xA1, b"") + tlv.encode(0xA0, b"") + tlv.encode(0xA3, b"")
    )
    with pytest.raises(TlvError):
        es10b.bpp_segments(bad)
    with pytest.raises(TlvError):
        es10b.bpp_segments(tlv.encode(0xBF36, tlv.encode(0xA0, b"")))


# ---------------------------------------------------------------- hostile card answers


_decoders = [
    es10b.decode_euicc_challenge,
    es10b.check_authenticate_server,
    es10b.check_prepare_download,
    es10b.check_cancel_session,
    es10b.decode_profile_installation_result,
    es10b.bpp_segments,
    es10b.signed1_transaction_id,
    es10b.smdp_signed2_fields,
]


def _noise() -> st.SearchStrategy[bytes]:
    tags_ = st.sampled_from([0x80, 0x81, 0x02, 0x04, 0x30, 0x4F, 0x5A, 0xA0, 0xA1, 0xA2, 0xBF2F])
    leaf = st.builds(tlv.encode, tags_, st.binary(max_size=20))
    nested = st.recursive(
        leaf,
        lambda inner: st.builds(
            lambda t, kids: tlv.encode(t, b"".join(kids)), tags_, st.lists(inner, max_size=3)
        ),
        max_leaves=8,
    )
    tops = st.sampled_from([0xBF2E, 0xBF38, 0xBF21, 0xBF41, 0xBF37, 0xBF27, 0xBF36, 0x30])
    return st.builds(
        lambda t, kids: tlv.encode(t, b"".join(kids)), tops, st.lists(nested, max_size=4)
    ) | st.binary(max_size=64)


@pytest.mark.fuzz
@given(st.sampled_from(_decoders), _noise())
def test_decoders_raise_only_typed_errors(decoder: object, data: bytes) -> None:
    assert callable(decoder)
    with contextlib.suppress(ParseError, Es10Error):
        decoder(data)


def test_tac_from_imei() -> None:
    from agent.euicc.download import tac_from_imei

    assert tac_from_imei("867698040000005") == bytes.fromhex("86769804")
    assert tac_from_imei(None) is None
    assert tac_from_imei("12AB5678901") is None
    assert tac_from_imei("1234") is None
