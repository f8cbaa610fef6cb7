"""A test SM-DP+ speaking ES9+ (SGP.22 §5.6, §6.5) over HTTPS with the test PKI.

`SmdpCore` is the protocol without I/O (JSON dict in, JSON dict out); `SmdpServer` puts it
behind asyncio HTTPS. Profiles are offered by matching ID, optionally with a confirmation code;
failures are injected per offer (expired, already downloaded, server error) or per function
(slow responses).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import ssl
from dataclasses import dataclass, field
from typing import Any, Final

import structlog
from cryptography import x509
from cryptography.x509.oid import NameOID

from hw_fixtures import rsp_crypto as rc
from hw_fixtures.euicc import bcd_to_iccid, iccid_to_bcd
from hw_fixtures.pki import TestPki

log = structlog.get_logger(__name__)

ADMIN_PROTOCOL: Final = "gsma/rsp/v2.2.0"
PATH_PREFIX: Final = "/gsma/rsp2/es9plus/"
HOST_ID: Final = b"ESA-TEST-SMDP"  # hostId of the CRT, at most 16 bytes
CLASSES: Final = {"test": 0, "provisioning": 1, "operational": 2}
MAX_BODY: Final = 4_000_000
READ_TIMEOUT_S: Final = 30.0


def b64(data: bytes) -> str:
    """Standard base64 text, as ES9+ carries binary fields."""
    return base64.b64encode(data).decode("ascii")


def unb64(text: object) -> bytes:
    """Decode an ES9+ base64 field; ValueError when missing or not base64."""
    if not isinstance(text, str):
        raise ValueError("missing base64 field")
    return base64.b64decode(text, validate=True)


def profile_package(iccid: str, size: int) -> bytes:
    """A ProfileElement-shaped package: header (A0, ICCID in [3]), filler elements, end (AA)."""
    header = rc.tlv(
        0xA0,
        rc.tlv(0x80, b"\x02")
        + rc.tlv(0x81, b"\x03")
        + rc.tlv(0x82, b"esim-agent test profile")
        + rc.tlv(0x83, iccid_to_bcd(iccid)),
    )
    end = rc.tlv(0xAA, rc.tlv(0xA0, rc.tlv(0x80, b"\x00")))
    filler = b""
    remaining = max(0, size - len(header) - len(end))
    n = 0
    while remaining > 8:
        piece = min(remaining - 8, 1000)
        seed = hashlib.sha256(f"{iccid}/{n}".encode()).digest()
        body = (seed * (piece // 32 + 1))[:piece]
        filler += rc.tlv(0xA1, rc.tlv(0x04, body))
        remaining = max(0, size - len(header) - len(end) - len(filler))
        n += 1
    return header + filler + end


@dataclass
class Offer:
    """A profile the SM-DP+ hands out for a matching ID."""

    matching_id: str
    iccid: str
    name: str = "Test profile"
    provider: str = "Test operator"
    profile_class: str = "operational"
    confirmation_code: str | None = None
    size: int = 4096
    state: str = "released"  # released | downloaded | installed
    expired: bool = False
    server_error: bool = False  # answer authenticateClient with HTTP 500
    corrupt_package: bool = False  # a profile package whose header ICCID does not match


@dataclass
class _Session:
    transaction_id: bytes
    euicc_challenge: bytes
    server_challenge: bytes
    offer: Offer | None = None
    euicc_public: Any = None
    eid: bytes = b""
    smdp_signature2: bytes = b""
    euicc_signature1: bytes = b""
    ended: bool = False


class Es9Failure(Exception):
    """An ES9+ function refused with subject and reason codes (§6.5.2)."""

    def __init__(self, subject: str, reason: str, message: str) -> None:
        super().__init__(message)
        self.subject = subject
        self.reason = reason
        self.message = message


def _executed(**fields: Any) -> dict[str, Any]:
    return {"header": {"functionExecutionStatus": {"status": "Executed-Success"}}, **fields}


def _failed(exc: Es9Failure) -> dict[str, Any]:
    return {
        "header": {
            "functionExecutionStatus": {
                "status": "Failed",
                "statusCodeData": {
                    "subjectCode": exc.subject,
                    "reasonCode": exc.reason,
                    "message": exc.message,
                },
            }
        }
    }


@dataclass
class SmdpCore:
    """ES9+ without I/O; `handle(function, body)` returns (HTTP status, JSON or None)."""

    pki: TestPki
    address: str
    offers: dict[str, Offer] = field(default_factory=dict)
    use_replace_session_keys: bool = True
    delays: dict[str, float] = field(default_factory=dict)  # function -> seconds before answer
    sessions: dict[bytes, _Session] = field(default_factory=dict)
    notifications: list[dict[str, Any]] = field(default_factory=list)
    cancelled: list[tuple[str, int]] = field(default_factory=list)
    calls: list[str] = field(default_factory=list)
    device_tacs: list[str] = field(default_factory=list)  # deviceInfo.tac of each client, hex
    called: dict[str, asyncio.Event] = field(default_factory=dict)  # set once a function ran
    # handleNotification answers Failed with these (subject, reason) codes while set.
    refuse_notifications: tuple[str, str] | None = None
    refused: list[dict[str, Any]] = field(default_factory=list)  # what was refused, as recorded

    def offer(self, offer: Offer) -> Offer:
        """Add a profile for download."""
        self.offers[offer.matching_id] = offer
        return offer

    def handle(self, function: str, body: dict[str, Any]) -> tuple[int, dict[str, Any] | None]:
        """Run one ES9+ function."""
        self.calls.append(function)
        self.called.setdefault(function, asyncio.Event()).set()
        handlers = {
            "initiateAuthentication": self._initiate_authentication,
            "authenticateClient": self._authenticate_client,
            "getBoundProfilePackage": self._get_bpp,
            "handleNotification": self._handle_notification,
            "cancelSession": self._cancel_session,
        }
        handler = handlers.get(function)
        if handler is None:
            return 404, None
        try:
            return handler(body)
        except Es9Failure as exc:
            log.info(
                "smdp_function_failed", function=function, subject=exc.subject, reason=exc.reason
            )
            return 200, _failed(exc)
        except (ValueError, KeyError, TypeError) as exc:
            log.info("smdp_bad_request", function=function, error=str(exc))
            return 200, _failed(Es9Failure("8.1", "2.1", f"invalid request: {exc}"))

    def _session(self, body: dict[str, Any]) -> _Session:
        tid_text = body.get("transactionId")
        try:
            tid = bytes.fromhex(str(tid_text))
        except ValueError:
            tid = b""
        session = self.sessions.get(tid)
        if session is None or session.ended:
            raise Es9Failure("8.10.1", "3.9", "unknown transaction id")
        return session

    # -------------------------------------------------------------- initiateAuthentication

    def _initiate_authentication(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        challenge = unb64(body.get("euiccChallenge"))
        info1 = unb64(body.get("euiccInfo1"))
        if str(body.get("smdpAddress", "")).lower() != self.address.lower():
            raise Es9Failure("8.8.1", "3.8", "invalid SM-DP+ address")
        if len(challenge) != 16:
            raise Es9Failure("8.1", "2.1", "euiccChallenge must be 16 bytes")
        key_id = self.pki.ci_key_id
        info_items = rc.parse(rc.parse(info1)[0][1])
        verification = rc.child(info_items, 0xA9)
        ids = [v for _t, v, _w in rc.parse(verification[0])] if verification else []
        if key_id not in ids:
            raise Es9Failure("8.8.2", "3.1", "no CI public key in common with the eUICC")
        tid = os.urandom(16)
        server_challenge = os.urandom(16)
        self.sessions[tid] = _Session(tid, challenge, server_challenge)
        signed1 = rc.tlv(
            0x30,
            rc.tlv(0x80, tid)
            + rc.tlv(0x81, challenge)
            + rc.tlv(0x83, self.address.encode())
            + rc.tlv(0x84, server_challenge),
        )
        signature1 = rc.tlv(0x5F37, rc.sign_raw(self.pki.dp_auth.key, signed1))
        return 200, _executed(
            transactionId=tid.hex().upper(),
            serverSigned1=b64(signed1),
            serverSignature1=b64(signature1),
            euiccCiPKIdToBeUsed=b64(rc.tlv(0x04, key_id)),
            serverCertificate=b64(self.pki.dp_auth.cert_der()),
        )

    # -------------------------------------------------------------- authenticateClient

    def _authenticate_client(self, body: dict[str, Any]) -> tuple[int, dict[str, Any] | None]:
        session = self._session(body)
        response = unb64(body.get("authenticateServerResponse"))
        top = rc.parse(response)
        if not top or top[0][0] != 0xBF38:
            raise Es9Failure("8.1", "2.1", "not an AuthenticateServerResponse")
        choice = rc.parse(top[0][1])
        if choice[0][0] != 0xA0:
            session.ended = True
            raise Es9Failure("8.1", "6.1", "eUICC refused the SM-DP+ authentication")
        parts = rc.parse(choice[0][1])
        signed1_value, signed1 = parts[0][1], parts[0][2]
        signature1 = parts[1][1]
        euicc_cert = x509.load_der_x509_certificate(parts[2][2])
        eum_cert = x509.load_der_x509_certificate(parts[3][2])
        if not rc.issued_by(eum_cert, self.pki.ci.cert):
            raise Es9Failure("8.1.2", "6.1", "EUM certificate invalid")
        if not rc.issued_by(euicc_cert, eum_cert):
            raise Es9Failure("8.1.3", "6.1", "eUICC certificate invalid")
        public = rc.cert_public_key(euicc_cert)
        if not rc.verify_raw(public, signature1, signed1):
            raise Es9Failure("8.1", "6.1", "eUICC signature invalid")
        fields = rc.parse(signed1_value)
        if (rc.child(fields, 0x80) or (b"", b""))[0] != session.transaction_id:
            raise Es9Failure("8.10.1", "3.9", "transaction id mismatch")
        if (rc.child(fields, 0x84) or (b"", b""))[0] != session.server_challenge:
            raise Es9Failure("8.1", "6.1", "server challenge mismatch")
        ctx = rc.child(fields, 0xA0)
        common = rc.parse(ctx[0]) if ctx else []  # A0 holds the SEQUENCE content (implicit)
        device = rc.child(common, 0xA1)
        tac = rc.child(rc.parse(device[0]), 0x80) if device else None
        self.device_tacs.append(tac[0].hex() if tac else "")
        matching = rc.child(common, 0x80)
        matching_id = matching[0].decode("utf-8", "replace") if matching else ""
        offer = self.offers.get(matching_id)
        if offer is None:
            raise Es9Failure("8.2.6", "3.8", f"matching ID {matching_id!r} refused")
        if offer.server_error:
            return 500, None
        if offer.expired:
            raise Es9Failure("8.8.5", "4.10", "download order expired")
        if offer.state != "released":
            raise Es9Failure("8.2.6", "3.8", "profile already downloaded")
        serial = euicc_cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)
        session.offer = offer
        session.euicc_public = public
        session.eid = bytes.fromhex(str(serial[0].value)) if serial else b""
        session.euicc_signature1 = rc.tlv(0x5F37, signature1)
        cc_flag = b"\xff" if offer.confirmation_code is not None else b"\x00"
        signed2 = rc.tlv(0x30, rc.tlv(0x80, session.transaction_id) + rc.tlv(0x01, cc_flag))
        signature2 = rc.tlv(
            0x5F37, rc.sign_raw(self.pki.dp_pb.key, signed2 + session.euicc_signature1)
        )
        session.smdp_signature2 = signature2
        return 200, _executed(
            transactionId=session.transaction_id.hex().upper(),
            profileMetadata=b64(self._metadata(offer)),
            smdpSigned2=b64(signed2),
            smdpSignature2=b64(signature2),
            smdpCertificate=b64(self.pki.dp_pb.cert_der()),
        )

    def _metadata(self, offer: Offer) -> bytes:
        notify = rc.tlv(
            0x30, rc.tlv(0x80, b"\x04\xf0") + rc.tlv(0x81, self.address.encode())
        )  # install, enable, disable, delete go to this SM-DP+
        return rc.tlv(
            0xBF25,
            rc.tlv(0x5A, iccid_to_bcd(offer.iccid))
            + rc.tlv(0x91, offer.provider.encode())
            + rc.tlv(0x92, offer.name.encode())
            + rc.tlv(0x95, bytes([CLASSES[offer.profile_class]]))
            + rc.tlv(0xB6, notify),
        )

    # -------------------------------------------------------------- getBoundProfilePackage

    def _get_bpp(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        session = self._session(body)
        offer = session.offer
        if offer is None:
            raise Es9Failure("8.10.1", "3.9", "authenticateClient not done")
        response = unb64(body.get("prepareDownloadResponse"))
        top = rc.parse(response)
        choice = rc.parse(top[0][1])
        if top[0][0] != 0xBF21 or choice[0][0] != 0xA0:
            session.ended = True
            raise Es9Failure("8.2", "3.8", "eUICC refused PrepareDownload")
        parts = rc.parse(choice[0][1])
        signed2_value, signed2 = parts[0][1], parts[0][2]
        signature2 = parts[1][1]
        if not rc.verify_raw(session.euicc_public, signature2, signed2 + session.smdp_signature2):
            raise Es9Failure("8.1", "6.1", "eUICC signature invalid")
        fields = rc.parse(signed2_value)
        euicc_otpk = rc.child(fields, 0x5F49)
        hash_cc = rc.child(fields, 0x04)
        if euicc_otpk is None:
            raise Es9Failure("8.1", "2.2", "otPK.EUICC.ECKA missing")
        if offer.confirmation_code is not None:
            if hash_cc is None:
                raise Es9Failure("8.2.7", "2.2", "confirmation code missing")
            inner = hashlib.sha256(offer.confirmation_code.encode()).digest()
            if hash_cc[0] != hashlib.sha256(inner + session.transaction_id).digest():
                raise Es9Failure("8.2.7", "3.8", "confirmation code refused")
        bpp = self._bind(session, offer, euicc_otpk[1], euicc_otpk[0])
        offer.state = "downloaded"
        return 200, _executed(
            transactionId=session.transaction_id.hex().upper(), boundProfilePackage=b64(bpp)
        )

    def _bind(self, session: _Session, offer: Offer, otpk_tlv: bytes, otpk: bytes) -> bytes:
        ot_key = rc.new_ot_key()
        isc_fields = (
            rc.tlv(0x82, b"\x01")
            + rc.tlv(0x80, session.transaction_id)
            + rc.tlv(
                0xA6,
                rc.tlv(0x80, bytes([rc.KEY_TYPE_AES]))
                + rc.tlv(0x81, bytes([rc.KEY_LEN]))
                + rc.tlv(0x84, HOST_ID),
            )
            + rc.tlv(0x5F49, rc.point(ot_key.public_key()))
        )
        sign = rc.sign_raw(self.pki.dp_pb.key, isc_fields + otpk_tlv)
        isc = rc.tlv(0xBF23, isc_fields + rc.tlv(0x5F37, sign))
        mcv, s_enc, s_mac = rc.session_keys(rc.ecka(ot_key, otpk), HOST_ID, session.eid)
        scp = rc.Scp03t(s_enc, s_mac, mcv)
        configure = scp.protect(0x87, rc.tlv(0xBF24))
        metadata = scp.protect(0x88, self._metadata(offer), encrypt=False)
        iccid = offer.iccid if not offer.corrupt_package else "8900000000000000000"
        package = profile_package(iccid, offer.size)
        body = isc + rc.tlv(0xA0, b"".join(configure)) + rc.tlv(0xA1, b"".join(metadata))
        if self.use_replace_session_keys:
            ppk_enc, ppk_mac, ppk_mcv = os.urandom(16), os.urandom(16), os.urandom(16)
            replace = rc.tlv(
                0xBF26, rc.tlv(0x80, ppk_mcv) + rc.tlv(0x81, ppk_enc) + rc.tlv(0x82, ppk_mac)
            )
            body += rc.tlv(0xA2, b"".join(scp.protect(0x87, replace)))
            scp = rc.Scp03t(ppk_enc, ppk_mac, ppk_mcv)
        body += rc.tlv(0xA3, b"".join(scp.protect(0x86, package)))
        return rc.tlv(0xBF36, body)

    # -------------------------------------------------------------- notifications, cancel

    def _handle_notification(self, body: dict[str, Any]) -> tuple[int, None]:
        raw = unb64(body.get("pendingNotification"))
        top = rc.parse(raw)[0]
        record: dict[str, Any] = {"raw": raw.hex().upper(), **_notification_metadata(raw)}
        if self.refuse_notifications is not None:
            self.refused.append(record)
            subject, reason = self.refuse_notifications
            raise Es9Failure(subject, reason, "notification refused (injected)")
        if top[0] == 0xBF37:
            data = rc.parse(top[1])
            pir = data[0]
            fields = rc.parse(pir[1])
            tid = (rc.child(fields, 0x80) or (b"", b""))[0]
            final = rc.child(fields, 0xA2)
            session = self.sessions.get(tid)
            success = final is not None and rc.parse(final[0])[0][0] == 0xA0
            verified = bool(
                session is not None
                and session.euicc_public is not None
                and rc.verify_raw(session.euicc_public, data[1][1], pir[2])
            )
            record.update(kind="install", success=success, verified=verified)
            if session is not None and session.offer is not None and success and verified:
                session.offer.state = "installed"
            if session is not None:
                session.ended = True
        else:
            record.update(kind="other", verified=self._verify_other(top[1]))
        self.notifications.append(record)
        return 204, None

    def _verify_other(self, body: bytes) -> bool:
        """An OtherSignedNotification signed by an eUICC whose EUM chains to our CI."""
        try:
            parts = rc.parse(body)
            meta, signature = parts[0][2], parts[1][1]
            euicc_cert = x509.load_der_x509_certificate(parts[2][2])
            eum_cert = x509.load_der_x509_certificate(parts[3][2])
            return (
                rc.issued_by(eum_cert, self.pki.ci.cert)
                and rc.issued_by(euicc_cert, eum_cert)
                and rc.verify_raw(rc.cert_public_key(euicc_cert), signature, meta)
            )
        except (ValueError, IndexError):
            return False

    def _cancel_session(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        session = self._session(body)
        raw = unb64(body.get("cancelSessionResponse"))
        top = rc.parse(raw)[0]
        choice = rc.parse(top[1])[0]
        if top[0] != 0xBF41 or choice[0] != 0xA0:
            raise Es9Failure("8.1", "2.1", "not a CancelSessionResponse")
        signed, signature = rc.parse(choice[1])[:2]
        if session.euicc_public is not None and not rc.verify_raw(
            session.euicc_public, signature[1], signed[2]
        ):
            raise Es9Failure("8.1", "6.1", "eUICC signature invalid")
        fields = rc.parse(signed[1])
        reason = int.from_bytes((rc.child(fields, 0x82) or (b"\x7f", b""))[0], "big")
        session.ended = True
        if session.offer is not None and session.offer.state == "downloaded":
            session.offer.state = "released"  # the order is available again (§3.1.3.4)
        self.cancelled.append((session.transaction_id.hex().upper(), reason))
        return 200, _executed()


_OPERATIONS: Final = ("install", "enable", "disable", "delete")


def _notification_metadata(raw: bytes) -> dict[str, Any]:
    """seq, operation and iccid of a pending notification's NotificationMetadata (BF2F),
    wherever it sits (inside a ProfileInstallationResult or an OtherSignedNotification)."""

    def find(data: bytes) -> bytes | None:
        for tag, value, _whole in rc.parse(data):
            if tag == 0xBF2F:
                return value
            if tag in (0xBF37, 0xBF27, 0x30, 0xA0):
                found = find(value)
                if found is not None:
                    return found
        return None

    try:
        meta = find(raw)
        if meta is None:
            return {}
        fields = rc.parse(meta)
        seq = rc.child(fields, 0x80)
        ops = rc.child(fields, 0x81)
        iccid = rc.child(fields, 0x5A)
        operation = None
        if ops is not None and len(ops[0]) >= 2:
            bits = ops[0][1]
            operation = next(
                (name for i, name in enumerate(_OPERATIONS) if bits & (0x80 >> i)), None
            )
        return {
            "seq": int.from_bytes(seq[0], "big") if seq else None,
            "operation": operation,
            "iccid": bcd_to_iccid(iccid[0]) if iccid else None,
        }
    except (ValueError, IndexError):
        return {}


class SmdpServer:
    """HTTPS in front of SmdpCore; one request per connection (Connection: close)."""

    def __init__(self, core: SmdpCore, host: str = "127.0.0.1", port: int = 0) -> None:
        self.core = core
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None

    def ssl_context(self) -> ssl.SSLContext:
        """Server TLS with the test PKI's DPtls certificate chain."""
        directory = self.core.pki.directory
        if directory is None:
            raise ValueError("the test PKI must be written to a directory first")
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(directory / "dp_tls_chain.pem", directory / "dp_tls.key.pem")
        return ctx

    async def start(self) -> int:
        """Listen; returns the port."""
        self._server = await asyncio.start_server(
            self._client, self.host, self.port, ssl=self.ssl_context()
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        """Stop listening and close connections."""
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 5)
            self._server = None

    async def __aenter__(self) -> SmdpServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await asyncio.wait_for(self._serve_one(reader, writer), READ_TIMEOUT_S)
        except (TimeoutError, ConnectionError, ssl.SSLError, asyncio.IncompleteReadError) as exc:
            log.info("smdp_connection_dropped", error=str(exc))
        except asyncio.CancelledError:
            # Server shutdown while a slow response was pending: the connection just ends.
            log.info("smdp_connection_cancelled")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 2)

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, path, _version = lines[0].split(" ", 2)
        headers = {
            k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:] if h)
        }
        length = int(headers.get("content-length", "0"))
        if length > MAX_BODY:
            await self._reply(writer, 413, None)
            return
        raw = await reader.readexactly(length)
        if method != "POST" or not path.startswith(PATH_PREFIX):
            await self._reply(writer, 404, None)
            return
        if not headers.get("x-admin-protocol", "").startswith("gsma/rsp/v2."):
            await self._reply(writer, 400, None)
            return
        function = path[len(PATH_PREFIX) :]
        self.core.called.setdefault(function, asyncio.Event()).set()
        delay = self.core.delays.get(function, 0.0)
        if delay:
            await asyncio.sleep(delay)  # slow-response injection
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            await self._reply(writer, 400, None)
            return
        status, answer = self.core.handle(function, body if isinstance(body, dict) else {})
        await self._reply(writer, status, answer)

    async def _reply(
        self, writer: asyncio.StreamWriter, status: int, body: dict[str, Any] | None
    ) -> None:
        reasons = {200: "OK", 204: "No Content", 400: "Bad Request", 404: "Not Found"}
        payload = json.dumps(body).encode() if body is not None else b""
        head = [
            f"HTTP/1.1 {status} {reasons.get(status, 'Error')}",
            f"X-Admin-Protocol: {ADMIN_PROTOCOL}",
            f"Content-Length: {len(payload)}",
            "Connection: close",
        ]
        if payload:
            head.append("Content-Type: application/json;charset=UTF-8")
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + payload)
        await writer.drain()
