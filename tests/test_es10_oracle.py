"""The ES10 codec and the emulated eUICC checked against an independent ASN.1 implementation.

tests/asn1/sgp22_es10.asn is written from SGP.22's RSPDefinitions; asn1tools compiles it. Our
encoder's bytes must decode there to the values we meant, and asn1tools' encodings must decode
with ours to the values asn1tools was given. The emulated card is held to the same definitions.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import asn1tools
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.errors import Es10Error
from agent.euicc import es10
from agent.euicc.apdu import store_data
from agent.euicc.transport import ISD_R_AID
from hw_fixtures.card_api import ProfileSpec
from hw_fixtures.euicc import EmulatedEuicc

SPEC = asn1tools.compile_files(str(Path(__file__).parent / "asn1/sgp22_es10.asn"), "der")

CLASSES = ("test", "provisioning", "operational")
STATES = ("disabled", "enabled")
OPERATIONS = ("install", "enable", "disable", "delete")


# ------------------------------------------------------------------ independent helpers


def bcd_iccid(raw: bytes) -> str:
    """Swapped-nibble BCD to digits, F padding dropped (SGP.22 Iccid), written apart from ours."""
    return "".join(f"{b & 0x0F:X}{b >> 4:X}" for b in raw).rstrip("F")


def iccid_bcd(digits: str) -> bytes:
    padded = digits + "F" * (20 - len(digits))
    return bytes(int(padded[i + 1] + padded[i], 16) for i in range(0, 20, 2))


def event_bits(op: str) -> tuple[bytes, int]:
    """asn1tools' BIT STRING value for a NotificationEvent with one named bit set (DER form)."""
    bit = OPERATIONS.index(op)
    return bytes([0x80 >> bit]), bit + 1


def event_name(value: tuple[bytes, int]) -> str | None:
    data, width = value
    for i, name in enumerate(OPERATIONS):
        if i < width and data[i // 8] & (0x80 >> (i % 8)):
            return name
    return None


# ------------------------------------------------------------------ strategies

iccids = st.text("0123456789", min_size=16, max_size=18).map(lambda s: "89" + s)
aids = st.binary(min_size=16, max_size=16).map(lambda b: b.hex().upper())


def utf8_up_to(n: int) -> st.SearchStrategy[str]:
    return st.text(max_size=n).filter(lambda s: len(s.encode("utf-8")) <= n)


profiles = st.builds(
    es10.ProfileInfo,
    iccid=iccids,
    isdp_aid=st.none() | aids,
    state=st.sampled_from(STATES),
    nickname=st.none() | utf8_up_to(64),
    service_provider_name=st.none() | utf8_up_to(32),
    profile_name=st.none() | utf8_up_to(64),
    profile_class=st.sampled_from(CLASSES),
)
metadata = st.builds(
    es10.NotificationMetadata,
    seq_number=st.integers(min_value=0, max_value=2**31 - 1),
    profile_management_operation=st.sampled_from(OPERATIONS),
    notification_address=st.text("abcdefghijklmnopqrstuvwxyz0123456789.-", min_size=1, max_size=40),
    iccid=st.none() | iccids,
)
versions = st.tuples(*(st.integers(0, 255),) * 3).map(lambda t: ".".join(map(str, t)))
key_ids = st.lists(st.binary(min_size=20, max_size=20).map(lambda b: b.hex().upper()), max_size=3)


def profile_from_oracle(d: dict[str, Any]) -> es10.ProfileInfo:
    return es10.ProfileInfo(
        iccid=bcd_iccid(d["iccid"]) if "iccid" in d else None,
        isdp_aid=d["isdpAid"].hex().upper() if "isdpAid" in d else None,
        state=STATES[d["profileState"]] if "profileState" in d else None,
        nickname=d.get("profileNickname"),
        service_provider_name=d.get("serviceProviderName"),
        profile_name=d.get("profileName"),
        profile_class=CLASSES[d.get("profileClass", 2)],
    )


def profile_to_oracle(p: es10.ProfileInfo) -> dict[str, Any]:
    d: dict[str, Any] = {}
    if p.iccid is not None:
        d["iccid"] = iccid_bcd(p.iccid)
    if p.isdp_aid is not None:
        d["isdpAid"] = bytes.fromhex(p.isdp_aid)
    if p.state is not None:
        d["profileState"] = STATES.index(p.state)
    for key, value in (
        ("profileNickname", p.nickname),
        ("serviceProviderName", p.service_provider_name),
        ("profileName", p.profile_name),
    ):
        if value is not None:
            d[key] = value
    if p.profile_class is not None:
        d["profileClass"] = CLASSES.index(p.profile_class)
    return d


# ------------------------------------------------------------------ requests: ours -> oracle


@given(iccid=iccids, refresh=st.booleans())
def test_enable_and_disable_requests_decode_in_the_oracle(iccid: str, refresh: bool) -> None:
    for name, encode in (
        ("EnableProfileRequest", es10.enable_profile_request),
        ("DisableProfileRequest", es10.disable_profile_request),
    ):
        got = SPEC.decode(name, encode(iccid, refresh=refresh))
        assert got == {"profileIdentifier": ("iccid", iccid_bcd(iccid)), "refreshFlag": refresh}


@given(aid=aids, refresh=st.booleans())
def test_requests_by_isdp_aid_decode_in_the_oracle(aid: str, refresh: bool) -> None:
    got = SPEC.decode("EnableProfileRequest", es10.enable_profile_request(isdp_aid=aid))
    assert got["profileIdentifier"] == ("isdpAid", bytes.fromhex(aid))
    got = SPEC.decode("DeleteProfileRequest", es10.delete_profile_request(isdp_aid=aid))
    assert got == ("isdpAid", bytes.fromhex(aid))


@given(iccid=iccids, nickname=utf8_up_to(64))
def test_delete_and_nickname_requests_decode_in_the_oracle(iccid: str, nickname: str) -> None:
    assert SPEC.decode("DeleteProfileRequest", es10.delete_profile_request(iccid)) == (
        "iccid",
        iccid_bcd(iccid),
    )
    got = SPEC.decode("SetNicknameRequest", es10.set_nickname_request(iccid, nickname))
    assert got == {"iccid": iccid_bcd(iccid), "profileNickname": nickname}


@given(op=st.none() | st.sampled_from(OPERATIONS), seq=st.integers(0, 2**31 - 1))
def test_notification_requests_decode_in_the_oracle(op: str | None, seq: int) -> None:
    got = SPEC.decode("ListNotificationRequest", es10.list_notification_request(op))
    assert got == ({} if op is None else {"profileManagementOperation": event_bits(op)})
    got = SPEC.decode("NotificationSentRequest", es10.notification_sent_request(seq))
    assert got == {"seqNumber": seq}


@given(iccid=st.none() | iccids)
def test_profiles_info_and_eid_requests_decode_in_the_oracle(iccid: str | None) -> None:
    got = SPEC.decode("ProfileInfoListRequest", es10.get_profiles_info_request(iccid))
    assert got["tagList"] == es10.PROFILE_TAG_LIST
    assert got.get("searchCriteria") == (None if iccid is None else ("iccid", iccid_bcd(iccid)))
    assert SPEC.decode("GetEuiccDataRequest", es10.get_eid_request()) == {"tagList": b"\x5a"}
    assert SPEC.decode("GetEuiccInfo1Request", es10.get_euicc_info1_request()) == {}


# ------------------------------------------------------------------ responses: both ways


@settings(max_examples=60)
@given(st.lists(profiles, max_size=4))
def test_profile_lists_agree_both_ways(items: list[es10.ProfileInfo]) -> None:
    kind, decoded = SPEC.decode("ProfileInfoListResponse", es10.encode_profiles_info(items))
    assert kind == "profileInfoListOk"
    assert [profile_from_oracle(d) for d in decoded] == items
    theirs = SPEC.encode(
        "ProfileInfoListResponse", ("profileInfoListOk", [profile_to_oracle(p) for p in items])
    )
    assert es10.decode_profiles_info(theirs) == items


@given(st.lists(profiles, min_size=1, max_size=2))
def test_profile_class_left_out_means_operational(items: list[es10.ProfileInfo]) -> None:
    # SGP.22: profileClass DEFAULT operational; a DER encoder leaves the default out.
    bare = [{k: v for k, v in profile_to_oracle(p).items() if k != "profileClass"} for p in items]
    theirs = SPEC.encode("ProfileInfoListResponse", ("profileInfoListOk", bare))
    assert {p.profile_class for p in es10.decode_profiles_info(theirs)} == {"operational"}


def test_profile_list_error_choice_is_read() -> None:
    theirs = SPEC.encode("ProfileInfoListResponse", ("profileInfoListError", 1))
    with pytest.raises(Es10Error, match="incorrectInput"):
        es10.decode_profiles_info(theirs)


@pytest.mark.parametrize(
    ("function", "asn1_type", "field"),
    [
        ("EnableProfile", "EnableProfileResponse", "enableResult"),
        ("DisableProfile", "DisableProfileResponse", "disableResult"),
        ("DeleteProfile", "DeleteProfileResponse", "deleteResult"),
        ("SetNickname", "SetNicknameResponse", "setNicknameResult"),
        ("NotificationSent", "NotificationSentResponse", "deleteNotificationStatus"),
    ],
)
@given(code=st.sampled_from([0, 1, 2, 3, 4, 5, 127]))
def test_result_codes_agree_both_ways(function: str, asn1_type: str, field: str, code: int) -> None:
    assert SPEC.decode(asn1_type, es10.encode_result(function, code)) == {field: code}
    assert es10.decode_result(function, SPEC.encode(asn1_type, {field: code})) == code


@given(st.lists(metadata, max_size=4))
def test_notification_lists_agree_both_ways(items: list[es10.NotificationMetadata]) -> None:
    kind, decoded = SPEC.decode("ListNotificationResponse", es10.encode_list_notification(items))
    assert kind == "notificationMetadataList"
    assert [
        es10.NotificationMetadata(
            seq_number=d["seqNumber"],
            profile_management_operation=event_name(d["profileManagementOperation"]),
            notification_address=d["notificationAddress"],
            iccid=bcd_iccid(d["iccid"]) if "iccid" in d else None,
        )
        for d in decoded
    ] == items
    theirs = SPEC.encode(
        "ListNotificationResponse",
        (
            "notificationMetadataList",
            [
                {
                    "seqNumber": m.seq_number,
                    "profileManagementOperation": event_bits(m.profile_management_operation or ""),
                    "notificationAddress": m.notification_address or "",
                    **({"iccid": iccid_bcd(m.iccid)} if m.iccid else {}),
                }
                for m in items
            ],
        ),
    )
    assert es10.decode_list_notification(theirs) == items


@given(eid=st.binary(min_size=16, max_size=16), svn=versions, ver=key_ids, sig=key_ids)
def test_eid_and_euicc_info1_agree_both_ways(
    eid: bytes, svn: str, ver: list[str], sig: list[str]
) -> None:
    assert SPEC.decode("GetEuiccDataResponse", es10.encode_eid(eid.hex())) == {"eidValue": eid}
    assert (
        es10.decode_eid(SPEC.encode("GetEuiccDataResponse", {"eidValue": eid})) == eid.hex().upper()
    )
    info = es10.EuiccInfo1(svn=svn, ci_pki_ids_verification=ver, ci_pki_ids_signing=sig)
    oracle = {
        "svn": bytes(int(p) for p in svn.split(".")),
        "euiccCiPKIdListForVerification": [bytes.fromhex(k) for k in ver],
        "euiccCiPKIdListForSigning": [bytes.fromhex(k) for k in sig],
    }
    assert SPEC.decode("EUICCInfo1", es10.encode_euicc_info1(info)) == oracle
    assert es10.decode_euicc_info1(SPEC.encode("EUICCInfo1", oracle)) == info


# ------------------------------------------------------------------ the emulated eUICC

EID = "89049032123451234512345678901235"
HOME = "8944500102030405067"
AWAY = "89445001020304050689"


def _card() -> EmulatedEuicc:
    card = EmulatedEuicc(
        EID,
        [
            ProfileSpec(iccid=HOME, name="Home", provider="Home Mobile", enabled=True),
            ProfileSpec(iccid=AWAY, name="Away", nickname="trip", profile_class="test"),
        ],
    )
    card.max_response = 4096
    return card


def _ask(card: EmulatedEuicc, request: bytes) -> bytes:
    channel = card.open_channel(ISD_R_AID)

    async def transmit(apdu: bytes) -> bytes:
        return card.transmit(channel, apdu)

    try:
        return asyncio.run(store_data(transmit, request, channel))
    finally:
        card.close_channel(channel)


def test_emulated_card_answers_oracle_requests_in_oracle_form() -> None:
    card = _card()
    eid = SPEC.decode(
        "GetEuiccDataResponse", _ask(card, SPEC.encode("GetEuiccDataRequest", {"tagList": b"\x5a"}))
    )
    assert eid == {"eidValue": bytes.fromhex(EID)}
    info1 = SPEC.decode("EUICCInfo1", _ask(card, SPEC.encode("GetEuiccInfo1Request", {})))
    assert len(info1["svn"]) == 3

    listing = _ask(card, SPEC.encode("ProfileInfoListRequest", {}))
    kind, items = SPEC.decode("ProfileInfoListResponse", listing)
    assert kind == "profileInfoListOk"
    got = {
        bcd_iccid(d["iccid"]): (
            d["profileState"],
            d["profileName"],
            d.get("profileNickname"),
            d["profileClass"],
        )
        for d in items
    }
    assert got == {HOME: (1, "Home", None, 2), AWAY: (0, "Away", "trip", 0)}

    by_class = _ask(
        card, SPEC.encode("ProfileInfoListRequest", {"searchCriteria": ("profileClass", 0)})
    )
    assert [bcd_iccid(d["iccid"]) for d in SPEC.decode("ProfileInfoListResponse", by_class)[1]] == [
        AWAY
    ]

    enable = SPEC.encode(
        "EnableProfileRequest",
        {"profileIdentifier": ("iccid", iccid_bcd(AWAY)), "refreshFlag": True},
    )
    assert SPEC.decode("EnableProfileResponse", _ask(card, enable)) == {"enableResult": 0}
    assert SPEC.decode("EnableProfileResponse", _ask(card, enable)) == {"enableResult": 2}
    nick = SPEC.encode("SetNicknameRequest", {"iccid": iccid_bcd(HOME), "profileNickname": "home"})
    assert SPEC.decode("SetNicknameResponse", _ask(card, nick)) == {"setNicknameResult": 0}
    delete = SPEC.encode("DeleteProfileRequest", ("iccid", iccid_bcd(HOME)))
    assert SPEC.decode("DeleteProfileResponse", _ask(card, delete)) == {"deleteResult": 0}

    kind, notes = SPEC.decode(
        "ListNotificationResponse", _ask(card, SPEC.encode("ListNotificationRequest", {}))
    )
    assert [
        (n["seqNumber"], event_name(n["profileManagementOperation"]), bcd_iccid(n["iccid"]))
        for n in notes
    ] == [
        (1, "disable", HOME),
        (2, "enable", AWAY),
        (3, "delete", HOME),
    ]
    only_enable = SPEC.encode(
        "ListNotificationRequest", {"profileManagementOperation": event_bits("enable")}
    )
    assert [
        n["seqNumber"] for n in SPEC.decode("ListNotificationResponse", _ask(card, only_enable))[1]
    ] == [2]
    sent = SPEC.encode("NotificationSentRequest", {"seqNumber": 2})
    assert SPEC.decode("NotificationSentResponse", _ask(card, sent)) == {
        "deleteNotificationStatus": 0
    }
    assert SPEC.decode("NotificationSentResponse", _ask(card, sent)) == {
        "deleteNotificationStatus": 1
    }
