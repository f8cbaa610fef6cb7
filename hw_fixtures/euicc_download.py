"""The emulated eUICC's side of profile download (SGP.22 §3.1.3, §5.7.1-5.7.14) with the test PKI.

The engine owns the download session: challenge, server authentication, the one-time ECKA key
pair, the SCP03t keys and the bound profile package being loaded. A profile is added to the
card only after its last segment checked out, so an interrupted or cancelled load leaves
nothing behind; the ProfileInstallationResult is queued as the install notification.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from hw_fixtures import rsp_crypto as rc
from hw_fixtures.card_api import ProfileSpec

if TYPE_CHECKING:
    from hw_fixtures.euicc import EmulatedEuicc
    from hw_fixtures.pki import TestPki

CLASS_NAMES: Final = {0: "test", 1: "provisioning", 2: "operational"}
INSTALL_BIT: Final = b"\x07\x80"  # NotificationEvent with only bit 0 (install) set

# ProfileInstallationResult codes (BppCommandId, ErrorReason)
CMD_ISC, CMD_CONFIGURE, CMD_METADATA, CMD_REPLACE_KEYS, CMD_LOAD = 0, 1, 2, 4, 5
ERR_INPUT, ERR_SIGNATURE, ERR_TID, ERR_CRT = 1, 2, 3, 4
ERR_SCP03T_STRUCTURE, ERR_SCP03T_SECURITY = 7, 8
ERR_ICCID_EXISTS, ERR_MEMORY, ERR_PE, ERR_MISMATCH = 9, 10, 12, 13


@dataclass(frozen=True)
class CardKeys:
    """What the card holds of the PKI: its own key and certificates, and the trusted CIs."""

    euicc_key: ec.EllipticCurvePrivateKey
    euicc_cert: bytes  # DER
    eum_cert: bytes  # DER
    ci_certs: dict[bytes, x509.Certificate]  # by subjectKeyIdentifier
    eid: bytes  # from the eUICC certificate's serialNumber: the KDF's SharedInfo uses it

    @classmethod
    def from_pki(cls, pki: TestPki) -> CardKeys:
        """The card's share of a generated test PKI."""
        return cls(
            euicc_key=pki.euicc.key,
            euicc_cert=pki.euicc.cert_der(),
            eum_cert=pki.eum.cert_der(),
            ci_certs={pki.ci_key_id: pki.ci.cert},
            eid=bytes.fromhex(pki.eid),
        )

    @classmethod
    def from_directory(cls, directory: str) -> CardKeys:
        """Load euicc.key.pem, euicc.pem, eum.pem and ci.pem as hw_fixtures.pki writes them."""
        with open(os.path.join(directory, "euicc.key.pem"), "rb") as f:
            key = serialization.load_pem_private_key(f.read(), None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError("euicc.key.pem is not an EC key")
        certs = {}
        for name in ("euicc", "eum", "ci"):
            with open(os.path.join(directory, f"{name}.pem"), "rb") as f:
                certs[name] = x509.load_pem_x509_certificate(f.read())
        ski = certs["ci"].extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        serial = certs["euicc"].subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)
        der = serialization.Encoding.DER
        return cls(
            euicc_key=key,
            euicc_cert=certs["euicc"].public_bytes(der),
            eum_cert=certs["eum"].public_bytes(der),
            ci_certs={ski.value.digest: certs["ci"]},
            eid=bytes.fromhex(str(serial[0].value)),
        )


@dataclass
class _Session:
    transaction_id: bytes
    server_address: str
    smdp_oid: str | None = None
    euicc_signature1: bytes = b""  # whole 5F37 TLV
    ot_key: ec.EllipticCurvePrivateKey | None = None
    pb_key: ec.EllipticCurvePublicKey | None = None
    # loading state
    bpp_remaining: int | None = None
    scp: rc.Scp03t | None = None
    metadata: bytes = b""
    package: bytearray = field(default_factory=bytearray)
    phase: str = "prepared"


class _InstallError(Exception):
    def __init__(self, command: int, reason: int) -> None:
        super().__init__(f"command {command} reason {reason}")
        self.command = command
        self.reason = reason


def _smdp_oid(cert: x509.Certificate) -> str | None:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    ids = san.get_values_for_type(x509.RegisteredID)
    return ids[0].dotted_string if ids else None


def _oid_content(dotted: str) -> bytes:
    """BER OBJECT IDENTIFIER content of a dotted OID."""
    arcs = [int(a) for a in dotted.split(".")]
    out = bytearray()
    for sub in [40 * arcs[0] + arcs[1], *arcs[2:]]:
        chunk = [sub & 0x7F]
        rest = sub >> 7
        while rest:
            chunk.append(0x80 | (rest & 0x7F))
            rest >>= 7
        out += bytes(reversed(chunk))
    return bytes(out)


class DownloadEngine:
    """ES10b download functions for an EmulatedEuicc; attach with `card.download = engine`."""

    def __init__(self, card: EmulatedEuicc, keys: CardKeys) -> None:
        self.card = card
        self.keys = keys
        self.challenge: bytes | None = None
        self.session: _Session | None = None
        # Test knobs
        self.free_memory = 4_000_000  # bytes a profile package may use
        self.cancelled: list[tuple[str, int]] = []  # (transaction id hex, reason) seen

    @property
    def ci_key_ids(self) -> list[bytes]:
        """Key ids for EUICCInfo1/2."""
        return list(self.keys.ci_certs)

    def sign_notification(self, metadata: bytes) -> bytes:
        """The rest of an OtherSignedNotification: 5F37 over the metadata, eUICC and EUM certs."""
        signature = rc.tlv(0x5F37, rc.sign_raw(self.keys.euicc_key, metadata))
        return signature + self.keys.euicc_cert + self.keys.eum_cert

    # -------------------------------------------------------------- dispatch

    def handles(self, request: bytes) -> bool:
        """True for a request this engine answers (BPP segments included while loading)."""
        if not request:
            return False
        tag = request[0] if request[0] & 0x1F != 0x1F else int.from_bytes(request[:2], "big")
        if tag in (0xBF2E, 0xBF38, 0xBF21, 0xBF41, 0xBF36):
            return True
        loading = self.session is not None and self.session.bpp_remaining is not None
        return loading and tag in (0xA0, 0xA1, 0xA2, 0xA3, 0x86, 0x87, 0x88)

    def process(self, request: bytes) -> bytes:
        """Answer one ES10b request; b'' is the empty answer to an intermediate BPP segment."""
        tag = request[0] if request[0] & 0x1F != 0x1F else int.from_bytes(request[:2], "big")
        if tag == 0xBF2E:
            self.challenge = os.urandom(16)
            return rc.tlv(0xBF2E, rc.tlv(0x80, self.challenge))
        if tag == 0xBF38:
            return self._authenticate_server(rc.parse(request)[0][1])
        if tag == 0xBF21:
            return self._prepare_download(rc.parse(request)[0][1])
        if tag == 0xBF41:
            return self._cancel_session(rc.parse(request)[0][1])
        return self._load_segment(request)

    # -------------------------------------------------------------- AuthenticateServer

    def _auth_error(self, tid: bytes, code: int) -> bytes:
        self.session = None
        return rc.tlv(0xBF38, rc.tlv(0xA1, rc.tlv(0x80, tid) + rc.tlv(0x02, rc.uint(code))))

    def _authenticate_server(self, body: bytes) -> bytes:
        items = rc.parse(body)
        signed1 = child(items, 0x30, 0)
        sig1 = rc.child(items, 0x5F37)
        key_id = rc.child(items, 0x04)
        cert_raw = child(items, 0x30, 1)
        ctx = rc.child(items, 0xA0)
        if signed1 is None or sig1 is None or key_id is None or cert_raw is None or ctx is None:
            raise ValueError("AuthenticateServerRequest is incomplete")
        fields = rc.parse(signed1[0])
        tid = (rc.child(fields, 0x80) or (b"", b""))[0]
        challenge = (rc.child(fields, 0x81) or (b"", b""))[0]
        address = (rc.child(fields, 0x83) or (b"", b""))[0]
        server_challenge = (rc.child(fields, 0x84) or (b"", b""))[0]
        ci = self.keys.ci_certs.get(key_id[0])
        if ci is None:
            return self._auth_error(tid, 7)  # ciPKUnknown
        try:
            cert = x509.load_der_x509_certificate(cert_raw[1])
            public = rc.cert_public_key(cert)
        except ValueError:
            return self._auth_error(tid, 1)
        if not rc.issued_by(cert, ci):
            return self._auth_error(tid, 1)  # invalidCertificate
        if not rc.verify_raw(public, sig1[0], signed1[1]):
            return self._auth_error(tid, 2)  # invalidSignature
        if self.challenge is None or challenge != self.challenge:
            return self._auth_error(tid, 6)  # euiccChallengeMismatch
        self.challenge = None
        info2 = self.card.info2_response()
        euicc_signed1 = rc.tlv(
            0x30,
            rc.tlv(0x80, tid)
            + rc.tlv(0x83, address)
            + rc.tlv(0x84, server_challenge)
            + info2
            + ctx[1],
        )
        signature1 = rc.tlv(0x5F37, rc.sign_raw(self.keys.euicc_key, euicc_signed1))
        self.session = _Session(
            transaction_id=tid,
            server_address=address.decode("utf-8", "replace"),
            euicc_signature1=signature1,
        )
        ok = euicc_signed1 + signature1 + self.keys.euicc_cert + self.keys.eum_cert
        return rc.tlv(0xBF38, rc.tlv(0xA0, ok))

    # -------------------------------------------------------------- PrepareDownload

    def _download_error(self, tid: bytes, code: int) -> bytes:
        self.session = None
        return rc.tlv(0xBF21, rc.tlv(0xA1, rc.tlv(0x80, tid) + rc.tlv(0x02, rc.uint(code))))

    def _prepare_download(self, body: bytes) -> bytes:
        items = rc.parse(body)
        signed2 = child(items, 0x30, 0)
        sig2 = rc.child(items, 0x5F37)
        hash_cc = rc.child(items, 0x04)
        cert_raw = child(items, 0x30, 1)
        if signed2 is None or sig2 is None or cert_raw is None:
            raise ValueError("PrepareDownloadRequest is incomplete")
        fields = rc.parse(signed2[0])
        tid = (rc.child(fields, 0x80) or (b"", b""))[0]
        session = self.session
        if session is None:
            return self._download_error(tid, 4)  # noSessionContext
        try:
            cert = x509.load_der_x509_certificate(cert_raw[1])
            public = rc.cert_public_key(cert)
        except ValueError:
            return self._download_error(tid, 1)
        if not any(rc.issued_by(cert, ci) for ci in self.keys.ci_certs.values()):
            return self._download_error(tid, 1)
        if not rc.verify_raw(public, sig2[0], signed2[1] + session.euicc_signature1):
            return self._download_error(tid, 2)
        if tid != session.transaction_id:
            return self._download_error(tid, 5)  # invalidTransactionId
        session.ot_key = rc.new_ot_key()
        session.pb_key = public
        session.smdp_oid = _smdp_oid(cert)
        euicc_signed2 = rc.tlv(
            0x30,
            rc.tlv(0x80, tid)
            + rc.tlv(0x5F49, rc.point(session.ot_key.public_key()))
            + (hash_cc[1] if hash_cc else b""),
        )
        signature2 = rc.tlv(0x5F37, rc.sign_raw(self.keys.euicc_key, euicc_signed2 + sig2[1]))
        return rc.tlv(0xBF21, rc.tlv(0xA0, euicc_signed2 + signature2))

    # -------------------------------------------------------------- CancelSession

    def _cancel_session(self, body: bytes) -> bytes:
        fields = rc.parse(body)
        tid = (rc.child(fields, 0x80) or (b"", b""))[0]
        reason_raw = (rc.child(fields, 0x81) or (b"\x7f", b""))[0]
        session = self.session
        if session is None or tid != session.transaction_id:
            return rc.tlv(0xBF41, rc.tlv(0x81, rc.uint(5)))  # invalidTransactionId
        self.session = None  # whatever was loaded so far is dropped with it
        self.cancelled.append((tid.hex().upper(), int.from_bytes(reason_raw, "big")))
        signed = rc.tlv(
            0x30,
            rc.tlv(0x80, tid)
            + rc.tlv(0x81, _oid_content(session.smdp_oid or "2.999"))
            + rc.tlv(0x82, reason_raw),
        )
        signature = rc.tlv(0x5F37, rc.sign_raw(self.keys.euicc_key, signed))
        return rc.tlv(0xBF41, rc.tlv(0xA0, signed + signature))

    # -------------------------------------------------------------- LoadBoundProfilePackage

    def _load_segment(self, segment: bytes) -> bytes:
        session = self.session
        if session is None or session.ot_key is None:
            raise ValueError("no download session")
        try:
            return self._segment(session, segment)
        except _InstallError as exc:
            return self._finish(session, error=(exc.command, exc.reason))
        except (rc.BspError, ValueError):
            return self._finish(session, error=(CMD_LOAD, ERR_SCP03T_STRUCTURE))

    def _consume(self, session: _Session, n: int) -> bool:
        """Account n bytes of the BPP; True when the package is complete."""
        if session.bpp_remaining is None:
            raise _InstallError(CMD_ISC, ERR_SCP03T_STRUCTURE)
        session.bpp_remaining -= n
        if session.bpp_remaining < 0:
            raise _InstallError(CMD_LOAD, ERR_SCP03T_STRUCTURE)
        return session.bpp_remaining == 0

    def _segment(self, session: _Session, segment: bytes) -> bytes:
        tag, start, end = rc.read_tlv(segment)
        if tag == 0xBF36:
            if session.bpp_remaining is not None:
                raise _InstallError(CMD_ISC, ERR_SCP03T_STRUCTURE)
            session.bpp_remaining = end - start
            self._consume(session, len(segment) - start)
            self._initialise_secure_channel(session, segment[start:])
            session.phase = "configure"
            return b""
        if tag in (0xA0, 0xA1, 0xA2, 0xA3):
            members = segment[start:]
            expected = {
                0xA0: "configure",
                0xA1: "metadata",
                0xA2: "replace",
                0xA3: "profile",
            }[tag]
            order = ["configure", "metadata", "replace", "profile"]
            if order.index(expected) < order.index(session.phase):
                raise _InstallError(CMD_LOAD, ERR_SCP03T_STRUCTURE)
            if session.phase == "metadata" and expected != "metadata":
                self._check_metadata(session)
            session.phase = expected
            done = self._consume(session, len(segment))
            for _t, _v, whole in rc.parse(members):
                self._member(session, whole)
            return self._finish(session) if done else b""
        if tag in (0x86, 0x87, 0x88):
            done = self._consume(session, len(segment))
            self._member(session, segment)
            return self._finish(session) if done else b""
        raise _InstallError(CMD_LOAD, ERR_SCP03T_STRUCTURE)

    def _initialise_secure_channel(self, session: _Session, isc: bytes) -> None:
        items = rc.parse(isc)
        if len(items) != 1 or items[0][0] != 0xBF23:
            raise _InstallError(CMD_ISC, ERR_INPUT)
        fields = rc.parse(items[0][1])
        op = rc.child(fields, 0x82)
        tid = rc.child(fields, 0x80)
        crt = rc.child(fields, 0xA6)
        otpk = rc.child(fields, 0x5F49)
        sign = rc.child(fields, 0x5F37)
        if op is None or tid is None or crt is None or otpk is None or sign is None:
            raise _InstallError(CMD_ISC, ERR_INPUT)
        if op[0] != b"\x01":
            raise _InstallError(CMD_ISC, 5)  # unsupportedRemoteOperationType
        if tid[0] != session.transaction_id:
            raise _InstallError(CMD_ISC, ERR_TID)
        crt_fields = rc.parse(crt[0])
        key_type = rc.child(crt_fields, 0x80)
        key_len = rc.child(crt_fields, 0x81)
        host_id = rc.child(crt_fields, 0x84)
        if key_type is None or key_len is None or host_id is None:
            raise _InstallError(CMD_ISC, ERR_CRT)
        if key_type[0] != bytes([rc.KEY_TYPE_AES]) or key_len[0] != bytes([rc.KEY_LEN]):
            raise _InstallError(CMD_ISC, ERR_CRT)
        assert session.ot_key is not None
        assert session.pb_key is not None
        # smdpSign covers remoteOpId, transactionId, controlRefTemplate, smdpOtpk, then the
        # eUICC's own otPK (5F49) as sent in euiccSigned2.
        euicc_otpk = rc.tlv(0x5F49, rc.point(session.ot_key.public_key()))
        signed = op[1] + tid[1] + crt[1] + otpk[1] + euicc_otpk
        if not rc.verify_raw(session.pb_key, sign[0], signed):
            raise _InstallError(CMD_ISC, ERR_SIGNATURE)
        try:
            shared = rc.ecka(session.ot_key, otpk[0])
        except ValueError as exc:
            raise _InstallError(CMD_ISC, ERR_INPUT) from exc
        mcv, s_enc, s_mac = rc.session_keys(shared, host_id[0], self.keys.eid)
        session.scp = rc.Scp03t(s_enc, s_mac, mcv)

    def _member(self, session: _Session, whole: bytes) -> None:
        scp = session.scp
        if scp is None:
            raise _InstallError(CMD_ISC, ERR_SCP03T_STRUCTURE)
        tag = whole[0]
        command = {
            "configure": CMD_CONFIGURE,
            "metadata": CMD_METADATA,
            "replace": CMD_REPLACE_KEYS,
            "profile": CMD_LOAD,
        }[session.phase]
        expected_tag = {"configure": 0x87, "metadata": 0x88, "replace": 0x87, "profile": 0x86}
        if tag != expected_tag[session.phase]:
            raise _InstallError(command, ERR_SCP03T_STRUCTURE)
        try:
            _, plain = scp.unprotect(whole, encrypted=tag != 0x88)
        except rc.BspError as exc:
            raise _InstallError(command, ERR_SCP03T_SECURITY) from exc
        if session.phase == "configure":
            if not plain.startswith(b"\xbf\x24"):
                raise _InstallError(command, ERR_INPUT)
        elif session.phase == "metadata":
            session.metadata += plain
        elif session.phase == "replace":
            items = rc.parse(plain)
            if not items or items[0][0] != 0xBF26:
                raise _InstallError(command, ERR_INPUT)
            keys = rc.parse(items[0][1])
            mcv, enc, mac = (rc.child(keys, t) for t in (0x80, 0x81, 0x82))
            if mcv is None or enc is None or mac is None:
                raise _InstallError(command, ERR_INPUT)
            session.scp = rc.Scp03t(enc[0], mac[0], mcv[0])
        else:
            session.package += plain
            if len(session.package) > self.free_memory:
                raise _InstallError(command, ERR_MEMORY)

    def _metadata_fields(self, session: _Session) -> list[tuple[int, bytes, bytes]]:
        items = rc.parse(session.metadata)
        if not items or items[0][0] != 0xBF25:
            raise _InstallError(CMD_METADATA, ERR_INPUT)
        return rc.parse(items[0][1])

    def _check_metadata(self, session: _Session) -> None:
        fields = self._metadata_fields(session)
        iccid = rc.child(fields, 0x5A)
        if iccid is None:
            raise _InstallError(CMD_METADATA, ERR_INPUT)
        from hw_fixtures.euicc import bcd_to_iccid

        if any(p.iccid == bcd_to_iccid(iccid[0]) for p in self.card.profiles):
            raise _InstallError(CMD_METADATA, ERR_ICCID_EXISTS)

    def _install(self, session: _Session) -> ProfileSpec:
        from hw_fixtures.euicc import bcd_to_iccid

        fields = self._metadata_fields(session)
        iccid_raw = (rc.child(fields, 0x5A) or (b"", b""))[0]
        iccid = bcd_to_iccid(iccid_raw)
        try:
            elements = rc.parse(bytes(session.package))
        except ValueError as exc:
            raise _InstallError(CMD_LOAD, ERR_PE) from exc
        if not elements or elements[0][0] != 0xA0 or elements[-1][0] != 0xAA:
            raise _InstallError(CMD_LOAD, ERR_PE)  # needs a header first and an end last
        header_iccid = rc.child(rc.parse(elements[0][1]), 0x83)
        if header_iccid is None or header_iccid[0] != iccid_raw:
            raise _InstallError(CMD_LOAD, ERR_MISMATCH)
        name = (rc.child(fields, 0x92) or (b"", b""))[0].decode("utf-8", "replace")
        provider = (rc.child(fields, 0x91) or (b"", b""))[0].decode("utf-8", "replace")
        klass = rc.child(fields, 0x95)
        profile_class = CLASS_NAMES.get(klass[0][-1] if klass and klass[0] else 2, "operational")
        slot = len(self.card.profiles)
        # notificationConfigurationInfo (B6): where enable/disable/delete notifications go.
        address = session.server_address
        config = rc.child(fields, 0xB6)
        if config is not None:
            for _t, entry, _w in rc.parse(config[0]):
                target = rc.child(rc.parse(entry), 0x81)
                if target is not None:
                    address = target[0].decode("utf-8", "replace")
                    break
        return ProfileSpec(
            iccid=iccid,
            name=name,
            provider=provider,
            profile_class=profile_class,
            notification_address=address,
            isdp_aid=f"A0000005591010FFFFFFFF89{0x1000 + 0x100 * slot + 0x10:08X}",
        )

    def _finish(self, session: _Session, error: tuple[int, int] | None = None) -> bytes:
        """Install (when no error so far) and answer with the signed ProfileInstallationResult."""
        self.session = None
        profile: ProfileSpec | None = None
        if error is None:
            try:
                if session.phase == "metadata":
                    self._check_metadata(session)
                profile = self._install(session)
            except _InstallError as exc:
                error = (exc.command, exc.reason)
        iccid_raw = b""
        if session.metadata:
            try:
                got = rc.child(self._metadata_fields(session), 0x5A)
                iccid_raw = got[0] if got else b""
            except (_InstallError, ValueError):
                iccid_raw = b""
        seq = self.card.next_seq
        self.card.next_seq += 1
        meta = rc.tlv(0x80, rc.uint(seq)) + rc.tlv(0x81, INSTALL_BIT)
        meta += rc.tlv(0x0C, session.server_address.encode())
        if iccid_raw:
            meta += rc.tlv(0x5A, iccid_raw)
        if profile is not None:
            final = rc.tlv(
                0xA0, rc.tlv(0x4F, bytes.fromhex(profile.isdp_aid or "")) + rc.tlv(0x04, b"")
            )
        else:
            assert error is not None
            final = rc.tlv(0xA1, rc.tlv(0x80, rc.uint(error[0])) + rc.tlv(0x81, rc.uint(error[1])))
        data = rc.tlv(
            0xBF27,
            rc.tlv(0x80, session.transaction_id)
            + rc.tlv(0xBF2F, meta)
            + (rc.tlv(0x06, _oid_content(session.smdp_oid)) if session.smdp_oid else b"")
            + rc.tlv(0xA2, final),
        )
        pir = rc.tlv(0xBF37, data + rc.tlv(0x5F37, rc.sign_raw(self.keys.euicc_key, data)))
        self.card.queue_install_notification(seq, pir, profile, session.server_address)
        return pir


def child(
    items: list[tuple[int, bytes, bytes]], tag: int, index: int
) -> tuple[bytes, bytes] | None:
    """(value, whole) of the index-th item with tag (AuthenticateServer has two SEQUENCEs)."""
    found = [(v, w) for t, v, w in items if t == tag]
    return found[index] if index < len(found) else None
