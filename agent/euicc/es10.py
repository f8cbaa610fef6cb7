"""ES10 (SGP.22 §5.7) requests and responses as typed records; decoders skip unknown tags."""

from __future__ import annotations

from typing import Final

import msgspec

from agent.errors import Es10Error
from agent.euicc import tlv
from agent.euicc.iccid import decode_iccid, encode_iccid
from agent.euicc.tlv import Tlv, TlvError

TAG_EUICC_INFO1: Final = 0xBF20
TAG_EUICC_INFO2: Final = 0xBF22
TAG_LIST_NOTIFICATION: Final = 0xBF28
TAG_SET_NICKNAME: Final = 0xBF29
TAG_RETRIEVE_NOTIFICATIONS: Final = 0xBF2B
TAG_PROFILES_INFO: Final = 0xBF2D
TAG_NOTIFICATION_METADATA: Final = 0xBF2F
TAG_NOTIFICATION_SENT: Final = 0xBF30
TAG_ENABLE: Final = 0xBF31
TAG_DISABLE: Final = 0xBF32
TAG_DELETE: Final = 0xBF33
TAG_EUICC_DATA: Final = 0xBF3E

TAG_ICCID: Final = 0x5A
TAG_AID: Final = 0x4F
TAG_TAG_LIST: Final = 0x5C
TAG_PROFILE_INFO: Final = 0xE3

PROFILE_CLASSES: Final = ("test", "provisioning", "operational")
PROFILE_STATES: Final = ("disabled", "enabled")
# NotificationEvent BIT STRING: bit 0 install, 1 enable, 2 disable, 3 delete
OPERATIONS: Final = ("install", "enable", "disable", "delete")

RESULT_NAMES: Final[dict[str, dict[int, str]]] = {
    "EnableProfile": {
        1: "iccidOrAidNotFound",
        2: "profileNotInDisabledState",
        3: "disallowedByPolicy",
        4: "wrongProfileReenabling",
        5: "catBusy",
    },
    "DisableProfile": {
        1: "iccidOrAidNotFound",
        2: "profileNotInEnabledState",
        3: "disallowedByPolicy",
        5: "catBusy",
    },
    "DeleteProfile": {
        1: "iccidOrAidNotFound",
        2: "profileNotInDisabledState",
        3: "disallowedByPolicy",
    },
    "SetNickname": {1: "iccidNotFound"},
    "NotificationSent": {1: "nothingToDelete"},
    "GetProfilesInfo": {1: "incorrectInput"},
    "ListNotification": {},
    "RetrieveNotificationsList": {1: "noResult"},
}
_FUNCTION_TAGS: Final = {
    "EnableProfile": TAG_ENABLE,
    "DisableProfile": TAG_DISABLE,
    "DeleteProfile": TAG_DELETE,
    "SetNickname": TAG_SET_NICKNAME,
    "NotificationSent": TAG_NOTIFICATION_SENT,
}
# Tags asked of GetProfilesInfo: everything a listing shows, not the icon (it can be kilobytes).
PROFILE_TAG_LIST: Final = bytes.fromhex("5A4F9F7090919295")


def result_reason(function: str, code: int) -> str:
    """SGP.22's name for a result code of function; 127 and unknown codes are undefinedError."""
    if code == 0:
        return "ok"
    return RESULT_NAMES.get(function, {}).get(code, "undefinedError")


def check_result(function: str, code: int) -> None:
    """Raise Es10Error unless code is 0."""
    if code != 0:
        raise Es10Error(function, code, result_reason(function, code))


# ---------------------------------------------------------------- records


class ProfileInfo(msgspec.Struct, kw_only=True):
    """One profile as `profile list --json` shows it; fields the card omits are None."""

    iccid: str | None = None
    isdp_aid: str | None = None
    state: str | None = None
    nickname: str | None = None
    service_provider_name: str | None = None
    profile_name: str | None = None
    profile_class: str | None = None


class EuiccInfo1(msgspec.Struct, kw_only=True):
    """GetEUICCInfo1: SGP.22 version and the CI key ids the card trusts."""

    svn: str | None = None
    ci_pki_ids_verification: list[str] = msgspec.field(default_factory=list)
    ci_pki_ids_signing: list[str] = msgspec.field(default_factory=list)


class EuiccInfo2(msgspec.Struct, kw_only=True):
    """GetEUICCInfo2, the fields an operator asks about."""

    profile_version: str | None = None
    svn: str | None = None
    firmware_version: str | None = None
    installed_applications: int | None = None
    free_nvm: int | None = None
    free_vm: int | None = None
    ts102241_version: str | None = None
    globalplatform_version: str | None = None
    ci_pki_ids_verification: list[str] = msgspec.field(default_factory=list)
    ci_pki_ids_signing: list[str] = msgspec.field(default_factory=list)
    pp_version: str | None = None
    sas_accreditation_number: str | None = None


class NotificationMetadata(msgspec.Struct, kw_only=True):
    """A queued notification: what `notification list --json` shows."""

    seq_number: int
    profile_management_operation: str | None = None
    notification_address: str | None = None
    iccid: str | None = None


class PendingNotification(msgspec.Struct, kw_only=True):
    """A signed notification ready for the SM-DP+; raw is the whole TLV to send (hex)."""

    metadata: NotificationMetadata
    raw: str


# ---------------------------------------------------------------- small helpers


def _version(value: bytes) -> str:
    return ".".join(str(b) for b in value)


def _encode_version(text: str) -> bytes:
    return bytes(int(p) for p in text.split("."))


def _utf8(value: bytes) -> str:
    return value.decode("utf-8", "replace")


def _top(data: bytes, tag: int) -> Tlv:
    items = tlv.decode_all(data)
    if not items:
        raise TlvError(f"empty ES10 response, expected {tag:X}", data)
    head = items[0]
    if head.tag != tag:
        raise TlvError(f"ES10 response tag {head.tag:X}, expected {tag:X}", data)
    return head


def _result_of(data: bytes, tag: int) -> int:
    """The INTEGER result of a `[n] SEQUENCE { result INTEGER }` response (80 or 02 accepted)."""
    for child in _top(data, tag).children():
        if child.tag in (0x80, 0x02):
            return tlv.decode_int(child.value)
    raise TlvError(f"no result code in {tag:X}", data)


def _key_ids(item: Tlv | None) -> list[str]:
    if item is None:
        return []
    return [c.value.hex().upper() for c in item.children() if c.tag == 0x04]


def _encode_key_ids(tag: int, ids: list[str]) -> bytes:
    return tlv.encode(tag, b"".join(tlv.encode(0x04, bytes.fromhex(i)) for i in ids))


def _operation(value: bytes) -> str | None:
    """Decode a NotificationEvent BIT STRING (first byte: unused bits) to its single set bit."""
    if len(value) < 2:
        return None
    bits = int.from_bytes(value[1:], "big")
    width = 8 * (len(value) - 1)
    for i, name in enumerate(OPERATIONS):
        if i < width and bits >> (width - 1 - i) & 1:
            return name
    return None


def _encode_operation(name: str) -> bytes:
    bit = OPERATIONS.index(name)
    return bytes([7 - bit, 0x80 >> bit])


def _profile_id(iccid: str | None = None, isdp_aid: str | None = None) -> bytes:
    if iccid is not None:
        return tlv.encode(TAG_ICCID, encode_iccid(iccid))
    if isdp_aid is not None:
        return tlv.encode(TAG_AID, bytes.fromhex(isdp_aid))
    raise ValueError("iccid or isdp_aid is required")


# ---------------------------------------------------------------- requests


def get_eid_request() -> bytes:
    """GetEuiccDataRequest asking for the EID (BF3E035C015A)."""
    return tlv.encode(TAG_EUICC_DATA, tlv.encode(TAG_TAG_LIST, b"\x5a"))


def get_euicc_info1_request() -> bytes:
    """GetEuiccInfo1Request (BF2000)."""
    return tlv.encode(TAG_EUICC_INFO1)


def get_euicc_info2_request() -> bytes:
    """GetEuiccInfo2Request (BF2200)."""
    return tlv.encode(TAG_EUICC_INFO2)


def get_profiles_info_request(
    iccid: str | None = None, tag_list: bytes | None = PROFILE_TAG_LIST
) -> bytes:
    """ProfileInfoListRequest, optionally searching one ICCID."""
    body = b""
    if iccid is not None:
        body += tlv.encode(0xA0, _profile_id(iccid))
    if tag_list is not None:
        body += tlv.encode(TAG_TAG_LIST, tag_list)
    return tlv.encode(TAG_PROFILES_INFO, body)


def enable_profile_request(
    iccid: str | None = None, *, isdp_aid: str | None = None, refresh: bool = True
) -> bytes:
    """EnableProfileRequest: A0 { 5A | 4F }, refreshFlag as [1] (81) under AUTOMATIC TAGS."""
    body = tlv.encode(0xA0, _profile_id(iccid, isdp_aid)) + tlv.encode(
        0x81, b"\xff" if refresh else b"\x00"
    )
    return tlv.encode(TAG_ENABLE, body)


def disable_profile_request(
    iccid: str | None = None, *, isdp_aid: str | None = None, refresh: bool = True
) -> bytes:
    """DisableProfileRequest, same shape as enable."""
    body = tlv.encode(0xA0, _profile_id(iccid, isdp_aid)) + tlv.encode(
        0x81, b"\xff" if refresh else b"\x00"
    )
    return tlv.encode(TAG_DISABLE, body)


def delete_profile_request(iccid: str | None = None, *, isdp_aid: str | None = None) -> bytes:
    """DeleteProfileRequest: a CHOICE, so the identifier sits directly in BF33."""
    return tlv.encode(TAG_DELETE, _profile_id(iccid, isdp_aid))


def set_nickname_request(iccid: str, nickname: str) -> bytes:
    """SetNicknameRequest: iccid and [16] profileNickname (90), at most 64 bytes of UTF-8."""
    raw = nickname.encode("utf-8")
    if len(raw) > 64:
        raise ValueError("nickname is limited to 64 bytes of UTF-8")
    return tlv.encode(TAG_SET_NICKNAME, _profile_id(iccid) + tlv.encode(0x90, raw))


def list_notification_request(operation: str | None = None) -> bytes:
    """ListNotificationRequest, optionally filtered by operation."""
    body = tlv.encode(0x81, _encode_operation(operation)) if operation else b""
    return tlv.encode(TAG_LIST_NOTIFICATION, body)


def retrieve_notifications_request(seq_number: int | None = None) -> bytes:
    """RetrieveNotificationsListRequest, optionally for one sequence number."""
    body = b""
    if seq_number is not None:
        body = tlv.encode(0xA0, tlv.encode(0x80, tlv.encode_int(seq_number)))
    return tlv.encode(TAG_RETRIEVE_NOTIFICATIONS, body)


def notification_sent_request(seq_number: int) -> bytes:
    """NotificationSentRequest: removes one notification from the card's list."""
    return tlv.encode(TAG_NOTIFICATION_SENT, tlv.encode(0x80, tlv.encode_int(seq_number)))


# ---------------------------------------------------------------- responses: decode


def decode_eid(data: bytes) -> str:
    """GetEuiccDataResponse -> the EID as 32 hex digits."""
    item = _top(data, TAG_EUICC_DATA).find(0x5A)
    if item is None:
        raise TlvError("no EID in GetEuiccData response", data)
    return item.value.hex().upper()


def decode_euicc_info1(data: bytes) -> EuiccInfo1:
    """EUICCInfo1."""
    head = _top(data, TAG_EUICC_INFO1)
    kids = head.children()
    svn = tlv.find(kids, 0x82)
    return EuiccInfo1(
        svn=_version(svn.value) if svn else None,
        ci_pki_ids_verification=_key_ids(tlv.find(kids, 0xA9)),
        ci_pki_ids_signing=_key_ids(tlv.find(kids, 0xAA)),
    )


def _decode_ext_card_resource(value: bytes) -> tuple[int | None, int | None, int | None]:
    """extCardResource is an OCTET STRING holding TLVs (ETSI TS 102 226 §8.2.1.3.2)."""
    out: dict[int, int] = {}
    for item in tlv.iter_tlvs(value):
        if item.tag in (0x81, 0x82, 0x83) and item.value:
            out[item.tag] = int.from_bytes(item.value, "big")
    return out.get(0x81), out.get(0x82), out.get(0x83)


def decode_euicc_info2(data: bytes) -> EuiccInfo2:
    """EUICCInfo2."""
    kids = _top(data, TAG_EUICC_INFO2).children()
    info = EuiccInfo2()
    for item in kids:
        if item.tag == 0x81:
            info.profile_version = _version(item.value)
        elif item.tag == 0x82:
            info.svn = _version(item.value)
        elif item.tag == 0x83:
            info.firmware_version = _version(item.value)
        elif item.tag == 0x84:
            apps, nvm, vm = _decode_ext_card_resource(item.value)
            info.installed_applications, info.free_nvm, info.free_vm = apps, nvm, vm
        elif item.tag == 0x86:
            info.ts102241_version = _version(item.value)
        elif item.tag == 0x87:
            info.globalplatform_version = _version(item.value)
        elif item.tag == 0xA9:
            info.ci_pki_ids_verification = _key_ids(item)
        elif item.tag == 0xAA:
            info.ci_pki_ids_signing = _key_ids(item)
        elif item.tag == 0x04:
            info.pp_version = _version(item.value)
        elif item.tag == 0x0C:
            info.sas_accreditation_number = _utf8(item.value)
    return info


def _decode_profile(item: Tlv) -> ProfileInfo:
    # profileClass is DEFAULT operational in SGP.22: a DER-encoding card leaves it out.
    p = ProfileInfo(profile_class="operational")
    for f in item.children():
        if f.tag == TAG_ICCID:
            p.iccid = decode_iccid(f.value)
        elif f.tag == TAG_AID:
            p.isdp_aid = f.value.hex().upper()
        elif f.tag == 0x9F70 and f.value:
            p.state = PROFILE_STATES[1] if f.value[-1] == 1 else PROFILE_STATES[0]
        elif f.tag == 0x90:
            p.nickname = _utf8(f.value)
        elif f.tag == 0x91:
            p.service_provider_name = _utf8(f.value)
        elif f.tag == 0x92:
            p.profile_name = _utf8(f.value)
        elif f.tag == 0x95 and f.value:
            idx = tlv.decode_int(f.value)
            p.profile_class = PROFILE_CLASSES[idx] if 0 <= idx < len(PROFILE_CLASSES) else None
    return p


def decode_profiles_info(data: bytes) -> list[ProfileInfo]:
    """ProfileInfoListResponse -> profiles; an error choice raises Es10Error."""
    kids = _top(data, TAG_PROFILES_INFO).children()
    for item in kids:
        if item.tag == 0xA0:
            return [_decode_profile(p) for p in item.children() if p.tag == TAG_PROFILE_INFO]
        if item.tag in (0x02, 0x81):
            check_result("GetProfilesInfo", tlv.decode_int(item.value))
    # Some cards put the E3 items directly under BF2D.
    return [_decode_profile(p) for p in kids if p.tag == TAG_PROFILE_INFO]


def decode_result(function: str, data: bytes) -> int:
    """The result code of Enable/Disable/Delete/SetNickname/NotificationSent (not checked)."""
    return _result_of(data, _FUNCTION_TAGS[function])


def _decode_metadata(item: Tlv) -> NotificationMetadata:
    seq: int | None = None
    meta = NotificationMetadata(seq_number=0)
    for f in item.children():
        if f.tag == 0x80:
            seq = tlv.decode_int(f.value)
        elif f.tag == 0x81:
            meta.profile_management_operation = _operation(f.value)
        elif f.tag == 0x0C:
            meta.notification_address = _utf8(f.value)
        elif f.tag == TAG_ICCID:
            meta.iccid = decode_iccid(f.value)
    if seq is None:
        raise TlvError("notification without seqNumber", item.value)
    meta.seq_number = seq
    return meta


def decode_list_notification(data: bytes) -> list[NotificationMetadata]:
    """ListNotificationResponse -> metadata list; the error choice raises Es10Error."""
    for item in _top(data, TAG_LIST_NOTIFICATION).children():
        if item.tag == 0xA0:
            return [
                _decode_metadata(m) for m in item.children() if m.tag == TAG_NOTIFICATION_METADATA
            ]
        if item.tag in (0x02, 0x81):
            check_result("ListNotification", tlv.decode_int(item.value))
    return []


def _find_metadata(item: Tlv, depth: int = 0) -> Tlv | None:
    """The NotificationMetadata inside a PendingNotification (a few levels deep at most)."""
    if item.tag == TAG_NOTIFICATION_METADATA:
        return item
    if not item.constructed or depth >= 4:
        return None
    for child in item.children():
        found = _find_metadata(child, depth + 1)
        if found is not None:
            return found
    return None


def decode_retrieve_notifications(data: bytes) -> list[PendingNotification]:
    """RetrieveNotificationsListResponse -> signed notifications (install results included)."""
    out: list[PendingNotification] = []
    for item in _top(data, TAG_RETRIEVE_NOTIFICATIONS).children():
        if item.tag == 0xA0:
            for pending in item.children():
                meta = _find_metadata(pending)
                if meta is None:
                    continue
                raw = tlv.encode(pending.tag, pending.value).hex().upper()
                out.append(PendingNotification(metadata=_decode_metadata(meta), raw=raw))
        elif item.tag == 0x81:
            code = tlv.decode_int(item.value)
            if code == 1:  # noResult: nothing matches, not a failure
                return []
            check_result("RetrieveNotificationsList", code)
    return out


# ---------------------------------------------------------------- responses: encode (card side, tests)


def encode_eid(eid: str) -> bytes:
    """GetEuiccDataResponse."""
    return tlv.encode(TAG_EUICC_DATA, tlv.encode(0x5A, bytes.fromhex(eid)))


def encode_euicc_info1(info: EuiccInfo1) -> bytes:
    """EUICCInfo1."""
    body = b""
    if info.svn is not None:
        body += tlv.encode(0x82, _encode_version(info.svn))
    body += _encode_key_ids(0xA9, info.ci_pki_ids_verification)
    body += _encode_key_ids(0xAA, info.ci_pki_ids_signing)
    return tlv.encode(TAG_EUICC_INFO1, body)


def _uint(n: int) -> bytes:
    return n.to_bytes(max(1, (n.bit_length() + 7) // 8), "big")


def encode_euicc_info2(info: EuiccInfo2) -> bytes:
    """EUICCInfo2 (only the fields EuiccInfo2 models)."""
    parts: list[bytes] = []
    for tag, version in (
        (0x81, info.profile_version),
        (0x82, info.svn),
        (0x83, info.firmware_version),
    ):
        if version is not None:
            parts.append(tlv.encode(tag, _encode_version(version)))
    ext = b""
    for tag, n in (
        (0x81, info.installed_applications),
        (0x82, info.free_nvm),
        (0x83, info.free_vm),
    ):
        if n is not None:
            ext += tlv.encode(tag, _uint(n))
    parts.append(tlv.encode(0x84, ext))
    parts.append(tlv.encode(0x85, b"\x02\x00\x00"))
    for tag, version in ((0x86, info.ts102241_version), (0x87, info.globalplatform_version)):
        if version is not None:
            parts.append(tlv.encode(tag, _encode_version(version)))
    parts.append(tlv.encode(0x88, b"\x06\x00"))
    parts.append(_encode_key_ids(0xA9, info.ci_pki_ids_verification))
    parts.append(_encode_key_ids(0xAA, info.ci_pki_ids_signing))
    if info.pp_version is not None:
        parts.append(tlv.encode(0x04, _encode_version(info.pp_version)))
    if info.sas_accreditation_number is not None:
        parts.append(tlv.encode(0x0C, info.sas_accreditation_number.encode("utf-8")))
    return tlv.encode(TAG_EUICC_INFO2, b"".join(parts))


def encode_profile(p: ProfileInfo) -> bytes:
    """One ProfileInfo (E3)."""
    body = b""
    if p.iccid is not None:
        body += tlv.encode(TAG_ICCID, encode_iccid(p.iccid))
    if p.isdp_aid is not None:
        body += tlv.encode(TAG_AID, bytes.fromhex(p.isdp_aid))
    if p.state is not None:
        body += tlv.encode(0x9F70, bytes([PROFILE_STATES.index(p.state)]))
    for tag, text in (
        (0x90, p.nickname),
        (0x91, p.service_provider_name),
        (0x92, p.profile_name),
    ):
        if text is not None:
            body += tlv.encode(tag, text.encode("utf-8"))
    if p.profile_class is not None:
        body += tlv.encode(0x95, bytes([PROFILE_CLASSES.index(p.profile_class)]))
    return tlv.encode(TAG_PROFILE_INFO, body)


def encode_profiles_info(profiles: list[ProfileInfo]) -> bytes:
    """ProfileInfoListResponse (ok choice)."""
    return tlv.encode(
        TAG_PROFILES_INFO, tlv.encode(0xA0, b"".join(encode_profile(p) for p in profiles))
    )


def encode_result(function: str, code: int) -> bytes:
    """A `[n] SEQUENCE { result [0] INTEGER }` response."""
    return tlv.encode(_FUNCTION_TAGS[function], tlv.encode(0x80, tlv.encode_int(code)))


def encode_metadata(m: NotificationMetadata) -> bytes:
    """NotificationMetadata (BF2F)."""
    body = tlv.encode(0x80, tlv.encode_int(m.seq_number))
    if m.profile_management_operation is not None:
        body += tlv.encode(0x81, _encode_operation(m.profile_management_operation))
    if m.notification_address is not None:
        body += tlv.encode(0x0C, m.notification_address.encode("utf-8"))
    if m.iccid is not None:
        body += tlv.encode(TAG_ICCID, encode_iccid(m.iccid))
    return tlv.encode(TAG_NOTIFICATION_METADATA, body)


def encode_list_notification(items: list[NotificationMetadata]) -> bytes:
    """ListNotificationResponse (ok choice)."""
    return tlv.encode(
        TAG_LIST_NOTIFICATION, tlv.encode(0xA0, b"".join(encode_metadata(m) for m in items))
    )


def encode_retrieve_notifications(items: list[PendingNotification]) -> bytes:
    """RetrieveNotificationsListResponse from already-encoded pending notifications."""
    return tlv.encode(
        TAG_RETRIEVE_NOTIFICATIONS, tlv.encode(0xA0, b"".join(bytes.fromhex(p.raw) for p in items))
    )


def other_signed_notification(meta: NotificationMetadata, signature: bytes) -> bytes:
    """OtherSignedNotification: metadata, 5F37 signature, then the two certificates (stubs)."""
    return tlv.encode(
        0x30,
        encode_metadata(meta)
        + tlv.encode(0x5F37, signature)
        + tlv.encode(0x30, b"")
        + tlv.encode(0x30, b""),
    )
