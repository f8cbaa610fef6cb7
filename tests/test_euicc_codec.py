"""BER-TLV, ICCID and ES10 codec: round trips, unknown tags, malformed bytes."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.errors import Es10Error
from agent.euicc import es10, tlv
from agent.euicc.es10 import (
    EuiccInfo1,
    EuiccInfo2,
    NotificationMetadata,
    PendingNotification,
    ProfileInfo,
)
from agent.euicc.iccid import decode_iccid, encode_iccid
from agent.euicc.tlv import TlvError

iccids = st.text(alphabet="0123456789", min_size=18, max_size=20)
texts = st.text(max_size=40)
versions = st.tuples(*[st.integers(0, 255)] * 3).map(lambda t: ".".join(map(str, t)))
key_ids = st.lists(st.binary(min_size=20, max_size=20).map(lambda b: b.hex().upper()), max_size=3)
opt = st.none

profiles = st.builds(
    ProfileInfo,
    iccid=iccids,
    isdp_aid=st.binary(min_size=5, max_size=16).map(lambda b: b.hex().upper()) | opt(),
    state=st.sampled_from(["enabled", "disabled"]) | opt(),
    nickname=texts | opt(),
    service_provider_name=texts | opt(),
    profile_name=texts | opt(),
    # SGP.22 gives profileClass DEFAULT operational: an absent class reads back as operational.
    profile_class=st.sampled_from(["test", "provisioning", "operational"]),
)
metadata = st.builds(
    NotificationMetadata,
    seq_number=st.integers(0, 2**31 - 1),
    profile_management_operation=st.sampled_from(["install", "enable", "disable", "delete"])
    | opt(),
    notification_address=texts | opt(),
    iccid=iccids | opt(),
)
info1 = st.builds(
    EuiccInfo1, svn=versions | opt(), ci_pki_ids_verification=key_ids, ci_pki_ids_signing=key_ids
)
counts = st.integers(0, 2**32 - 1) | opt()
info2 = st.builds(
    EuiccInfo2,
    profile_version=versions | opt(),
    svn=versions | opt(),
    firmware_version=versions | opt(),
    installed_applications=counts,
    free_nvm=counts,
    free_vm=counts,
    ts102241_version=versions | opt(),
    globalplatform_version=versions | opt(),
    ci_pki_ids_verification=key_ids,
    ci_pki_ids_signing=key_ids,
    pp_version=versions | opt(),
    sas_accreditation_number=texts | opt(),
)


@settings(deadline=None)
@given(iccids)
def test_iccid_round_trip(iccid: str) -> None:
    raw = encode_iccid(iccid)
    assert len(raw) == 10
    assert decode_iccid(raw) == iccid


def test_iccid_is_swapped_nibble_with_f_padding() -> None:
    assert encode_iccid("8944476500001224158").hex().upper() == "984474560000214251F8"
    assert decode_iccid(bytes.fromhex("984474560000214251F8")) == "8944476500001224158"


single_tags = st.integers(0x01, 0xFE).filter(lambda t: t & 0x1F != 0x1F)
double_tags = st.tuples(st.integers(0, 7), st.integers(0x1F, 0x7F)).map(
    lambda t: ((t[0] << 5) | 0x1F) << 8 | t[1]
)


@settings(deadline=None)
@given(single_tags | double_tags, st.binary(max_size=700))
def test_tlv_round_trip(tag: int, value: bytes) -> None:
    encoded = tlv.encode(tag, value)
    item, end = tlv.decode_one(encoded)
    assert (item.tag, item.value, end) == (tag, value, len(encoded))


@settings(deadline=None)
@given(st.integers(-(2**40), 2**40))
def test_integer_round_trip(n: int) -> None:
    assert tlv.decode_int(tlv.encode_int(n)) == n


def test_truncated_and_indefinite_lengths_are_typed_errors() -> None:
    for bad in ("BF2D05A003", "5A", "BF", "BF2D80", "5A840000000001"):
        with pytest.raises(TlvError):
            tlv.decode_all(bytes.fromhex(bad))


@settings(deadline=None)
@given(st.lists(profiles, max_size=5))
def test_profiles_info_round_trip(items: list[ProfileInfo]) -> None:
    assert es10.decode_profiles_info(es10.encode_profiles_info(items)) == items


@settings(deadline=None)
@given(st.lists(metadata, max_size=5))
def test_list_notification_round_trip(items: list[NotificationMetadata]) -> None:
    assert es10.decode_list_notification(es10.encode_list_notification(items)) == items


@settings(deadline=None)
@given(st.lists(st.tuples(metadata, st.binary(max_size=64)), max_size=4))
def test_retrieve_notifications_round_trip(items: list[tuple[NotificationMetadata, bytes]]) -> None:
    pending = [
        PendingNotification(metadata=m, raw=es10.other_signed_notification(m, sig).hex().upper())
        for m, sig in items
    ]
    assert (
        es10.decode_retrieve_notifications(es10.encode_retrieve_notifications(pending)) == pending
    )


@settings(deadline=None)
@given(info1)
def test_euicc_info1_round_trip(info: EuiccInfo1) -> None:
    assert es10.decode_euicc_info1(es10.encode_euicc_info1(info)) == info


@settings(deadline=None)
@given(info2)
def test_euicc_info2_round_trip(info: EuiccInfo2) -> None:
    assert es10.decode_euicc_info2(es10.encode_euicc_info2(info)) == info


@settings(deadline=None)
@given(st.binary(min_size=16, max_size=16).map(lambda b: b.hex().upper()))
def test_eid_round_trip(eid: str) -> None:
    assert es10.decode_eid(es10.encode_eid(eid)) == eid


@settings(deadline=None)
@given(
    st.sampled_from(
        ["EnableProfile", "DisableProfile", "DeleteProfile", "SetNickname", "NotificationSent"]
    ),
    st.integers(0, 127),
)
def test_result_round_trip(function: str, code: int) -> None:
    assert es10.decode_result(function, es10.encode_result(function, code)) == code


DECODERS: list[Callable[[bytes], Any]] = [
    es10.decode_eid,
    es10.decode_euicc_info1,
    es10.decode_euicc_info2,
    es10.decode_profiles_info,
    es10.decode_list_notification,
    es10.decode_retrieve_notifications,
    lambda b: es10.decode_result("EnableProfile", b),
    tlv.decode_all,
]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(DECODERS), st.binary(max_size=200))
def test_random_bytes_raise_only_typed_errors(decode: Callable[[bytes], Any], data: bytes) -> None:
    with contextlib.suppress(TlvError, Es10Error):
        decode(data)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(DECODERS[:-1]), st.binary(max_size=120))
def test_random_bodies_under_the_right_tag_raise_only_typed_errors(
    decode: Callable[[bytes], Any], body: bytes
) -> None:
    for tag in (0xBF3E, 0xBF20, 0xBF22, 0xBF2D, 0xBF28, 0xBF2B, 0xBF31):
        with contextlib.suppress(TlvError, Es10Error):
            decode(tlv.encode(tag, body))


def test_unknown_tags_are_skipped() -> None:
    profile = es10.encode_profile(ProfileInfo(iccid="8901234567890123456", state="enabled"))
    item, _ = tlv.decode_one(profile)
    # A future field (tag DF7F) and an unknown constructed item inside the profile and the list.
    noisy = tlv.encode(0xE3, tlv.encode(0xDF7F, b"\x01\x02") + item.value + tlv.encode(0xBF7A, b""))
    data = tlv.encode(
        0xBF2D, tlv.encode(0xA0, noisy + tlv.encode(0xE4, b"zz")) + tlv.encode(0x9F01, b"x")
    )
    [p] = es10.decode_profiles_info(data)
    assert (p.iccid, p.state) == ("8901234567890123456", "enabled")


def test_request_encodings_match_sgp22_examples() -> None:
    assert es10.get_eid_request().hex().upper() == "BF3E035C015A"
    assert es10.get_euicc_info1_request().hex().upper() == "BF2000"
    enable = es10.enable_profile_request("8944476500001224158", refresh=True).hex().upper()
    assert enable == "BF3111A00C5A0A984474560000214251F88101FF"
    disable = es10.disable_profile_request("8944476500001224158", refresh=False).hex().upper()
    assert disable == "BF3211A00C5A0A984474560000214251F8810100"
    assert es10.delete_profile_request("8944476500001224158").hex().upper() == (
        "BF330C5A0A984474560000214251F8"
    )
    assert es10.notification_sent_request(7).hex().upper() == "BF3003800107"


@pytest.mark.parametrize(
    ("function", "code", "reason"),
    [
        ("EnableProfile", 1, "iccidOrAidNotFound"),
        ("EnableProfile", 2, "profileNotInDisabledState"),
        ("EnableProfile", 3, "disallowedByPolicy"),
        ("EnableProfile", 4, "wrongProfileReenabling"),
        ("EnableProfile", 5, "catBusy"),
        ("EnableProfile", 127, "undefinedError"),
        ("DisableProfile", 2, "profileNotInEnabledState"),
        ("DeleteProfile", 2, "profileNotInDisabledState"),
        ("SetNickname", 1, "iccidNotFound"),
        ("NotificationSent", 1, "nothingToDelete"),
    ],
)
def test_result_codes_raise_es10_error_with_sgp22_names(
    function: str, code: int, reason: str
) -> None:
    with pytest.raises(Es10Error) as info:
        es10.check_result(
            function, es10.decode_result(function, es10.encode_result(function, code))
        )
    assert (info.value.function, info.value.code, info.value.reason) == (function, code, reason)


@settings(deadline=None)
@given(iccids, st.booleans(), st.text(max_size=20), st.integers(0, 2**31 - 1))
def test_requests_carry_their_arguments(iccid: str, refresh: bool, nick: str, seq: int) -> None:
    for tag, request in (
        (0xBF31, es10.enable_profile_request(iccid, refresh=refresh)),
        (0xBF32, es10.disable_profile_request(iccid, refresh=refresh)),
    ):
        [top] = tlv.decode_all(request)
        assert top.tag == tag
        ident = top.find(0xA0)
        flag = top.find(0x81)
        assert ident is not None
        assert flag is not None
        assert decode_iccid(ident.children()[0].value) == iccid
        assert flag.value == (b"\xff" if refresh else b"\x00")
    [delete] = tlv.decode_all(es10.delete_profile_request(iccid))
    assert decode_iccid(delete.children()[0].value) == iccid
    if len(nick.encode()) <= 64:
        [named] = tlv.decode_all(es10.set_nickname_request(iccid, nick))
        kids = named.children()
        assert decode_iccid(kids[0].value) == iccid
        assert kids[1].value.decode() == nick
    [sent] = tlv.decode_all(es10.notification_sent_request(seq))
    [number] = sent.children()
    assert tlv.decode_int(number.value) == seq
    [retrieve] = tlv.decode_all(es10.retrieve_notifications_request(seq))
    criteria = retrieve.find(0xA0)
    assert criteria is not None
    assert tlv.decode_int(criteria.children()[0].value) == seq
