"""The download's data objects against asn1tools: tests/asn1/sgp22_es10b.asn is written from
SGP.22's RSPDefinitions. Every message of a download, from the agent (requests), the emulated
eUICC (responses, installation result) and the test SM-DP+ (signed blobs, the BPP), must decode
there to the values that were meant."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import asn1tools
import pytest

from agent.euicc import es10, es10b
from agent.euicc.es10b import CancelSessionReason
from hw_fixtures.euicc import EmulatedEuicc
from hw_fixtures.euicc_download import CardKeys, DownloadEngine
from hw_fixtures.pki import TestPki
from hw_fixtures.smdp import Offer, SmdpCore

SPEC = asn1tools.compile_files(str(Path(__file__).parent / "asn1/sgp22_es10b.asn"), "der")
NEW = "8988247000001234567"


def decode(name: str, data: bytes) -> Any:
    value = SPEC.decode(name, data)
    assert SPEC.encode(name, value) == data, f"{name} is not DER as asn1tools writes it"
    return value


def call(core: SmdpCore, function: str, body: dict[str, Any]) -> dict[str, Any]:
    status, answer = core.handle(function, body)
    assert status == 200
    assert answer is not None
    return answer


def field(body: dict[str, Any], name: str) -> bytes:
    return base64.b64decode(body[name])


@pytest.fixture
def parts(test_pki: TestPki) -> tuple[EmulatedEuicc, DownloadEngine, SmdpCore]:
    card = EmulatedEuicc(test_pki.eid, [])
    engine = DownloadEngine(card, CardKeys.from_pki(test_pki))
    card.download = engine
    core = SmdpCore(pki=test_pki, address="smdp.example.test")
    core.offer(
        Offer(matching_id="M-1", iccid=NEW, name="Travel", confirmation_code="77", size=3000)
    )
    return card, engine, core


def test_a_whole_download_decodes_as_sgp22(
    parts: tuple[EmulatedEuicc, DownloadEngine, SmdpCore],
) -> None:
    card, engine, core = parts
    challenge_raw = engine.process(es10b.get_euicc_challenge_request())
    challenge = decode("GetEuiccChallengeResponse", challenge_raw)["euiccChallenge"]
    assert decode("GetEuiccChallengeRequest", es10b.get_euicc_challenge_request()) == {}
    info1 = card._info1([])
    init = call(
        core,
        "initiateAuthentication",
        {
            "euiccChallenge": base64.b64encode(challenge).decode(),
            "euiccInfo1": base64.b64encode(info1).decode(),
            "smdpAddress": "smdp.example.test",
        },
    )
    signed1 = decode("ServerSigned1", field(init, "serverSigned1"))
    assert signed1["euiccChallenge"] == challenge
    assert signed1["transactionId"].hex().upper() == init["transactionId"]

    request = es10b.authenticate_server_request(
        field(init, "serverSigned1"),
        field(init, "serverSignature1"),
        field(init, "euiccCiPKIdToBeUsed"),
        field(init, "serverCertificate"),
        matching_id="M-1",
        device_info_content=es10b.device_info(bytes.fromhex("35290611"), bytes(8)),
    )
    auth = decode("AuthenticateServerRequest", request)
    kind, common = auth["ctxParams1"]
    assert kind == "ctxParamsForCommonAuthentication"
    assert common["matchingId"] == "M-1"
    assert common["deviceInfo"]["tac"] == bytes.fromhex("35290611")
    assert (
        common["deviceInfo"]["deviceCapabilities"]["eutranEpcSupportedRelease"] == b"\x0f\x00\x00"
    )

    response = engine.process(request)
    kind, ok = decode("AuthenticateServerResponse", response)
    assert kind == "authenticateResponseOk"
    assert ok["euiccSigned1"]["serverChallenge"] == signed1["serverChallenge"]
    assert ok["euiccSigned1"]["ctxParams1"] == auth["ctxParams1"]
    assert len(ok["euiccSignature1"]) == 64, "r‖s, not DER"

    client = call(
        core,
        "authenticateClient",
        {
            "transactionId": init["transactionId"],
            "authenticateServerResponse": base64.b64encode(response).decode(),
        },
    )
    metadata = decode("StoreMetadataRequest", field(client, "profileMetadata"))
    assert metadata["profileName"] == "Travel"
    signed2 = decode("SmdpSigned2", field(client, "smdpSigned2"))
    assert signed2["ccRequiredFlag"] is True
    hash_cc = es10b.confirmation_code_hash("77", signed2["transactionId"])
    prepare = es10b.prepare_download_request(
        field(client, "smdpSigned2"),
        field(client, "smdpSignature2"),
        field(client, "smdpCertificate"),
        hash_cc,
    )
    assert decode("PrepareDownloadRequest", prepare)["hashCc"] == hash_cc
    prepared = engine.process(prepare)
    kind, ok2 = decode("PrepareDownloadResponse", prepared)
    assert kind == "downloadResponseOk"
    assert ok2["euiccSigned2"]["hashCc"] == hash_cc
    assert len(ok2["euiccSigned2"]["euiccOtpk"]) == 65  # uncompressed P-256 point

    bound = call(
        core,
        "getBoundProfilePackage",
        {
            "transactionId": init["transactionId"],
            "prepareDownloadResponse": base64.b64encode(prepared).decode(),
        },
    )
    bpp = field(bound, "boundProfilePackage")
    package = decode("BoundProfilePackage", bpp)
    isc = package["initialiseSecureChannelRequest"]
    assert isc["remoteOpId"] == 1
    assert isc["controlRefTemplate"]["keyType"] == b"\x88"
    assert isc["controlRefTemplate"]["keyLen"] == b"\x10"
    assert len(package["sequenceOf86"]) >= 3

    answers = [engine.process(segment) for segment in es10b.bpp_segments(bpp)]
    assert not any(answers[:-1])
    result = decode("ProfileInstallationResult", answers[-1])
    data = result["profileInstallationResultData"]
    assert data["finalResult"][0] == "successResult"
    assert data["notificationMetadata"]["profileManagementOperation"] == (b"\x80", 1)
    # 2.999.10: the first subidentifier is 2*40+999 = 1079, '88 37'. (asn1tools reads any first
    # subidentifier as 40*x+y with y < 40, so it shows '26.39.10'; the bytes are what count.)
    assert answers[-1].find(bytes.fromhex("0603 88370A")) > 0
    assert data["smdpOid"] in ("2.999.10", "26.39.10")
    installed = es10b.decode_profile_installation_result(answers[-1])
    assert installed.success
    assert installed.iccid == NEW
    assert [p.iccid for p in es10.decode_profiles_info(card._profiles_info([]))] == [NEW]


def test_cancel_session_decodes_as_sgp22(
    parts: tuple[EmulatedEuicc, DownloadEngine, SmdpCore], test_pki: TestPki
) -> None:
    _card, engine, _core = parts
    tid = bytes(range(16))
    request = es10b.cancel_session_request(tid, CancelSessionReason.POSTPONED)
    assert decode("CancelSessionRequest", request) == {"transactionId": tid, "reason": 1}
    kind, error = decode("CancelSessionResponse", engine.process(request))
    assert (kind, error) == ("cancelSessionResponseError", 5)  # no session with that id
