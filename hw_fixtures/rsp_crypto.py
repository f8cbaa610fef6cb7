"""Crypto and TLV shared by the emulated eUICC and the test SM-DP+ (SGP.22 §2.6, Annex G).

Independent of agent/euicc on purpose: a mistake in the agent's codec must not be mirrored here.
Signatures inside SGP.22 data objects (5F37) are plain r‖s, 32 bytes each for P-256
(BSI TR-03111), not DER; cryptography speaks DER, so every sign/verify converts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import cmac, hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.x963kdf import X963KDF

COORD: Final = 32  # P-256 coordinate / scalar size
MAC_LEN: Final = 8  # SCP03t C-MAC: the 8 most significant bytes of the AES-CMAC
MAX_SEGMENT: Final = 1020  # one protected TLV, tag, length and MAC included (§2.5.3)
KEY_TYPE_AES: Final = 0x88
KEY_LEN: Final = 16


class BspError(Exception):
    """A protected TLV failed its MAC, padding or structure check."""


# ---------------------------------------------------------------- TLV


def tlv(tag: int, value: bytes = b"") -> bytes:
    """Encode one data object with a definite length of any size."""
    tag_b = tag.to_bytes(max(1, (tag.bit_length() + 7) // 8), "big")
    return tag_b + length_octets(len(value)) + value


def length_octets(n: int) -> bytes:
    """BER definite length."""
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def read_tlv(data: bytes, pos: int = 0) -> tuple[int, int, int]:
    """(tag, value start, value end) of the TLV at pos; ValueError when malformed or cut short."""
    try:
        tag = data[pos]
        pos += 1
        if tag & 0x1F == 0x1F:
            while True:
                b = data[pos]
                pos += 1
                tag = tag << 8 | b
                if not b & 0x80:
                    break
        n = data[pos]
        pos += 1
        if n & 0x80:
            k = n & 0x7F
            if not 0 < k <= 4 or pos + k > len(data):
                raise ValueError("bad length")
            n = int.from_bytes(data[pos : pos + k], "big")
            pos += k
    except IndexError as exc:
        raise ValueError("truncated TLV") from exc
    return tag, pos, pos + n


def parse(data: bytes) -> list[tuple[int, bytes, bytes]]:
    """Consecutive TLVs as (tag, value, whole encoding); ValueError when malformed."""
    out: list[tuple[int, bytes, bytes]] = []
    pos = 0
    while pos < len(data):
        tag, start, end = read_tlv(data, pos)
        if end > len(data):
            raise ValueError("TLV runs past the data")
        out.append((tag, data[start:end], data[pos:end]))
        pos = end
    return out


def child(items: list[tuple[int, bytes, bytes]], tag: int) -> tuple[bytes, bytes] | None:
    """(value, whole TLV) of the first item with tag."""
    return next(((v, w) for t, v, w in items if t == tag), None)


def uint(n: int) -> bytes:
    """Minimal two's-complement INTEGER content for a non-negative n."""
    return n.to_bytes(n.bit_length() // 8 + 1, "big")


# ---------------------------------------------------------------- signatures


def sign_raw(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    """ECDSA-SHA256 signature as r‖s."""
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(COORD, "big") + s.to_bytes(COORD, "big")


def verify_raw(public: ec.EllipticCurvePublicKey, signature: bytes, data: bytes) -> bool:
    """Check an r‖s ECDSA-SHA256 signature."""
    if len(signature) != 2 * COORD:
        return False
    der = encode_dss_signature(
        int.from_bytes(signature[:COORD], "big"), int.from_bytes(signature[COORD:], "big")
    )
    try:
        public.verify(der, data, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


def cert_public_key(cert: x509.Certificate) -> ec.EllipticCurvePublicKey:
    """The certificate's P-256 key; ValueError for anything else."""
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise ValueError("not a NIST P-256 key")
    return key


def issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """True when issuer signed cert."""
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def point(public: ec.EllipticCurvePublicKey) -> bytes:
    """Uncompressed point (04 X Y), the form 5F49 carries."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return public.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)


# ---------------------------------------------------------------- key agreement and SCP03t


def session_keys(
    shared_secret: bytes, host_id: bytes, eid: bytes, key_type: int = KEY_TYPE_AES
) -> tuple[bytes, bytes, bytes]:
    """(initial MAC chaining value, S-ENC, S-MAC) by the X9.63 KDF with SHA-256 (§2.6.4.2):
    SharedInfo = keyType | keyLength | L(hostId) | hostId | L(EID) | EID."""
    shared_info = (
        bytes([key_type, KEY_LEN])
        + length_octets(len(host_id))
        + host_id
        + length_octets(len(eid))
        + eid
    )
    out = X963KDF(hashes.SHA256(), 3 * KEY_LEN, shared_info).derive(shared_secret)
    return out[:KEY_LEN], out[KEY_LEN : 2 * KEY_LEN], out[2 * KEY_LEN :]


def _aes_cbc(key: bytes, iv: bytes, data: bytes, *, encrypt: bool) -> bytes:
    cipher = Cipher(algorithms.AES(key), modes.CBC(iv))
    op = cipher.encryptor() if encrypt else cipher.decryptor()
    return op.update(data) + op.finalize()


def _cmac(key: bytes, data: bytes) -> bytes:
    mac = cmac.CMAC(algorithms.AES(key))
    mac.update(data)
    return mac.finalize()


@dataclass
class Scp03t:
    """One direction of SCP03t/BSP: counter-derived ICVs, CBC with 80 00.. padding, chained CMAC."""

    s_enc: bytes
    s_mac: bytes
    mac_chain: bytes
    block: int = field(default=1)

    def _icv(self) -> bytes:
        # The data block counter, left-padded to 16 bytes and encrypted with S-ENC; it advances
        # for every segment, MAC-only ones included.
        icv = _aes_cbc(self.s_enc, bytes(16), self.block.to_bytes(16, "big"), encrypt=True)
        self.block += 1
        return icv

    def _mac(self, tag: int, body: bytes) -> bytes:
        header = bytes([tag]) + length_octets(len(body) + MAC_LEN)
        full = _cmac(self.s_mac, self.mac_chain + header + body)
        self.mac_chain = full
        return header + body + full[:MAC_LEN]

    def protect(self, tag: int, plaintext: bytes, *, encrypt: bool = True) -> list[bytes]:
        """Split plaintext into segments of at most MAX_SEGMENT bytes and protect each."""
        chunk = MAX_SEGMENT - 4 - MAC_LEN - (16 if encrypt else 0)
        out: list[bytes] = []
        for i in range(0, max(len(plaintext), 1), chunk):
            piece = plaintext[i : i + chunk]
            if encrypt:
                padded = piece + b"\x80" + bytes(-(len(piece) + 1) % 16)
                out.append(self._mac(tag, _aes_cbc(self.s_enc, self._icv(), padded, encrypt=True)))
            else:
                self.block += 1
                out.append(self._mac(tag, piece))
        return out

    def unprotect(self, segment: bytes, *, encrypted: bool = True) -> tuple[int, bytes]:
        """(tag, plaintext) of one protected TLV; BspError on a bad MAC or padding."""
        try:
            tag, start, end = read_tlv(segment)
        except ValueError as exc:
            raise BspError(str(exc)) from exc
        if end != len(segment) or end - start < MAC_LEN:
            raise BspError("protected TLV has a bad length")
        body, mac = segment[start : end - MAC_LEN], segment[end - MAC_LEN : end]
        full = _cmac(self.s_mac, self.mac_chain + segment[:start] + body)
        if full[:MAC_LEN] != mac:
            raise BspError("MAC mismatch")
        self.mac_chain = full
        if not encrypted:
            self.block += 1
            return tag, body
        if not body or len(body) % 16:
            raise BspError("ciphertext is not whole blocks")
        plain = _aes_cbc(self.s_enc, self._icv(), body, encrypt=False)
        stripped = plain.rstrip(b"\x00")
        if not stripped.endswith(b"\x80"):
            raise BspError("bad padding")
        return tag, stripped[:-1]


def ecka(private: ec.EllipticCurvePrivateKey, peer_point: bytes) -> bytes:
    """ECDH shared secret with a peer's uncompressed point."""
    peer = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), peer_point)
    return private.exchange(ec.ECDH(), peer)


def new_ot_key() -> ec.EllipticCurvePrivateKey:
    """A one-time ECKA key pair (otSK/otPK)."""
    return ec.generate_private_key(ec.SECP256R1())
