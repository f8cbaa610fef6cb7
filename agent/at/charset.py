"""Character sets a modem may use for text fields (27.007 +CSCS): GSM 03.38, UCS2, HEX, IRA."""

from __future__ import annotations

import re

# GSM 03.38 default alphabet, indexed by GSM code (0x00..0x7F).
_GSM_DEFAULT = (
    "@£$¥èéùìòÇ\nØø\rÅå"
    "Δ_ΦΓΛΩΠΨΣΘΞ\x1bÆæßÉ"
    " !\"#¤%&'()*+,-./"
    "0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNO"
    "PQRSTUVWXYZÄÖÑÜ§"
    "¿abcdefghijklmno"
    "pqrstuvwxyzäöñüà"
)

# Extension table reached through ESC (0x1B).
_GSM_EXTENSION = {
    0x0A: "\f",
    0x14: "^",
    0x28: "{",
    0x29: "}",
    0x2F: "\\",
    0x3C: "[",
    0x3D: "~",
    0x3E: "]",
    0x40: "|",
    0x65: "€",
}

_HEX_RE = re.compile(r"[0-9A-Fa-f]*")
_ESC = 0x1B


def decode_gsm(s: str) -> str:
    """Decode text whose code points are GSM 03.38 codes; code points above 0x7F pass through."""
    out: list[str] = []
    escaped = False
    for ch in s:
        code = ord(ch)
        if code > 0x7F:
            # The modem already handed us a real character; keep it rather than guess.
            out.append(ch)
            escaped = False
            continue
        if escaped:
            escaped = False
            # 03.38: an unknown extension code is shown as its default-table character.
            out.append(_GSM_EXTENSION.get(code, _GSM_DEFAULT[code]))
            continue
        if code == _ESC:
            escaped = True
            continue
        out.append(_GSM_DEFAULT[code])
    return "".join(out)


def is_hex(s: str) -> bool:
    """True when s is a non-empty even-length string of hex digits."""
    return bool(s) and len(s) % 2 == 0 and _HEX_RE.fullmatch(s) is not None


def decode_ucs2_hex(s: str) -> str | None:
    """Decode hex-encoded UTF-16BE; None when s is not valid UCS2 hex."""
    if not s or len(s) % 4 != 0 or _HEX_RE.fullmatch(s) is None:
        return None
    try:
        return bytes.fromhex(s).decode("utf-16-be")
    except (ValueError, UnicodeDecodeError):
        return None


def decode_hex(s: str) -> str | None:
    """Decode 27.007 HEX (one octet per character, no conversion); None when not hex."""
    if not is_hex(s):
        return None
    return bytes.fromhex(s).decode("latin-1")


def looks_like_ucs2(s: str) -> bool:
    """True when s is most likely UCS2 hex (modems that ignore +CSCS send it anyway)."""
    if len(s) < 8:
        return False
    decoded = decode_ucs2_hex(s)
    if decoded is None or not decoded.isprintable() or not decoded.strip():
        return False
    # Accept the alphabetic scripts below U+1000 and CJK ideographs; anything else is more likely
    # a name that happens to be made of hex digits.
    return all(ord(c) < 0x1000 or 0x4E00 <= ord(c) <= 0x9FFF for c in decoded)


def normalise_charset(charset: str) -> str:
    """Canonical upper-case charset name: GSM, UCS2, HEX, IRA, UTF-8, 8859-1 or the input."""
    name = charset.strip().strip('"').upper().replace("_", "-")
    aliases = {"UCS-2": "UCS2", "UTF-16": "UCS2", "UTF8": "UTF-8", "ISO-8859-1": "8859-1"}
    return aliases.get(name, name)


def decode_text(s: str, charset: str) -> str:
    """Decode a text field from the modem's character set; falls back to the raw text."""
    name = normalise_charset(charset)
    if name == "GSM":
        return decode_gsm(s)
    if name == "UCS2":
        decoded = decode_ucs2_hex(s)
        return s if decoded is None else decoded
    if name == "HEX":
        decoded = decode_hex(s)
        return s if decoded is None else decoded
    return s
