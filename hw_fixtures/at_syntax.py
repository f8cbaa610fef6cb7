"""Pure V.250 command-line splitting and 27.007 reply framing used by the modem core."""

from __future__ import annotations

import re
from dataclasses import dataclass

EXT_PREFIXES = "+!$^#%*"
_EXT_RE = re.compile(r"^([+!$^#%*][A-Za-z0-9_.]+)\s*(=\s*\?|\?|=)?(.*)$", re.DOTALL)

CME_TEXT: dict[int, str] = {
    3: "operation not allowed",
    4: "operation not supported",
    10: "SIM not inserted",
    11: "SIM PIN required",
    12: "SIM PUK required",
    13: "SIM failure",
    14: "SIM busy",
    16: "incorrect password",
    21: "invalid index",
    30: "no network service",
    50: "Incorrect parameters",
    100: "unknown",
}


@dataclass(frozen=True)
class Command:
    """One command of a command line: name in upper case, kind exec|set|query|test, raw args."""

    name: str
    kind: str
    args: str = ""


def split_outside_quotes(text: str, sep: str) -> list[str]:
    """Split on sep, ignoring separators inside double quotes."""
    parts: list[str] = []
    current: list[str] = []
    quoted = False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        if ch == sep and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return parts


def split_args(args: str) -> list[str]:
    """Comma-separated parameters with surrounding blanks and quotes removed."""
    if not args.strip():
        return []
    out = []
    for raw in split_outside_quotes(args, ","):
        item = raw.strip()
        if len(item) >= 2 and item[0] == '"' and item[-1] == '"':
            item = item[1:-1]
        out.append(item)
    return out


def _parse_basic(segment: str) -> list[Command] | None:
    cmds: list[Command] = []
    i = 0
    while i < len(segment):
        ch = segment[i].upper()
        if ch == " ":
            i += 1
            continue
        if ch in EXT_PREFIXES:
            ext = _parse_extended(segment[i:])
            if ext is None:
                return None
            cmds.append(ext)
            return cmds
        if ch == "&":
            if i + 1 >= len(segment):
                return None
            name = "&" + segment[i + 1].upper()
            i += 2
        elif ch == "S":
            m = re.match(r"S(\d+)(\?|=\d*)?", segment[i:], re.IGNORECASE)
            if m is None:
                return None
            op = m.group(2) or ""
            kind = "query" if op == "?" else "set" if op.startswith("=") else "exec"
            cmds.append(Command("S" + m.group(1), kind, op[1:] if kind == "set" else ""))
            i += m.end()
            continue
        elif ch.isalpha():
            name = ch
            i += 1
        else:
            return None
        j = i
        while j < len(segment) and segment[j].isdigit():
            j += 1
        cmds.append(Command(name, "exec", segment[i:j]))
        i = j
    return cmds


def _parse_extended(segment: str) -> Command | None:
    m = _EXT_RE.match(segment.strip())
    if m is None:
        return None
    op = (m.group(2) or "").replace(" ", "")
    kind = {"": "exec", "?": "query", "=": "set", "=?": "test"}[op]
    return Command(m.group(1).upper(), kind, m.group(3).strip())


def split_command_line(line: str) -> list[Command] | None:
    """Commands of one 'AT...' line ('AT+CREG=2;+CREG?', 'ATE0V1'); None on a syntax error."""
    text = line.strip()
    if text[:2].upper() != "AT":
        return None
    cmds: list[Command] = []
    for segment in split_outside_quotes(text[2:], ";"):
        seg = segment.strip()
        if not seg:
            continue
        if seg[0] in EXT_PREFIXES:
            ext = _parse_extended(seg)
            if ext is None:
                return None
            cmds.append(ext)
        else:
            basic = _parse_basic(seg)
            if basic is None:
                return None
            cmds.extend(basic)
    return cmds


def frame_info(line: str, verbose: bool) -> bytes:
    """An information text line as V.250 frames it (ATV1: CRLF line CRLF)."""
    body = line.encode("latin-1", "replace")
    return b"\r\n" + body + b"\r\n" if verbose else body + b"\r\n"


def frame_final(final: str | int, verbose: bool, cmee: int) -> bytes:
    """A final result code: "OK", "ERROR" or a CME error number, framed per ATV and AT+CMEE."""
    if isinstance(final, int):
        if cmee == 1:
            return frame_info(f"+CME ERROR: {final}", verbose)
        if cmee == 2:
            return frame_info(f"+CME ERROR: {CME_TEXT.get(final, 'unknown')}", verbose)
        final = "ERROR"
    if verbose:
        return b"\r\n" + final.encode() + b"\r\n"
    return (b"0" if final == "OK" else b"4") + b"\r"


def is_hex(text: str) -> bool:
    """True for an even-length string of hex digits in either case."""
    return len(text) % 2 == 0 and all(c in "0123456789abcdefABCDEF" for c in text)


def format_iccid(iccid: str, form: str) -> str:
    """ICCID digits as a vendor prints them: plain, F-padded to 20, or raw swapped nibbles."""
    padded = iccid.upper().ljust(20, "F")
    if form == "padded":
        return padded
    if form == "swapped":
        return "".join(padded[i + 1] + padded[i] for i in range(0, len(padded), 2))
    return iccid


def csq_index(rssi_dbm: int | None) -> int:
    """27.007 +CSQ <rssi> index for a dBm value; 99 when unknown."""
    if rssi_dbm is None:
        return 99
    return max(0, min(31, (rssi_dbm + 113) // 2))


def cesq_rsrp(rsrp_dbm: int | None) -> int:
    """27.007 +CESQ <rsrp> index (0..97); 255 when unknown."""
    return 255 if rsrp_dbm is None else max(0, min(97, rsrp_dbm + 141))


def cesq_rsrq(rsrq_db: int | None) -> int:
    """27.007 +CESQ <rsrq> index (0..34, half-dB steps from -19.5 dB); 255 when unknown."""
    return 255 if rsrq_db is None else max(0, min(34, int((rsrq_db + 20) * 2)))
