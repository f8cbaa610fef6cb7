"""ICCIDs as SGP.22 stores them: BCD with swapped nibbles, F-padded to 10 bytes."""

from __future__ import annotations

from agent.euicc.tlv import TlvError

ICCID_BYTES = 10


def normalize_iccid(text: str) -> str:
    """Digits of a user-typed ICCID (spaces, dashes and a trailing F removed); ValueError if bad."""
    digits = "".join(ch for ch in text.strip() if ch not in " -").upper().rstrip("F")
    if not digits.isdigit() or not 1 <= len(digits) <= 2 * ICCID_BYTES:
        raise ValueError(f"not an ICCID: {text!r}")
    return digits


def encode_iccid(iccid: str) -> bytes:
    """Human-order digits to the 10-byte swapped-nibble form."""
    digits = normalize_iccid(iccid).ljust(2 * ICCID_BYTES, "F")
    return bytes.fromhex("".join(digits[i + 1] + digits[i] for i in range(0, len(digits), 2)))


def decode_iccid(raw: bytes) -> str:
    """Swapped-nibble BCD to human-order digits; stops at the first F pad nibble."""
    out: list[str] = []
    for b in raw:
        for nibble in (b & 0x0F, b >> 4):
            if nibble == 0x0F:
                return "".join(out)
            if nibble > 9:
                raise TlvError(f"non-BCD nibble in ICCID {raw.hex().upper()}", raw)
            out.append(str(nibble))
    return "".join(out)
