"""ES10b for profile download (SGP.22 §5.7.1-5.7.14): requests, responses, BPP segmentation.

Tags follow RSPDefinitions. AUTOMATIC TAGS applies to a SEQUENCE only when none of its
components is tagged, so AuthenticateServerRequest (it holds [APPLICATION 55]) keeps universal
tags (30, 04) for its untagged components, while CancelSessionRequest gets [0], [1] (80, 81).
Signed blobs that come from the SM-DP+ (serverSigned1, smdpSigned2, ...) are passed through as
the bytes received: re-encoding them would break their signatures.
"""

from __future__ import annotations

import hashlib
from enum import IntEnum
from typing import Final

import msgspec

from agent.errors import Es10Error
from agent.euicc import tlv
from agent.euicc.iccid import decode_iccid
from agent.euicc.tlv import Tlv, TlvError

TAG_EUICC_CHALLENGE: Final = 0xBF2E
TAG_AUTHENTICATE_SERVER: Final = 0xBF38
TAG_PREPARE_DOWNLOAD: Final = 0xBF21
TAG_BPP: Final = 0xBF36
TAG_INITIALISE_SECURE_CHANNEL: Final = 0xBF23
TAG_PROFILE_INSTALLATION_RESULT: Final = 0xBF37
TAG_PIR_DATA: Final = 0xBF27
TAG_CANCEL_SESSION: Final = 0xBF41
TAG_SIGNATURE: Final = 0x5F37  # [APPLICATION 55]
TAG_OTPK: Final = 0x5F49  # [APPLICATION 73]
TAG_NOTIFICATION_METADATA: Final = 0xBF2F

# BoundProfilePackage members (§2.5.4).
TAG_FIRST_87: Final = 0xA0
TAG_SEQ_88: Final = 0xA1
TAG_SECOND_87: Final = 0xA2
TAG_SEQ_86: Final = 0xA3


class CancelSessionReason(IntEnum):
    """CancelSessionReason (§5.7.14); the LPA sends these, the SM-DP+ receives them signed."""

    END_USER_REJECTION = 0
    POSTPONED = 1
    TIMEOUT = 2
    PPR_NOT_ALLOWED = 3
    METADATA_MISMATCH = 4
    LOAD_BPP_EXECUTION_ERROR = 5
    UNDEFINED = 127


AUTHENTICATE_ERRORS: Final = {
    1: "invalidCertificate",
    2: "invalidSignature",
    3: "unsupportedCurve",
    4: "noSessionContext",
    5: "invalidOid",
    6: "euiccChallengeMismatch",
    7: "ciPKUnknown",
}
DOWNLOAD_ERRORS: Final = {
    1: "invalidCertificate",
    2: "invalidSignature",
    3: "unsupportedCurve",
    4: "noSessionContext",
    5: "invalidTransactionId",
}
CANCEL_ERRORS: Final = {5: "invalidTransactionId"}
BPP_COMMANDS: Final = {
    0: "initialiseSecureChannel",
    1: "configureISDP",
    2: "storeMetadata",
    3: "storeMetadata2",
    4: "replaceSessionKeys",
    5: "loadProfileElements",
}
INSTALL_ERRORS: Final = {
    1: "incorrectInputValues",
    2: "invalidSignature",
    3: "invalidTransactionId",
    4: "unsupportedCrtValues",
    5: "unsupportedRemoteOperationType",
    6: "unsupportedProfileClass",
    7: "scp03tStructureError",
    8: "scp03tSecurityError",
    9: "installFailedDueToIccidAlreadyExistsOnEuicc",
    10: "installFailedDueToInsufficientMemoryForProfile",
    11: "installFailedDueToInterruption",
    12: "installFailedDueToPEProcessingError",
    13: "installFailedDueToDataMismatch",
    14: "testProfileInstallFailedDueToInvalidNaaKey",
    15: "pprNotAllowed",
}


def _reason(table: dict[int, str], code: int) -> str:
    return table.get(code, "undefinedError")


def _top(data: bytes, tag: int) -> Tlv:
    items = tlv.decode_all(data)
    if not items or items[0].tag != tag:
        got = f"{items[0].tag:X}" if items else "nothing"
        raise TlvError(f"ES10b response {got}, expected {tag:X}", data[:32])
    return items[0]


def _require(data: bytes, tag: int, what: str) -> Tlv:
    item, end = tlv.decode_one(data)
    if item.tag != tag or end != len(data):
        raise TlvError(f"{what}: expected one {tag:X} data object", data[:32])
    return item


# ---------------------------------------------------------------- GetEUICCChallenge


def get_euicc_challenge_request() -> bytes:
    """GetEuiccChallengeRequest (BF2E00)."""
    return tlv.encode(TAG_EUICC_CHALLENGE)


def decode_euicc_challenge(data: bytes) -> bytes:
    """GetEuiccChallengeResponse -> the 16-byte euiccChallenge ([0], 80)."""
    item = _top(data, TAG_EUICC_CHALLENGE).find(0x80)
    if item is None or len(item.value) != 16:
        raise TlvError("GetEuiccChallenge: no 16-byte euiccChallenge", data)
    return item.value


# ---------------------------------------------------------------- AuthenticateServer


def device_info(tac: bytes, imei: bytes | None = None) -> bytes:
    """DeviceInfo content: tac [0], deviceCapabilities [1] (E-UTRAN and GSM/UTRAN r15), imei [2]."""
    if len(tac) != 4:
        raise ValueError("TAC is 4 bytes")
    release = bytes([15, 0, 0])
    capabilities = (
        tlv.encode(0x80, release)  # gsmSupportedRelease
        + tlv.encode(0x81, release)  # utranSupportedRelease
        + tlv.encode(0x85, release)  # eutranEpcSupportedRelease
    )
    body = tlv.encode(0x80, tac) + tlv.encode(0xA1, capabilities)
    if imei is not None:
        if len(imei) != 8:
            raise ValueError("IMEI is 8 bytes (BCD)")
        body += tlv.encode(0x82, imei)
    return body


def authenticate_server_request(
    server_signed1: bytes,
    server_signature1: bytes,
    ci_pkid_to_be_used: bytes,
    server_certificate: bytes,
    *,
    matching_id: str | None,
    device_info_content: bytes,
) -> bytes:
    """AuthenticateServerRequest from the initiateAuthentication blobs (each a whole TLV)."""
    _require(server_signed1, 0x30, "serverSigned1")
    _require(server_signature1, TAG_SIGNATURE, "serverSignature1")
    _require(ci_pkid_to_be_used, 0x04, "euiccCiPKIdToBeUsed")
    _require(server_certificate, 0x30, "serverCertificate")
    common = b""
    if matching_id is not None:
        common += tlv.encode(0x80, matching_id.encode("utf-8"))
    common += tlv.encode(0xA1, device_info_content)
    ctx_params1 = tlv.encode(0xA0, common)  # CtxParams1 CHOICE: ctxParamsForCommonAuthentication
    return tlv.encode(
        TAG_AUTHENTICATE_SERVER,
        server_signed1 + server_signature1 + ci_pkid_to_be_used + server_certificate + ctx_params1,
    )


def check_authenticate_server(data: bytes) -> bytes:
    """The AuthenticateServerResponse to forward to the SM-DP+; the error choice raises Es10Error."""
    head = _top(data, TAG_AUTHENTICATE_SERVER)
    choice = tlv.decode_all(head.value)
    if not choice:
        raise TlvError("empty AuthenticateServerResponse", data)
    if choice[0].tag == 0xA1:
        code_item = tlv.find(choice[0].children(), 0x02)
        code = tlv.decode_int(code_item.value) if code_item else 127
        raise Es10Error("AuthenticateServer", code, _reason(AUTHENTICATE_ERRORS, code))
    if choice[0].tag != 0xA0:
        raise TlvError(f"AuthenticateServerResponse choice {choice[0].tag:X}", data[:32])
    return tlv.encode(head.tag, head.value)


def signed1_transaction_id(server_signed1: bytes) -> bytes:
    """transactionId ([0]) of serverSigned1, to check against the one in the ES9+ JSON."""
    item = _require(server_signed1, 0x30, "serverSigned1").find(0x80)
    if item is None:
        raise TlvError("serverSigned1 without transactionId", server_signed1[:32])
    return item.value


# ---------------------------------------------------------------- PrepareDownload


def smdp_signed2_fields(smdp_signed2: bytes) -> tuple[bytes, bool]:
    """(transactionId, ccRequiredFlag) of smdpSigned2."""
    kids = _require(smdp_signed2, 0x30, "smdpSigned2").children()
    tid = tlv.find(kids, 0x80)
    flag = tlv.find(kids, 0x01)
    if tid is None or flag is None:
        raise TlvError("smdpSigned2 without transactionId or ccRequiredFlag", smdp_signed2[:32])
    return tid.value, flag.value not in (b"", b"\x00")


def confirmation_code_hash(code: str, transaction_id: bytes) -> bytes:
    """hashCc = SHA256(SHA256(confirmation code) | transactionId) (§3.1.3.1)."""
    inner = hashlib.sha256(code.encode("utf-8")).digest()
    return hashlib.sha256(inner + transaction_id).digest()


def prepare_download_request(
    smdp_signed2: bytes,
    smdp_signature2: bytes,
    smdp_certificate: bytes,
    hash_cc: bytes | None = None,
) -> bytes:
    """PrepareDownloadRequest: smdpSigned2, smdpSignature2 (5F37), hashCc (04), smdpCertificate."""
    _require(smdp_signed2, 0x30, "smdpSigned2")
    _require(smdp_signature2, TAG_SIGNATURE, "smdpSignature2")
    _require(smdp_certificate, 0x30, "smdpCertificate")
    body = smdp_signed2 + smdp_signature2
    if hash_cc is not None:
        if len(hash_cc) != 32:
            raise ValueError("hashCc is 32 bytes")
        body += tlv.encode(0x04, hash_cc)
    return tlv.encode(TAG_PREPARE_DOWNLOAD, body + smdp_certificate)


def check_prepare_download(data: bytes) -> bytes:
    """The PrepareDownloadResponse to forward; the error choice raises Es10Error."""
    head = _top(data, TAG_PREPARE_DOWNLOAD)
    choice = tlv.decode_all(head.value)
    if not choice:
        raise TlvError("empty PrepareDownloadResponse", data)
    if choice[0].tag == 0xA1:
        code_item = tlv.find(choice[0].children(), 0x02)
        code = tlv.decode_int(code_item.value) if code_item else 127
        raise Es10Error("PrepareDownload", code, _reason(DOWNLOAD_ERRORS, code))
    if choice[0].tag != 0xA0:
        raise TlvError(f"PrepareDownloadResponse choice {choice[0].tag:X}", data[:32])
    return tlv.encode(head.tag, head.value)


# ---------------------------------------------------------------- LoadBoundProfilePackage


def _header(item: Tlv) -> bytes:
    return tlv.encode(item.tag, item.value)[: -len(item.value) or None]


def bpp_segments(bpp: bytes) -> list[bytes]:
    """Split a BoundProfilePackage into the ES10b segments of §2.5.5, each sent as one
    STORE DATA sequence: BF36 header + BF23; A0 header + its 87s; A1 header; each 88;
    A2 header + its 87s; A3 header; each 86."""
    head = _require(bpp, TAG_BPP, "BoundProfilePackage")
    parts = head.children()
    if not parts or parts[0].tag != TAG_INITIALISE_SECURE_CHANNEL:
        raise TlvError("BoundProfilePackage does not start with InitialiseSecureChannel", bpp[:32])
    whole = tlv.encode(parts[0].tag, parts[0].value)
    segments = [_header(head) + whole]
    expected = [TAG_FIRST_87, TAG_SEQ_88, TAG_SECOND_87, TAG_SEQ_86]
    seen: list[int] = []
    for part in parts[1:]:
        if part.tag not in expected or (
            seen and expected.index(part.tag) <= expected.index(seen[-1])
        ):
            raise TlvError(f"unexpected {part.tag:X} in BoundProfilePackage", bpp[:32])
        seen.append(part.tag)
        members = part.children()
        member_tag = {TAG_FIRST_87: 0x87, TAG_SEQ_88: 0x88, TAG_SECOND_87: 0x87, TAG_SEQ_86: 0x86}
        if any(m.tag != member_tag[part.tag] for m in members):
            raise TlvError(f"{part.tag:X} holds a foreign data object", bpp[:32])
        encoded = [tlv.encode(m.tag, m.value) for m in members]
        if part.tag in (TAG_FIRST_87, TAG_SECOND_87):
            segments.append(_header(part) + b"".join(encoded))
        else:
            segments.append(_header(part))
            segments.extend(encoded)
    if TAG_FIRST_87 not in seen or TAG_SEQ_88 not in seen or TAG_SEQ_86 not in seen:
        raise TlvError("BoundProfilePackage misses a mandatory sequence", bpp[:32])
    return segments


class InstallResult(msgspec.Struct, kw_only=True):
    """ProfileInstallationResult, decoded; raw (hex) is what handleNotification sends."""

    transaction_id: str
    seq_number: int
    notification_address: str | None = None
    iccid: str | None = None
    success: bool
    isdp_aid: str | None = None
    bpp_command: str | None = None
    error_reason: str | None = None
    error_code: int | None = None
    raw: str


def decode_profile_installation_result(data: bytes) -> InstallResult:
    """ProfileInstallationResult (BF37) -> InstallResult (it does not raise on a failed install)."""
    head = _top(data, TAG_PROFILE_INSTALLATION_RESULT)
    pir = head.find(TAG_PIR_DATA)
    if pir is None:
        raise TlvError("ProfileInstallationResult without its data", data[:32])
    kids = pir.children()
    tid = tlv.find(kids, 0x80)
    meta = tlv.find(kids, TAG_NOTIFICATION_METADATA)
    final = tlv.find(kids, 0xA2)
    if tid is None or meta is None or final is None:
        raise TlvError("ProfileInstallationResultData is incomplete", data[:32])
    seq_item = meta.find(0x80)
    if seq_item is None:
        raise TlvError("notification metadata without seqNumber", data[:32])
    address = meta.find(0x0C)
    iccid = meta.find(0x5A)
    result = InstallResult(
        transaction_id=tid.value.hex().upper(),
        seq_number=tlv.decode_int(seq_item.value),
        notification_address=address.value.decode("utf-8", "replace") if address else None,
        iccid=decode_iccid(iccid.value) if iccid else None,
        success=False,
        raw=tlv.encode(head.tag, head.value).hex().upper(),
    )
    choice = final.children()
    if choice and choice[0].tag == 0xA0:
        result.success = True
        aid = choice[0].find(0x4F)
        result.isdp_aid = aid.value.hex().upper() if aid else None
    elif choice and choice[0].tag == 0xA1:
        err = choice[0].children()
        command = tlv.find(err, 0x80)
        reason = tlv.find(err, 0x81)
        if command is not None:
            result.bpp_command = BPP_COMMANDS.get(tlv.decode_int(command.value), "unknown")
        code = tlv.decode_int(reason.value) if reason else 127
        result.error_code = code
        result.error_reason = _reason(INSTALL_ERRORS, code)
    else:
        raise TlvError("ProfileInstallationResult without a final result", data[:32])
    return result


# ---------------------------------------------------------------- CancelSession


def cancel_session_request(transaction_id: bytes, reason: CancelSessionReason) -> bytes:
    """CancelSessionRequest: transactionId [0], reason [1]."""
    return tlv.encode(
        TAG_CANCEL_SESSION,
        tlv.encode(0x80, transaction_id) + tlv.encode(0x81, tlv.encode_int(int(reason))),
    )


def check_cancel_session(data: bytes) -> bytes:
    """The CancelSessionResponse to forward to the SM-DP+; the error choice raises Es10Error."""
    head = _top(data, TAG_CANCEL_SESSION)
    choice = tlv.decode_all(head.value)
    if choice and choice[0].tag == 0x81:
        code = tlv.decode_int(choice[0].value)
        raise Es10Error("CancelSession", code, _reason(CANCEL_ERRORS, code))
    if not choice or choice[0].tag != 0xA0:
        raise TlvError("CancelSessionResponse without a result", data[:32])
    return tlv.encode(head.tag, head.value)
