"""Pure parsers for 27.007 and vendor AT replies; every function raises only ParseError.

Liberal in what they accept: optional or missing prefixes, spaces, quotes, CR/LF, hex or decimal
fields, unknown trailing fields. Values that are present but meaningless become None; text that
cannot be read at all raises `agent.errors.ParseError`.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field, replace

from agent.at.charset import decode_text, decode_ucs2_hex, looks_like_ucs2, normalise_charset
from agent.errors import ParseError
from agent.models import ScannedOperator

# --------------------------------------------------------------------------- low-level helpers

_DEC_RE = re.compile(r"[+-]?[0-9]{1,18}")
_HEX_RE = re.compile(r"(?:0[xX])?([0-9A-Fa-f]{1,16})")
_FLOAT_RE = re.compile(r"[+-]?[0-9]{1,9}(?:\.[0-9]{1,9})?")
_ECHO_RE = re.compile(r"AT[+^!$%&*#@A-Z]", re.IGNORECASE)
_FINAL_LINES = frozenset({"OK"})


def _lines(text: str) -> list[str]:
    """Non-empty stripped lines, without a command echo or a trailing OK."""
    out: list[str] = []
    for raw in re.split(r"[\r\n]+", text):
        line = raw.strip()
        if not line or line.upper() in _FINAL_LINES:
            continue
        if _ECHO_RE.match(line) and not line.upper().startswith("AT&T"):
            continue
        out.append(line)
    return out


def _prefix_re(prefix: str) -> re.Pattern[str]:
    return re.compile(r"\s*" + re.escape(prefix.rstrip(":").strip()) + r"\s*:?\s*", re.IGNORECASE)


def strip_prefix(line: str, prefix: str) -> str:
    """Remove `prefix` (case-insensitive, ':' and spaces optional) from a line; stripped input passes."""
    m = _prefix_re(prefix).match(line)
    rest = line[m.end() :] if m else line
    return rest.strip(" \t\r\n")


def _payloads(text: str, prefixes: tuple[str, ...]) -> list[str]:
    """Payloads of the lines that carry one of `prefixes`, or of every line when none carries one."""
    lines = _lines(text)
    found: list[str] = []
    for line in lines:
        for prefix in prefixes:
            if _prefix_re(prefix).match(line):
                found.append(strip_prefix(line, prefix))
                break
    return found if found else lines


def _payload(text: str, prefixes: tuple[str, ...]) -> str:
    """The first payload for `prefixes`; ParseError when the text is empty."""
    found = _payloads(text, prefixes)
    if not found:
        raise ParseError("empty reply", text)
    return found[0]


def _split_raw(s: str) -> list[str]:
    """Comma split honouring quotes and parentheses; fields keep their quotes and brackets."""
    fields: list[str] = []
    buf: list[str] = []
    depth = 0
    quoted = False
    for ch in s:
        if ch == '"':
            quoted = not quoted
        elif not quoted:
            if ch == "(":
                depth += 1
            elif ch == ")":
                depth = max(0, depth - 1)
            elif ch == "," and depth == 0:
                fields.append("".join(buf).strip())
                buf = []
                continue
        buf.append(ch)
    fields.append("".join(buf).strip())
    return fields


def _unquote(s: str) -> str:
    s = s.strip(" \t\r\n")
    if s.startswith('"'):
        s = s[1:]
    if s.endswith('"'):
        s = s[:-1]
    return s.strip()


def split_fields(s: str) -> list[str]:
    """Comma split honouring quotes and parentheses; strips spaces and surrounding quotes."""
    return [_unquote(f) for f in _split_raw(s)]


def _is_quoted(raw: str) -> bool:
    return raw.strip().startswith('"')


def _int(s: str, what: str = "integer") -> int:
    s = _unquote(s)
    if not _DEC_RE.fullmatch(s):
        raise ParseError(f"not a decimal {what}: {s!r}", s)
    return int(s)


def _opt_int(s: str | None) -> int | None:
    if s is None:
        return None
    s = _unquote(s)
    return int(s) if _DEC_RE.fullmatch(s) else None


def _opt_hex(s: str | None) -> int | None:
    if s is None:
        return None
    # Some firmware pads hex fields with inner spaces (`0 5`).
    m = _HEX_RE.fullmatch(re.sub(r"\s+", "", _unquote(s)))
    return int(m.group(1), 16) if m else None


def _opt_float(s: str | None) -> float | None:
    if s is None:
        return None
    s = _unquote(s)
    return float(s) if _FLOAT_RE.fullmatch(s) else None


def _get(fields: list[str], i: int) -> str | None:
    return fields[i] if i < len(fields) and fields[i] != "" else None


def _ranges(group: str) -> list[tuple[int, int]]:
    """`(0-3,5)` or `0` → [(0, 3), (5, 5)]; tolerates spaces, quotes and empty groups."""
    inner = group.strip().strip("()").strip()
    out: list[tuple[int, int]] = []
    for raw_item in inner.split(","):
        item = _unquote(raw_item)
        if not item:
            continue
        lo_s, sep, hi_s = item.partition("-")
        lo = _int(lo_s, "range start")
        hi = _int(hi_s, "range end") if sep else lo
        if hi < lo:
            lo, hi = hi, lo
        out.append((lo, hi))
    return out


def _expand(ranges: list[tuple[int, int]], limit: int = 1024) -> list[int]:
    values: list[int] = []
    for lo, hi in ranges:
        if hi - lo > limit:
            raise ParseError(f"range too wide: {lo}-{hi}")
        values.extend(range(lo, hi + 1))
    return sorted(set(values))


# --------------------------------------------------------------------------- errors

CME_ERRORS: dict[int, str] = {
    0: "phone failure",
    1: "no connection to phone",
    2: "phone-adaptor link reserved",
    3: "operation not allowed",
    4: "operation not supported",
    5: "PH-SIM PIN required",
    6: "PH-FSIM PIN required",
    7: "PH-FSIM PUK required",
    10: "SIM not inserted",
    11: "SIM PIN required",
    12: "SIM PUK required",
    13: "SIM failure",
    14: "SIM busy",
    15: "SIM wrong",
    16: "incorrect password",
    17: "SIM PIN2 required",
    18: "SIM PUK2 required",
    20: "memory full",
    21: "invalid index",
    22: "not found",
    23: "memory failure",
    24: "text string too long",
    25: "invalid characters in text string",
    26: "dial string too long",
    27: "invalid characters in dial string",
    30: "no network service",
    31: "network timeout",
    32: "network not allowed - emergency calls only",
    40: "network personalization PIN required",
    41: "network personalization PUK required",
    42: "network subset personalization PIN required",
    43: "network subset personalization PUK required",
    44: "service provider personalization PIN required",
    45: "service provider personalization PUK required",
    46: "corporate personalization PIN required",
    47: "corporate personalization PUK required",
    48: "hidden key required",
    49: "EAP method not supported",
    50: "incorrect parameters",
    51: "command implemented but currently disabled",
    52: "command aborted by user",
    53: "not attached to network due to MT functionality restrictions",
    54: "modem not allowed - MT restricted to emergency calls only",
    55: "operation not allowed because of MT functionality restrictions",
    56: "fixed dial number only allowed",
    57: "temporarily out of service due to other MT usage",
    58: "language/alphabet not supported",
    59: "unexpected data value",
    60: "system failure",
    61: "data missing",
    62: "call barred",
    63: "message waiting indication subscription failure",
    100: "unknown",
    103: "illegal MS",
    106: "illegal ME",
    107: "GPRS services not allowed",
    111: "PLMN not allowed",
    112: "location area not allowed",
    113: "roaming not allowed in this location area",
    132: "service option not supported",
    133: "requested service option not subscribed",
    134: "service option temporarily out of order",
    148: "unspecified GPRS error",
    149: "PDP authentication failure",
    150: "invalid mobile class",
}

CMS_ERRORS: dict[int, str] = {
    300: "ME failure",
    301: "SMS service of ME reserved",
    302: "operation not allowed",
    303: "operation not supported",
    304: "invalid PDU mode parameter",
    305: "invalid text mode parameter",
    310: "SIM not inserted",
    311: "SIM PIN required",
    312: "PH-SIM PIN required",
    313: "SIM failure",
    314: "SIM busy",
    315: "SIM wrong",
    316: "SIM PUK required",
    317: "SIM PIN2 required",
    318: "SIM PUK2 required",
    320: "memory failure",
    321: "invalid memory index",
    322: "memory full",
    330: "SMSC address unknown",
    331: "no network service",
    332: "network timeout",
    340: "no +CNMA acknowledgement expected",
    500: "unknown error",
}


MAX_ERROR_CODE_DIGITS = 6  # 27.007 codes are below 1000; vendors' reach the tens of thousands
MAX_ERROR_TEXT = 256
_ERROR_CODE_RE = re.compile(rf"[0-9]{{1,{MAX_ERROR_CODE_DIGITS}}}")


def _parse_error(line: str, prefix: str, table: dict[int, str]) -> tuple[int | None, str | None]:
    lines = _lines(line)
    if not lines:
        raise ParseError(f"empty {prefix}", line[:MAX_ERROR_TEXT])
    payload = _unquote(strip_prefix(lines[0], prefix))
    if not payload:
        raise ParseError(f"{prefix} without a code", line[:MAX_ERROR_TEXT])
    # A "number" too long to be a code is kept as text, so a garbled line cannot make a huge int.
    if _ERROR_CODE_RE.fullmatch(payload):
        code = int(payload)
        text = table.get(code)
        return code, text[0].upper() + text[1:] if text else None
    return None, payload[:MAX_ERROR_TEXT]


def parse_cme_error(line: str) -> tuple[int | None, str | None]:
    """`+CME ERROR: <n|text>` → (code, text); text is 27.007's wording for well-known codes."""
    return _parse_error(line, "+CME ERROR", CME_ERRORS)


def parse_cms_error(line: str) -> tuple[int | None, str | None]:
    """`+CMS ERROR: <n|text>` → (code, text); text is 27.005's wording for well-known codes."""
    return _parse_error(line, "+CMS ERROR", CMS_ERRORS)


# --------------------------------------------------------------------------- SIM and identity

_CPIN_RE = re.compile(r"(?:PH-[A-Z]+|SIM) (?:PIN|PUK)2?")
_CPIN_ABSENT = ("NOT INSERTED", "NOT PRESENT", "NO SIM", "SIM REMOVED", "SIM NOT", "ABSENT")


def parse_cpin(text: str) -> str:
    """`+CPIN: <code>` → `ready`, `absent`, a lock such as `sim-pin`/`ph-net-pin`, or `unknown`."""
    value = _unquote(_payload(text, ("+CPIN",)))
    code = re.sub(r"\s+", " ", value.upper()).strip()
    if code == "READY":
        return "ready"
    if any(marker in code for marker in _CPIN_ABSENT):
        return "absent"
    if _CPIN_RE.fullmatch(code):
        return code.lower().replace(" ", "-")
    return "unknown"


_ICCID_PREFIXES = (
    "+CCID",
    "+ICCID",
    "^ICCID",
    "!ICCID",
    "+QCCID",
    "+CICCID",
    "ICCID",
    "^SCID",
    "+SCID",
)
_ICCID_CHARS = re.compile(r"[0-9A-F]+")


def parse_iccid(text: str) -> str:
    """ICCID digits from a +CCID-style reply: de-swapped, F padding removed; ParseError if invalid."""
    value = _payload(text, _ICCID_PREFIXES)
    value = _unquote(value).replace(" ", "").upper()
    if not _ICCID_CHARS.fullmatch(value):
        raise ParseError("ICCID has invalid characters", text)
    if value.startswith("98"):
        if len(value) % 2:
            raise ParseError("swapped ICCID has an odd length", text)
        value = "".join(value[i + 1] + value[i] for i in range(0, len(value), 2))
    value = value.rstrip("F")
    if not value.startswith("89"):
        raise ParseError("ICCID major industry identifier is not 89", text)
    if not 18 <= len(value) <= 22:
        raise ParseError(f"ICCID length {len(value)} outside 18..22", text)
    return value


_IMEI_RE = re.compile(r"[0-9]{15}")
_ESN_RE = re.compile(r"(?:0[xX])?([0-9A-Fa-f]{8})")
_MEID_RE = re.compile(r"(?:0[xX])?([0-9A-Fa-f]{14})")


def parse_gsn(text: str) -> tuple[str | None, str | None, str | None]:
    """AT+CGSN/AT+GSN → (imei, esn, meid); ESN/MEID upper-case hex; garbage raises ParseError.

    The serial is the first comma-separated field; some firmware appends more fields (software
    version, a second IMEI slot, a checksum) after it, and those are ignored.
    """
    imei: str | None = None
    esn: str | None = None
    meid: str | None = None
    for payload in _payloads(text, ("+CGSN", "+GSN", "IMEI", "+IMEI")):
        first = _split_raw(payload)[0]
        for raw_token in first.split():
            token = _unquote(raw_token)
            if not token:
                continue
            if _IMEI_RE.fullmatch(token):
                imei = token
            elif m := _ESN_RE.fullmatch(token):
                esn = m.group(1).upper()
            elif m := _MEID_RE.fullmatch(token):
                meid = m.group(1).upper()
            else:
                raise ParseError(f"not an IMEI, ESN or MEID: {token!r}", text)
    if imei is None and esn is None and meid is None:
        raise ParseError("no serial number in reply", text)
    return imei, esn, meid


# --------------------------------------------------------------------------- access technologies

ACT_NAMES: dict[int, str] = {
    0: "gsm",
    1: "gsm-compact",
    2: "umts",
    3: "edge",
    4: "hsdpa",
    5: "hsupa",
    6: "hspa",
    7: "lte",
    8: "ec-gsm-iot",
    9: "nb-iot",
    10: "lte-5gc",
    11: "5gnr",
    12: "ng-ran",
    13: "en-dc",
}

_ACT_FAMILY = {
    "gsm": "gsm",
    "gsm-compact": "gsm",
    "ec-gsm-iot": "gsm",
    "umts": "umts",
    "hsdpa": "umts",
    "hsupa": "umts",
    "hspa": "umts",
    "edge": "edge",
    "lte": "lte",
    "nb-iot": "lte",
    "lte-5gc": "lte",
    "5gnr": "5gnr",
    "ng-ran": "5gnr",
    "en-dc": "5gnr",
}


def act_name(code: int | None) -> str:
    """27.007 <AcT> number → name; `unknown` for None or numbers 27.007 does not define."""
    return ACT_NAMES.get(code, "unknown") if code is not None else "unknown"


def act_family(name: str) -> str:
    """Fold an AcT name to gsm, umts, edge, lte, 5gnr or unknown."""
    return _ACT_FAMILY.get(name, "unknown")


def rat_family(name: str) -> str:
    """Fold a vendor technology label (`FDD LTE`, `WCDMA`, `NR5G-NSA`, `HSPA+`) to an AcT family."""
    label = name.strip().strip('"').upper()
    if not label or "NOSERVICE" in label.replace(" ", "") or label in {"NONE", "NO SERVICE"}:
        return "unknown"
    if re.search(r"(?:^|[^A-Z])NR|5G|EN-?DC", label):
        return "5gnr"
    if "LTE" in label or "CAT-M" in label or "NB" in label or "EUTRA" in label or label == "4G":
        return "lte"
    if "EDGE" in label or "EGPRS" in label:
        return "edge"
    if any(k in label for k in ("WCDMA", "UMTS", "HSPA", "HSDPA", "HSUPA", "TD-SCDMA", "TDSCDMA")):
        return "umts"
    if label in {"3G", "TDS"}:
        return "umts"
    if "GSM" in label or "GPRS" in label or label == "2G":
        return "gsm"
    return "unknown"


# --------------------------------------------------------------------------- signal


def parse_csq(text: str) -> tuple[int | None, int | None]:
    """`+CSQ: <rssi>,<ber>` → (rssi dBm, ber 0..7); 99 and out-of-range values → None."""
    fields = split_fields(_payload(text, ("+CSQ",)))
    rssi = _int(fields[0], "rssi")
    ber = _opt_int(_get(fields, 1))
    if rssi == 0:
        dbm: int | None = -113
    elif 1 <= rssi <= 31:
        dbm = -113 + 2 * rssi if rssi != 1 else -111
    else:
        dbm = None
    return dbm, ber if ber is not None and 0 <= ber <= 7 else None


@dataclass(frozen=True, slots=True)
class CesqReading:
    """+CESQ raw levels and 27.007 §8.69 physical values; None where the level is not known."""

    rxlev: int
    ber: int
    rscp: int
    ecno: int
    rsrq: int
    rsrp: int
    ss_rsrq: int | None = None
    ss_rsrp: int | None = None
    ss_sinr: int | None = None
    rssi_dbm: int | None = None
    rscp_dbm: int | None = None
    ecno_db: float | None = None
    rsrq_db: float | None = None
    rsrp_dbm: int | None = None
    ss_rsrq_db: float | None = None
    ss_rsrp_dbm: int | None = None
    ss_sinr_db: float | None = None


def _in(v: int | None, lo: int, hi: int) -> int | None:
    return v if v is not None and lo <= v <= hi else None


def parse_cesq(text: str) -> CesqReading:
    """`+CESQ: rxlev,ber,rscp,ecno,rsrq,rsrp[,ss_rsrq,ss_rsrp,ss_sinr]` → CesqReading."""
    fields = split_fields(_payload(text, ("+CESQ",)))
    if len(fields) < 6:
        raise ParseError("+CESQ needs six fields", text)
    rxlev, ber, rscp, ecno, rsrq, rsrp = (_int(f) for f in fields[:6])
    ss = [_opt_int(_get(fields, i)) for i in (6, 7, 8)]
    rx = _in(rxlev, 0, 63)
    sc = _in(rscp, 0, 96)
    ec = _in(ecno, 0, 49)
    rq = _in(rsrq, 0, 34)
    rp = _in(rsrp, 0, 97)
    ssq = _in(ss[0], 0, 127)
    ssp = _in(ss[1], 0, 126)
    ssn = _in(ss[2], 0, 127)
    return CesqReading(
        rxlev=rxlev,
        ber=ber,
        rscp=rscp,
        ecno=ecno,
        rsrq=rsrq,
        rsrp=rsrp,
        ss_rsrq=ss[0],
        ss_rsrp=ss[1],
        ss_sinr=ss[2],
        rssi_dbm=None if rx is None else rx - 111,
        rscp_dbm=None if sc is None else sc - 121,
        ecno_db=None if ec is None else ec / 2 - 24.5,
        rsrq_db=None if rq is None else rq / 2 - 20,
        rsrp_dbm=None if rp is None else rp - 141,
        ss_rsrq_db=None if ssq is None else ssq / 2 - 43,
        ss_rsrp_dbm=None if ssp is None else ssp - 157,
        ss_sinr_db=None if ssn is None else ssn / 2 - 23,
    )


# --------------------------------------------------------------------------- registration

REG_STATES: dict[int, str] = {
    0: "not_registered",
    1: "home",
    2: "searching",
    3: "denied",
    5: "roaming",
    6: "home",
    7: "roaming",
    9: "home",
    10: "roaming",
}

REG_STATE_DETAIL: dict[int, str] = {
    0: "IDLE",
    1: "HOME",
    2: "SEARCHING",
    3: "DENIED",
    4: "UNKNOWN",
    5: "ROAMING",
    6: "HOME_SMS_ONLY",
    7: "ROAMING_SMS_ONLY",
    8: "EMERGENCY_ONLY",
    9: "HOME_CSFB_NOT_PREFERRED",
    10: "ROAMING_CSFB_NOT_PREFERRED",
    11: "ATTACHED_RLOS",
}

_REG_KINDS = ("C5GREG", "CEREG", "CGREG", "CREG")
_REG_PREFIX_RE = re.compile(r"\s*\+?(C5GREG|CEREG|CGREG|CREG)\s*:?\s*", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class RegReply:
    """One +CREG/+CGREG/+CEREG/+C5GREG reply; lac for CREG/CGREG, tac for CEREG/C5GREG."""

    kind: str
    stat: int
    state: str
    n: int | None = None
    act: str = "unknown"
    act_raw: int | None = None
    lac: int | None = None
    tac: int | None = None
    cell_id: int | None = None
    solicited: bool = True

    @property
    def state_detail(self) -> str:
        """27.007's finer state name (HOME_SMS_ONLY, ATTACHED_RLOS …) or UNKNOWN."""
        return REG_STATE_DETAIL.get(self.stat, "UNKNOWN")


def reg_state(stat: int) -> str:
    """27.007 <stat> → home/roaming/searching/denied/not_registered/unknown."""
    return REG_STATES.get(stat, "unknown")


def _is_act(raw: str | None) -> bool:
    if raw is None or _is_quoted(raw):
        return False
    v = _opt_int(raw)
    return v is not None and 0 <= v <= 13 and len(raw.strip()) <= 2


def _looks_like_n_stat(raw: list[str]) -> bool:
    """True when the first two fields read as <n>,<stat> rather than <stat>,<lac>."""
    if len(raw) < 2 or _is_quoted(raw[0]) or _is_quoted(raw[1]):
        return False
    n = _opt_int(raw[0])
    stat = _opt_int(raw[1])
    return (
        n is not None and 0 <= n <= 5 and stat is not None and 0 <= stat <= 15 and len(raw[1]) <= 3
    )


def parse_registration(
    text: str, kind: str | None = None, solicited: bool | None = None
) -> RegReply:
    """Registration reply, solicited (`n,stat,...`) or URC (`stat,...`), told apart by shape.

    `kind` is used when the prefix is missing; `solicited`, when given, overrides the guess for
    the reported flag (a URC never carries <n> in 27.007, but some modems send it anyway).
    """
    lines = _lines(text)
    line = next((ln for ln in lines if _REG_PREFIX_RE.match(ln)), lines[0] if lines else "")
    m = _REG_PREFIX_RE.match(line)
    if m:
        found = m.group(1).upper()
        body = line[m.end() :]
    else:
        found = (kind or "CREG").upper().lstrip("+")
        body = line
    if found not in _REG_KINDS:
        raise ParseError(f"unknown registration kind {found!r}", text)
    raw = _split_raw(body.strip())
    if not raw or raw == [""]:
        raise ParseError("empty registration reply", text)
    count = len(raw)
    # Index of n, stat, area, cell, act within raw; -1 = absent.
    n_i, stat_i, area_i, cell_i, act_i = -1, 0, 1, 2, 3
    guess_solicited = False
    if count == 2 and _unquote(raw[1]) == "":
        n_i, stat_i, area_i, cell_i, act_i = -1, 0, -1, -1, -1
    elif count == 2:
        n_i, stat_i, area_i, cell_i, act_i = 0, 1, -1, -1, -1
        guess_solicited = True
    elif count == 4:
        if not _is_quoted(raw[1]) and (_is_quoted(raw[2]) or not _is_act(raw[3])):
            n_i, stat_i, area_i, cell_i, act_i = 0, 1, 2, 3, -1
            guess_solicited = True
    elif count >= 5:
        if _looks_like_n_stat(raw):
            guess_solicited = True
            if not _is_act(raw[4]) and count == 6 and _is_act(raw[5]):
                # Novatel LTE: n,stat,tac,rac,ci,act.
                n_i, stat_i, area_i, cell_i, act_i = 0, 1, 2, 4, 5
            else:
                n_i, stat_i, area_i, cell_i, act_i = 0, 1, 2, 3, 4
        elif not _is_act(raw[3]) and _is_act(raw[4]):
            # stat,tac,rac,ci,act.
            n_i, stat_i, area_i, cell_i, act_i = -1, 0, 1, 3, 4

    def pick(i: int) -> str | None:
        return None if i < 0 or i >= count else (_unquote(raw[i]) or None)

    stat_s = pick(stat_i)
    stat = _opt_int(stat_s) if stat_s is not None else None
    if stat is None or stat < 0:
        raise ParseError("registration reply without a valid <stat>", text)
    n = _opt_int(pick(n_i)) if n_i >= 0 else None
    act_s = pick(act_i)
    # Samsung puts letters where the AcT belongs; only a short decimal is an AcT.
    act_raw = _opt_int(act_s) if act_s is not None and len(act_s) <= 2 else None
    area = _opt_hex(pick(area_i))
    cell = _opt_hex(pick(cell_i))
    is_lac = found in ("CREG", "CGREG")
    return RegReply(
        kind=found,
        stat=stat,
        state=reg_state(stat),
        n=n,
        act=act_name(act_raw),
        act_raw=act_raw,
        lac=area if is_lac else None,
        tac=None if is_lac else area,
        cell_id=cell,
        solicited=guess_solicited if solicited is None else solicited,
    )


# --------------------------------------------------------------------------- operators

_COPS_STATUS = {0: "unknown", 1: "available", 2: "current", 3: "forbidden"}


@dataclass(frozen=True, slots=True)
class CopsRead:
    """AT+COPS? → mode, format, operator (decoded; numeric when format is 2), AcT family."""

    mode: int
    format: int | None = None
    operator: str | None = None
    act: str = "unknown"
    act_raw: int | None = None


def _decode_name(name: str, charset: str) -> str | None:
    if not name:
        return None
    cs = normalise_charset(charset)
    if cs != "UCS2" and looks_like_ucs2(name):
        # Several modems report UCS2 names whatever +CSCS says.
        return decode_text(name, "UCS2")
    return decode_text(name, cs)


def parse_cops_read(text: str, charset: str = "GSM") -> CopsRead:
    """`+COPS: <mode>[,<format>,<oper>[,<AcT>]]` → CopsRead."""
    fields = split_fields(_payload(text, ("+COPS",)))
    mode = _int(fields[0], "mode")
    fmt = _opt_int(_get(fields, 1))
    oper_raw = _get(fields, 2)
    act_raw = _opt_int(_get(fields, 3))
    operator: str | None = None
    if oper_raw is not None:
        operator = _decode_numeric(oper_raw) if fmt == 2 else _decode_name(oper_raw, charset)
    return CopsRead(
        mode=mode,
        format=fmt,
        operator=operator,
        act=act_family(act_name(act_raw)),
        act_raw=act_raw,
    )


_PLMN_RE = re.compile(r"[0-9]{5,7}")
# `"26201"),7)`: a stray `)` closes the entry before its AcT (seen on Huawei and ZTE firmware).
_STRAY_PAREN_RE = re.compile(r'"\s*\)\s*,\s*([0-9]{1,2})\s*\)')


def _decode_numeric(value: str) -> str:
    """A numeric operator id; modems in UCS2 mode send it hex-encoded (`00320036...` = `26...`)."""
    if _PLMN_RE.fullmatch(value):
        return value
    decoded = decode_ucs2_hex(value)
    if decoded is not None and _PLMN_RE.fullmatch(decoded):
        return decoded
    return value


def _cops_body(text: str) -> str:
    """The scan reply as one string: a long list arrives split across lines, with or without a
    `+COPS:` prefix on the continuation lines, and sometimes split inside an entry."""
    parts: list[str] = []
    for line in _lines(text):
        parts.append(strip_prefix(line, "+COPS") if _prefix_re("+COPS").match(line) else line)
    return _STRAY_PAREN_RE.sub(r'",\1)', "".join(parts))


def _paren_groups(s: str) -> list[str]:
    """Top-level `( … )` groups, quotes honoured; an unterminated last group is kept."""
    groups: list[str] = []
    depth = 0
    quoted = False
    start = -1
    for i, ch in enumerate(s):
        if ch == '"':
            quoted = not quoted
        elif not quoted and ch == "(":
            if depth == 0:
                start = i + 1
            depth += 1
        elif not quoted and ch == ")" and depth > 0:
            depth -= 1
            if depth == 0:
                groups.append(s[start:i])
    if depth > 0 and start >= 0:
        groups.append(s[start:])
    return groups


def parse_cops_test(text: str, charset: str = "GSM") -> list[ScannedOperator]:
    """AT+COPS=? → operators; stops at the trailing mode/format ranges; names decoded via charset."""
    body = _cops_body(text)
    operators: list[ScannedOperator] = []
    for group in _paren_groups(body):
        raw = _split_raw(group)
        fields = [_unquote(f) for f in raw]
        if len(fields) < 4:
            break
        status = _opt_int(fields[0])
        has_quotes = any(_is_quoted(f) for f in raw[1:4])
        if status is None or not (has_quotes or _PLMN_RE.fullmatch(fields[3])):
            break
        act_raw = _opt_int(_get(fields, 4))
        operators.append(
            ScannedOperator(
                long=_decode_name(fields[1], charset),
                short=_decode_name(fields[2], charset),
                numeric=_decode_numeric(fields[3]) or None,
                status=_COPS_STATUS.get(status, "unknown"),
                # 27.007 lists without <AcT> predate UMTS: they are GSM.
                act=act_family(act_name(act_raw)) if act_raw is not None else "gsm",
            )
        )
    if not operators and not _paren_groups(body) and body.strip():
        raise ParseError("no operator groups in +COPS=? reply", text)
    return operators


# --------------------------------------------------------------------------- functionality, PDP


def parse_cfun(text: str) -> int:
    """`+CFUN: <fun>[,...]` → fun."""
    return _int(split_fields(_payload(text, ("+CFUN",)))[0], "fun")


def parse_cscs(text: str) -> str:
    """`+CSCS: "<chset>"` → canonical charset name (GSM, UCS2, IRA …)."""
    value = _unquote(_payload(text, ("+CSCS",)))
    if not value or "," in value or "(" in value:
        raise ParseError("not a +CSCS read reply", text)
    return normalise_charset(value)


@dataclass(frozen=True, slots=True)
class PdpContext:
    """One +CGDCONT? line: context id, PDP type as the modem wrote it (IP, IPV6, IPV4V6), APN."""

    cid: int
    pdp_type: str
    apn: str


def pdp_family(pdp_type: str) -> str:
    """IP/IPV6/IPV4V6/PPP/Non-IP → ipv4/ipv6/ipv4v6/ppp/non-ip; anything else lower-cased."""
    t = pdp_type.strip().upper()
    return {"IP": "ipv4", "IPV4": "ipv4", "IPV6": "ipv6", "IPV4V6": "ipv4v6", "PPP": "ppp"}.get(
        t, t.lower()
    )


def parse_cgdcont_read(text: str) -> list[PdpContext]:
    """AT+CGDCONT? → one PdpContext per line."""
    out: list[PdpContext] = []
    for payload in _payloads(text, ("+CGDCONT",)):
        fields = split_fields(payload)
        cid = _int(fields[0], "cid")
        out.append(
            PdpContext(cid=cid, pdp_type=(_get(fields, 1) or "").upper(), apn=_get(fields, 2) or "")
        )
    return out


@dataclass(frozen=True, slots=True)
class PdpFormat:
    """One +CGDCONT=? line: the first contiguous cid range and the PDP family it supports."""

    min_cid: int
    max_cid: int
    pdp_type: str


def parse_cgdcont_test(text: str) -> list[PdpFormat]:
    """AT+CGDCONT=? → formats; non-IP lines (PPP …) are skipped, split cid ranges keep the first run."""
    out: list[PdpFormat] = []
    for payload in _payloads(text, ("+CGDCONT",)):
        fields = _split_raw(payload)
        if len(fields) < 2:
            raise ParseError("+CGDCONT=? line without a PDP type", text)
        family = pdp_family(_unquote(fields[1]))
        if family not in ("ipv4", "ipv6", "ipv4v6"):
            continue
        ranges = _ranges(fields[0])
        if not ranges:
            raise ParseError("+CGDCONT=? line without cids", text)
        lo, hi = ranges[0]
        for nlo, nhi in ranges[1:]:
            if nlo != hi + 1:
                break
            hi = nhi
        out.append(PdpFormat(min_cid=lo, max_cid=hi, pdp_type=family))
    return out


def parse_cgact_read(text: str) -> list[tuple[int, bool]]:
    """AT+CGACT? (or Sierra AT!SCACT?) → [(cid, active)]."""
    out: list[tuple[int, bool]] = []
    for payload in _payloads(text, ("+CGACT", "!SCACT")):
        fields = split_fields(payload)
        if len(fields) < 2:
            raise ParseError("+CGACT line needs cid and state", text)
        out.append((_int(fields[0], "cid"), _int(fields[1], "state") != 0))
    return out


def _octets(parts: list[str]) -> bytes | None:
    if all(re.fullmatch(r"[0-9]{1,3}", p) and int(p) <= 255 for p in parts):
        return bytes(int(p) for p in parts)
    return None


def normalise_address(addr: str) -> str:
    """Rewrite the 16-part dotted IPv6 form some modems use into compressed colon notation."""
    parts = addr.split(".")
    if len(parts) == 16 and (raw := _octets(parts)) is not None:
        return str(ipaddress.IPv6Address(raw))
    return addr


def parse_cgpaddr(text: str) -> list[tuple[int, list[str]]]:
    """AT+CGPADDR → [(cid, [addresses])]; empty and all-zero addresses are dropped."""
    out: list[tuple[int, list[str]]] = []
    for payload in _payloads(text, ("+CGPADDR",)):
        fields = split_fields(payload)
        cid = _int(fields[0], "cid")
        addrs = [normalise_address(a) for a in fields[1:] if a and a not in {"0.0.0.0", "::"}]
        out.append((cid, addrs))
    return out


@dataclass(frozen=True, slots=True)
class ContextParams:
    """One +CGCONTRDP line: addresses of an active bearer (None where not given)."""

    cid: int
    bearer_id: int | None = None
    apn: str | None = None
    local_address: str | None = None
    subnet: str | None = None
    gateway: str | None = None
    dns_primary: str | None = None
    dns_secondary: str | None = None


def _is_netmask(value: str | None, version: int | None = None) -> bool:
    """Whether value is a contiguous netmask (dotted IPv4 or IPv6) other than all-zeros."""
    if not value:
        return False
    try:
        mask = ipaddress.ip_address(normalise_address(value))
    except ValueError:
        return False
    if version is not None and mask.version != version:
        return False
    bits = int(mask)
    width = mask.max_prefixlen
    ones = bin(bits).count("1")
    return ones > 0 and bits == ((1 << ones) - 1) << (width - ones)


def _ip_version(value: str) -> int | None:
    try:
        return ipaddress.ip_address(value).version
    except ValueError:
        return None


def _split_addr_mask(value: str) -> tuple[str, str | None] | None:
    """One field holding address and mask → (address, mask); None if it holds an address only.

    Forms: post-v9.4.0 dotted `a.b.c.d.m.m.m.m` (8 parts) or 32-part IPv6; with AT+CGPIAF
    `addr/plen`, or `addr mask` separated by a space.
    """
    value = value.strip()
    if "/" in value:
        addr, _, plen = value.partition("/")
        return normalise_address(addr.strip()), plen.strip() or None
    if " " in value:
        addr, _, mask = value.partition(" ")
        return normalise_address(addr.strip()), normalise_address(mask.strip()) or None
    parts = value.split(".")
    if len(parts) == 8 and _octets(parts) is not None:
        return ".".join(parts[:4]), ".".join(parts[4:])
    if len(parts) == 32 and _octets(parts) is not None:
        addr6 = normalise_address(".".join(parts[:16]))
        mask6 = normalise_address(".".join(parts[16:]))
        return addr6, mask6
    return None


def parse_cgcontrdp(text: str) -> list[ContextParams]:
    """AT+CGCONTRDP (27.007 §10.1.23) → one ContextParams per line (dual stack: two per cid).

    Address and mask come combined in one field (dotted 8/32 parts, `a/len`, `a mask`) or, on
    pre-v9.4.0 modems, as two fields; the second field counts as a mask only when it is one.
    """
    out: list[ContextParams] = []
    for payload in _payloads(text, ("+CGCONTRDP",)):
        fields = split_fields(payload)
        cid = _int(fields[0], "cid")
        rest = fields[3:]
        local: str | None = None
        subnet: str | None = None
        combined = _split_addr_mask(rest[0]) if rest and rest[0] else None
        if combined is not None:
            local, subnet = combined
        elif rest and rest[0]:
            local = normalise_address(rest[0])
            if _is_netmask(_get(rest, 1), _ip_version(local)):
                # Pre-v9.4.0 layout: address and mask are separate fields.
                subnet = normalise_address(rest[1])
                rest = rest[1:]

        def addr(i: int, fields_: list[str] = rest) -> str | None:
            v = _get(fields_, i)
            return normalise_address(v) if v else None

        out.append(
            ContextParams(
                cid=cid,
                bearer_id=_opt_int(_get(fields, 1)),
                apn=_get(fields, 2),
                local_address=local,
                subnet=subnet,
                gateway=addr(1),
                dns_primary=addr(2),
                dns_secondary=addr(3),
            )
        )
    return out


def parse_usb_mode(text: str, prefix: str) -> int:
    """A vendor's USB network mode number: `+QCFG: "usbnet",1` → 1, `+GTUSBMODE: 31` → 31."""
    payload = _payload(text, (prefix,))
    fields = split_fields(payload)
    if prefix.upper() == "+QCFG":
        if len(fields) < 2 or fields[0].lower() != "usbnet":
            raise ParseError('not a +QCFG: "usbnet" reply', text)
        return _int(fields[1], "usbnet mode")
    return _int(fields[0], "USB mode")


# --------------------------------------------------------------------------- +CGEV (§10.1.19)


@dataclass(frozen=True, slots=True)
class CgevEvent:
    """One +CGEV URC: who (`nw`/`me`/None), what, and the context it concerns.

    `action`: act, deact, detach, reject, react, class, modify. `pdn` is True for the PDN
    (default bearer) forms. `cid` is the context the event is about (for the secondary-bearer
    forms `NW ACT <p_cid>,<cid>,<event_type>` that is `cid`, with `parent_cid` the PDN's).
    """

    origin: str | None
    action: str
    pdn: bool = False
    cid: int | None = None
    parent_cid: int | None = None
    event_type: int | None = None
    pdp_type: str | None = None
    pdp_address: str | None = None
    klass: str | None = None
    raw: str = ""

    @property
    def name(self) -> str:
        """A stable name such as `nw_pdn_deact`, `me_deact`, `nw_detach`."""
        parts = [self.origin] if self.origin else []
        parts += ["pdn"] if self.pdn else []
        parts.append(self.action)
        return "_".join(parts)

    @property
    def context_lost(self) -> bool:
        """Whether the event takes a data context (or all of them) away."""
        # REJECT is a network-requested activation the modem turned down: nothing was lost.
        return self.action in ("deact", "detach")

    @property
    def context_up(self) -> bool:
        """Whether the event brings a context up (or back)."""
        return self.action in ("act", "react")


_CGEV_RE = re.compile(
    r"^(?:(?P<origin>NW|ME)\s+)?(?:(?P<eps>EPS)\s+)?(?:(?P<pdn>PDN)\s+)?"
    r"(?P<action>ACT|DEACT|DETACH|REJECT|REACT|CLASS|MODIFY)\b\s*(?P<rest>.*)$",
    re.IGNORECASE,
)


def parse_cgev(text: str) -> CgevEvent:
    """A +CGEV URC (27.007 §10.1.19, old and new forms) → CgevEvent; ParseError otherwise.

    Liberal: prefix and spaces optional, `EPS PDN ACT` (some Quectel firmware), quoted or bare
    fields, and the pre-Rel-8 `NW DEACT <PDP_type>,<PDP_addr>[,<cid>]` beside the new
    `NW DEACT <p_cid>,<cid>,<event_type>`.
    """
    payload = _payload(text, ("+CGEV",))
    m = _CGEV_RE.match(payload.strip())
    if not m:
        raise ParseError("not a +CGEV event", text)
    origin = m.group("origin").lower() if m.group("origin") else None
    action = m.group("action").lower()
    pdn = bool(m.group("pdn") or m.group("eps"))
    rest = m.group("rest").strip()
    fields = split_fields(rest) if rest else []
    raw = payload.strip()
    if action == "class":
        return CgevEvent(origin, action, klass=fields[0] if fields else None, raw=raw)
    if action == "detach":
        return CgevEvent(origin, action, raw=raw)
    if pdn:
        if not fields or not fields[0]:
            raise ParseError("+CGEV PDN event without a cid", text)
        return CgevEvent(origin, action, pdn=True, cid=_int(fields[0], "cid"), raw=raw)
    if fields and fields[0] and not _DEC_RE.fullmatch(fields[0]):
        # Old form: <PDP_type>, <PDP_addr>[, <cid>] (REJECT, NW REACT, NW/ME DEACT).
        cid_text = _get(fields, 2)
        return CgevEvent(
            origin,
            action,
            cid=_int(cid_text, "cid") if cid_text else None,
            pdp_type=fields[0].upper(),
            pdp_address=normalise_address(fields[1]) if _get(fields, 1) else None,
            raw=raw,
        )
    ints = [_int(f, "field") if f else None for f in fields]
    if action in ("act", "deact", "modify") and len(ints) >= 2 and origin is not None:
        # New form: <p_cid>, <cid>, <event_type> (MODIFY: <cid>, <change_reason>, <event_type>).
        if action == "modify":
            return CgevEvent(origin, action, cid=ints[0], event_type=_get_int(ints, 2), raw=raw)
        return CgevEvent(
            origin, action, cid=ints[1], parent_cid=ints[0], event_type=_get_int(ints, 2), raw=raw
        )
    if action in ("act", "deact", "modify", "react") and ints:
        return CgevEvent(origin, action, cid=ints[0], raw=raw)
    if action == "reject" or not ints:
        if action in ("act", "deact") and origin is None:
            raise ParseError("+CGEV ACT/DEACT without a cid", text)
        return CgevEvent(origin, action, raw=raw)
    return CgevEvent(origin, action, cid=ints[0], raw=raw)


def _get_int(values: list[int | None], i: int) -> int | None:
    return values[i] if i < len(values) else None


# --------------------------------------------------------------------------- SIM access


_HEX_PAYLOAD_RE = re.compile(r"(?:[0-9A-F]{2}){2,}")
# Prefixes whose hex payload may come unquoted: field reports of `+CGLA: 4,9000`. A `+CSIM`
# reply without quotes stays invalid, as ModemManager reads it (conformance mm-csim-13).
_UNQUOTED_HEX_OK = frozenset({"+CGLA"})


def parse_apdu_response(text: str, prefix: str) -> tuple[int, str]:
    """`<prefix>: <length>,"<hex>"` (+CSIM, +CGLA) → (length, upper-case hex incl. SW1 SW2).

    27.007 §8.17/§8.43 read liberally: no space after the colon, spaces inside the hex, a line
    without the prefix (Fibocom), and for +CGLA unquoted hex. The length is advisory (it counts
    hex characters, but firmware miscounts); a reply shorter than a status word is invalid, and so
    is one without a length: it cannot be told from garbage.
    """
    payload = _payload(text, (prefix,))
    # The length holds no comma or quote: a plain partition spares a character walk over the
    # data (up to 512 hex characters per APDU on every eUICC exchange).
    head, sep, data = payload.partition(",")
    if not sep:
        raise ParseError(f"{prefix} reply without a length", text)
    length = _int(head, "length")
    data = data.split(",", 1)[0].strip()  # trailing fields, if any, are not ours to read
    quoted = len(data) >= 2 and data.startswith('"') and data.endswith('"')
    if not quoted and prefix.upper() not in _UNQUOTED_HEX_OK:
        raise ParseError(f"{prefix} data is not quoted", text)
    hex_ = re.sub(r"\s+", "", data[1:-1] if quoted else data).upper()
    if not _HEX_PAYLOAD_RE.fullmatch(hex_):
        raise ParseError(f"{prefix} data is not hex ending in a status word", text)
    return length, hex_


def parse_csim(text: str) -> tuple[int, str]:
    """`+CSIM: <length>,"<hex>"` → (length, upper-case hex)."""
    return parse_apdu_response(text, "+CSIM")


def parse_cgla(text: str) -> tuple[int, str]:
    """`+CGLA: <length>,"<hex>"` → (length, upper-case hex); the length counts hex characters."""
    return parse_apdu_response(text, "+CGLA")


MAX_SESSION_CHARS = 16  # a 64-bit token in hex (Sierra) is the longest any modem sends


def parse_ccho(text: str) -> str:
    """The session id of `+CCHO: <id>`, or of a bare id line (Fibocom); an opaque token."""
    payload = _payload(text, ("+CCHO",))
    token = payload.strip().strip('"').strip()
    if not re.fullmatch(rf"[0-9A-Fa-f]{{1,{MAX_SESSION_CHARS}}}", token):
        raise ParseError("+CCHO session id is not a number or hex token", text[:256])
    return token


def csim_pin_retries(hex_: str) -> int:
    """Retries left from a VERIFY status word `63Cx`; other status words raise ParseError."""
    if len(hex_) < 4:
        raise ParseError("response shorter than a status word", hex_)
    sw = hex_[-4:].upper()
    if not re.fullmatch(r"[0-9A-F]{4}", sw):
        raise ParseError("status word is not hex", hex_)
    if sw[:3] == "63C":
        return int(sw[3], 16)
    if sw == "6300":
        raise ParseError("SIM verification failed", hex_)
    raise ParseError(f"unknown status 0x{sw.lower()}", hex_)


def parse_crsm(text: str) -> tuple[int, int, str]:
    """`+CRSM: <sw1>,<sw2>[,<hex>]` (hex quoted or not) → (sw1, sw2, hex as sent or "")."""
    fields = split_fields(_payload(text, ("+CRSM",)))
    if len(fields) < 2:
        raise ParseError("+CRSM needs sw1 and sw2", text)
    sw1 = _int(fields[0], "sw1")
    sw2 = _int(fields[1], "sw2")
    if not (0 <= sw1 <= 255 and 0 <= sw2 <= 255):
        raise ParseError("+CRSM status word out of range", text)
    data = _get(fields, 2) or ""
    if data and not re.fullmatch(r"[0-9A-Fa-f]*", data):
        raise ParseError("+CRSM data is not hex", text)
    return sw1, sw2, data


# --------------------------------------------------------------------------- test commands


@dataclass(frozen=True, slots=True)
class Indicator:
    """One +CIND=? entry: name, 1-based index and value range."""

    name: str
    index: int
    min: int
    max: int


def parse_cind_test(text: str) -> list[Indicator]:
    """`+CIND: ("name",(lo-hi)),…` → indicators (lower-case names); empty groups are skipped."""
    body = _payload(text, ("+CIND",))
    out: list[Indicator] = []
    for group in _paren_groups(body):
        raw = _split_raw(group)
        name = _unquote(raw[0]).lower()
        if not name:
            continue
        values = _expand(_ranges(raw[1])) if len(raw) > 1 else []
        out.append(
            Indicator(
                name=name,
                index=len(out) + 1,
                min=values[0] if values else 0,
                max=values[-1] if values else 0,
            )
        )
    return out


def parse_cmer_test(text: str) -> tuple[list[int], list[int]]:
    """`+CMER: (modes),(keyp),(disp),(ind)[,…]` → (modes, ind values)."""
    fields = _split_raw(_payload(text, ("+CMER",)))
    modes = _expand(_ranges(fields[0]))
    ind = _expand(_ranges(fields[3])) if len(fields) > 3 else []
    return modes, ind


def parse_cpms_test(text: str) -> tuple[list[str], list[str], list[str]]:
    """`+CPMS: (mem1…),(mem2…),(mem3…)` → three lists of lower-case storage names (`sm`, `me` …)."""
    fields = _split_raw(_payload(text, ("+CPMS",)))
    mems: list[list[str]] = []
    for i in range(3):
        group = fields[i].strip() if i < len(fields) else ""
        inner = group.strip("()")
        mems.append([v.lower() for v in split_fields(inner) if v])
    return mems[0], mems[1], mems[2]


# --------------------------------------------------------------------------- vendor: Quectel


@dataclass(frozen=True, slots=True)
class QcsqReading:
    """Quectel +QCSQ: technology family and physical values (sinr_db = raw/5 - 20 on LTE)."""

    rat: str
    rssi_dbm: int | None = None
    rsrp_dbm: int | None = None
    sinr_db: float | None = None
    rsrq_db: int | None = None
    rscp_dbm: int | None = None
    ecio_db: float | None = None


def parse_qcsq(text: str) -> QcsqReading:
    """`+QCSQ: "<sysmode>",…` → QcsqReading; NOSERVICE gives rat `unknown` and no values."""
    fields = split_fields(_payload(text, ("+QCSQ",)))
    mode = fields[0].upper()
    if not mode:
        raise ParseError("+QCSQ without a system mode", text)
    values = [_opt_int(_get(fields, i)) for i in range(1, 5)]
    rat = rat_family(mode)
    if rat == "lte":
        sinr = values[2]
        return QcsqReading(
            rat=rat,
            rssi_dbm=values[0],
            rsrp_dbm=values[1],
            sinr_db=None if sinr is None else sinr / 5 - 20,
            rsrq_db=values[3],
        )
    if rat == "5gnr":
        # Quectel's NR5G rows carry rsrp, sinr (dB), rsrq.
        sinr_nr = values[1]
        return QcsqReading(
            rat=rat,
            rsrp_dbm=values[0],
            sinr_db=None if sinr_nr is None else float(sinr_nr),
            rsrq_db=values[2],
        )
    if rat == "umts":
        ecio = _opt_float(_get(fields, 3))
        return QcsqReading(rat=rat, rssi_dbm=values[0], rscp_dbm=values[1], ecio_db=ecio)
    if rat in ("gsm", "edge"):
        return QcsqReading(rat=rat, rssi_dbm=values[0])
    return QcsqReading(rat="unknown")


@dataclass(frozen=True, slots=True)
class QengCell:
    """One serving-cell row of Quectel +QENG: "servingcell" (None where the row lacks a field)."""

    state: str | None
    rat: str
    mcc: str | None = None
    mnc: str | None = None
    cell_id: int | None = None
    pci: int | None = None
    earfcn: int | None = None
    band: int | None = None
    tac: int | None = None
    lac: int | None = None
    rsrp_dbm: int | None = None
    rsrq_db: int | None = None
    rssi_dbm: int | None = None
    rscp_dbm: int | None = None
    sinr_db: float | None = None


def _qeng_row(state: str | None, tech: str, f: list[str]) -> QengCell:
    """Fields after the technology label, laid out as Quectel documents for each technology."""
    t = tech.upper()
    if t == "LTE":
        # is_tdd,mcc,mnc,cellid,pci,earfcn,band,ul_bw,dl_bw,tac,rsrp,rsrq,rssi,sinr,…
        sinr = _opt_int(_get(f, 13))
        return QengCell(
            state=state,
            rat="lte",
            mcc=_get(f, 1),
            mnc=_get(f, 2),
            cell_id=_opt_hex(_get(f, 3)),
            pci=_opt_int(_get(f, 4)),
            earfcn=_opt_int(_get(f, 5)),
            band=_opt_int(_get(f, 6)),
            tac=_opt_hex(_get(f, 9)),
            rsrp_dbm=_opt_int(_get(f, 10)),
            rsrq_db=_opt_int(_get(f, 11)),
            rssi_dbm=_opt_int(_get(f, 12)),
            sinr_db=None if sinr is None else sinr / 5 - 20,
        )
    if t == "NR5G-SA":
        # duplex,mcc,mnc,cellid,pci,tac,arfcn,band,dl_bw,rsrp,rsrq,sinr,…
        sinr = _opt_int(_get(f, 11))
        return QengCell(
            state=state,
            rat="5gnr",
            mcc=_get(f, 1),
            mnc=_get(f, 2),
            cell_id=_opt_hex(_get(f, 3)),
            pci=_opt_int(_get(f, 4)),
            tac=_opt_hex(_get(f, 5)),
            earfcn=_opt_int(_get(f, 6)),
            band=_opt_int(_get(f, 7)),
            rsrp_dbm=_opt_int(_get(f, 9)),
            rsrq_db=_opt_int(_get(f, 10)),
            sinr_db=None if sinr is None else float(sinr),
        )
    if t == "NR5G-NSA":
        # mcc,mnc,pci,rsrp,sinr,rsrq,arfcn,band
        sinr = _opt_int(_get(f, 4))
        return QengCell(
            state=state,
            rat="5gnr",
            mcc=_get(f, 0),
            mnc=_get(f, 1),
            pci=_opt_int(_get(f, 2)),
            rsrp_dbm=_opt_int(_get(f, 3)),
            sinr_db=None if sinr is None else float(sinr),
            rsrq_db=_opt_int(_get(f, 5)),
            earfcn=_opt_int(_get(f, 6)),
            band=_opt_int(_get(f, 7)),
        )
    if t == "WCDMA":
        # mcc,mnc,lac,cellid,uarfcn,psc,rac,rscp,ecio,…
        return QengCell(
            state=state,
            rat="umts",
            mcc=_get(f, 0),
            mnc=_get(f, 1),
            lac=_opt_hex(_get(f, 2)),
            cell_id=_opt_hex(_get(f, 3)),
            earfcn=_opt_int(_get(f, 4)),
            pci=_opt_int(_get(f, 5)),
            rscp_dbm=_opt_int(_get(f, 7)),
        )
    if t == "GSM":
        # mcc,mnc,lac,cellid,bsic,arfcn,band,rxlev,…
        return QengCell(
            state=state,
            rat="gsm",
            mcc=_get(f, 0),
            mnc=_get(f, 1),
            lac=_opt_hex(_get(f, 2)),
            cell_id=_opt_hex(_get(f, 3)),
            earfcn=_opt_int(_get(f, 5)),
            band=_opt_int(_get(f, 6)),
            rssi_dbm=_opt_int(_get(f, 7)),
        )
    return QengCell(state=state, rat=rat_family(t))


def parse_qeng_servingcell(text: str) -> list[QengCell]:
    """`+QENG: "servingcell",…` (single row, or NSA's state row plus LTE/NR rows) → cells."""
    state: str | None = None
    cells: list[QengCell] = []
    for payload in _payloads(text, ("+QENG",)):
        fields = split_fields(payload)
        if fields[0].lower() == "servingcell":
            state = _get(fields, 1)
            if len(fields) > 2:
                cells.append(_qeng_row(state, fields[2], fields[3:]))
        elif fields[0]:
            cells.append(_qeng_row(state, fields[0], fields[1:]))
    if state is None and not cells:
        raise ParseError("no +QENG serving cell", text)
    if not cells:
        cells.append(QengCell(state=state, rat="unknown"))
    return cells


@dataclass(frozen=True, slots=True)
class QnwInfo:
    """Quectel +QNWINFO: AcT family, PLMN, band label, channel."""

    act: str
    act_label: str
    operator_numeric: str | None
    band: str | None
    channel: int | None


def parse_qnwinfo(text: str) -> QnwInfo:
    """`+QNWINFO: "<act>","<oper>","<band>",<channel>` → QnwInfo."""
    fields = split_fields(_payload(text, ("+QNWINFO",)))
    if not fields[0]:
        raise ParseError("+QNWINFO without a technology", text)
    return QnwInfo(
        act=rat_family(fields[0]),
        act_label=fields[0],
        operator_numeric=_get(fields, 1),
        band=_get(fields, 2),
        channel=_opt_int(_get(fields, 3)),
    )


# --------------------------------------------------------------------------- vendor: Huawei


@dataclass(frozen=True, slots=True)
class HcsqReading:
    """Huawei ^HCSQ: AcT family, label and five raw values (0 where absent).

    Huawei's levels are steps of a range whose lower bound is taken, as for 27.007 +CESQ:
    LTE `rssi,rsrp,sinr,rsrq`; WCDMA `rssi,rscp,ecio`; GSM `rssi`. 255 means unknown.
    """

    act: str
    mode: str
    values: tuple[int, int, int, int, int]

    def _level(self, i: int, top: int) -> int | None:
        v = self.values[i]
        return v if 0 < v <= top else None

    @property
    def rssi_dbm(self) -> int | None:
        """RSSI (-121 + value, 1..96) on every technology."""
        v = self._level(0, 96)
        return None if v is None else v - 121

    @property
    def rsrp_dbm(self) -> int | None:
        """LTE RSRP (-141 + value); None on other technologies or when unknown (255)."""
        v = self._level(1, 97)
        return v - 141 if self.act == "lte" and v is not None else None

    @property
    def sinr_db(self) -> float | None:
        """LTE SINR (-20.2 + value / 5, 1..251)."""
        v = self._level(2, 251)
        return round(v / 5 - 20.2, 1) if self.act == "lte" and v is not None else None

    @property
    def rsrq_db(self) -> float | None:
        """LTE RSRQ (value / 2 - 20, 1..34)."""
        v = self._level(3, 34)
        return v / 2 - 20 if self.act == "lte" and v is not None else None


def parse_hcsq(text: str) -> HcsqReading:
    """`^HCSQ: "<sysmode>",v1[,v2…v5]` → HcsqReading; NOSERVICE and friends raise ParseError."""
    fields = split_fields(_payload(text, ("^HCSQ",)))
    mode = fields[0].upper()
    act = rat_family(mode)
    if act == "unknown" or len(fields) < 2:
        raise ParseError(f"^HCSQ reports no service ({mode or 'empty'})", text)
    vals = [_int(v) for v in fields[1:6] if v != ""]
    vals += [0] * (5 - len(vals))
    return HcsqReading(act=act, mode=mode, values=(vals[0], vals[1], vals[2], vals[3], vals[4]))


@dataclass(frozen=True, slots=True)
class SysInfo:
    """Huawei ^SYSINFO / ^SYSINFOEX fields (None where absent)."""

    srv_status: int
    srv_domain: int | None
    roam_status: int | None
    sys_mode: int | None
    sim_state: int | None
    lock_state: int | None = None
    sys_submode: int | None = None
    sys_mode_name: str | None = None
    sys_submode_name: str | None = None


def parse_sysinfo(text: str) -> SysInfo:
    """`^SYSINFO: srv_status,srv_domain,roam,sys_mode,sim_state[,lock,submode]` → SysInfo."""
    fields = split_fields(_payload(text, ("^SYSINFO",)))
    if len(fields) < 5:
        raise ParseError("^SYSINFO needs five fields", text)
    return SysInfo(
        srv_status=_int(fields[0]),
        srv_domain=_opt_int(fields[1]),
        roam_status=_opt_int(fields[2]),
        sys_mode=_opt_int(fields[3]),
        sim_state=_opt_int(fields[4]),
        lock_state=_opt_int(_get(fields, 5)),
        sys_submode=_opt_int(_get(fields, 6)),
    )


def parse_sysinfoex(text: str) -> SysInfo:
    """`^SYSINFOEX: srv,domain,roam,sim,lock,sysmode,name,submode,name` → SysInfo."""
    fields = split_fields(_payload(text, ("^SYSINFOEX",)))
    if len(fields) < 4:
        raise ParseError("^SYSINFOEX needs at least four fields", text)
    return SysInfo(
        srv_status=_int(fields[0]),
        srv_domain=_opt_int(fields[1]),
        roam_status=_opt_int(fields[2]),
        sim_state=_opt_int(fields[3]),
        lock_state=_opt_int(_get(fields, 4)),
        sys_mode=_opt_int(_get(fields, 5)),
        sys_mode_name=_get(fields, 6),
        sys_submode=_opt_int(_get(fields, 7)),
        sys_submode_name=_get(fields, 8),
    )


# --------------------------------------------------------------------------- vendor: Cinterion


@dataclass(frozen=True, slots=True)
class SmoniReading:
    """Cinterion ^SMONI serving cell: tech 2g/3g/4g/none and the values that tech reports."""

    tech: str
    rssi_dbm: int | None = None
    ecn0_db: float | None = None
    rscp_dbm: int | None = None
    rsrp_dbm: int | None = None
    rsrq_db: float | None = None


def parse_smoni(text: str) -> SmoniReading:
    """`^SMONI: <ACT>,…` → SmoniReading; SEARCH or too few fields give tech `none`."""
    fields = split_fields(_payload(text, ("^SMONI",)))
    tech = fields[0].lower()
    if tech not in ("2g", "3g", "4g"):
        raise ParseError(f"^SMONI with unknown technology {fields[0]!r}", text)
    if len(fields) < 5 or fields[1].upper() == "SEARCH":
        return SmoniReading(tech="none")
    if tech == "2g":
        return SmoniReading(tech=tech, rssi_dbm=_opt_int(fields[2]))
    if tech == "3g":
        return SmoniReading(tech=tech, ecn0_db=_opt_float(fields[3]), rscp_dbm=_opt_int(fields[4]))
    if len(fields) < 14:
        return SmoniReading(tech="none")
    return SmoniReading(tech=tech, rsrp_dbm=_opt_int(fields[12]), rsrq_db=_opt_float(fields[13]))


# --------------------------------------------------------------------------- vendor: Intel/Fibocom


@dataclass(frozen=True, slots=True)
class XlecReading:
    """Intel/Fibocom +XLEC carrier aggregation: component carriers, their bandwidth codes and bands."""

    num_cc: int
    bandwidths: tuple[int, ...] = field(default_factory=tuple)
    bands: tuple[str, ...] = field(default_factory=tuple)

    @property
    def primary_band(self) -> str | None:
        """The primary cell's band label, e.g. BAND_LTE_1."""
        return self.bands[0] if self.bands else None


def parse_xlec(text: str) -> XlecReading:
    """`+XLEC: <mode>,<num_cc>,<bw>[,…],<band>[,…]` → XlecReading."""
    fields = split_fields(_payload(text, ("+XLEC",)))
    if len(fields) < 2:
        raise ParseError("+XLEC needs at least mode and carrier count", text)
    num_cc = _int(fields[1], "carrier count")
    bws: list[int] = []
    bands: list[str] = []
    for f in fields[2:]:
        v = _opt_int(f)
        if v is not None:
            bws.append(v)
        elif f:
            bands.append(f)
    return XlecReading(num_cc=num_cc, bandwidths=tuple(bws), bands=tuple(bands))


# --------------------------------------------------------------------------- vendor: SIMCom


@dataclass(frozen=True, slots=True)
class CpsiReading:
    """SIMCom +CPSI serving cell: technology family, operator, area, cell and signal values."""

    rat: str
    online: bool = False
    mcc_mnc: str | None = None
    tac: int | None = None  # the LAC on GSM and WCDMA rows
    cell_id: int | None = None
    band: str | None = None
    rsrp_dbm: float | None = None
    rsrq_db: float | None = None
    rssi_dbm: float | None = None
    sinr_db: float | None = None


def _tenths(s: str | None) -> float | None:
    v = _opt_int(s)
    return None if v is None else v / 10


def parse_cpsi(text: str) -> CpsiReading:
    """`+CPSI: <mode>,<op mode>,<mcc>-<mnc>,<tac>,<cell>,…` → CpsiReading.

    LTE: `…,<pci>,<band>,<earfcn>,<dlbw>,<ulbw>,<rsrq>,<rsrp>,<rssi>,<rssnr>`, with RSRQ, RSRP and
    RSSI in tenths of a dB and RSSNR in dB; NR5G_SA: `…,<pci>,<band>,<arfcn>,<rsrp>,<rsrq>,<sinr>`
    all in tenths. `NO SERVICE` and other technologies give the family and no signal values.
    """
    fields = split_fields(_payload(text, ("+CPSI",)))
    mode = fields[0].upper()
    if not mode:
        raise ParseError("+CPSI without a system mode", text)
    rat = rat_family(mode.replace("_", "-"))
    online = (_get(fields, 1) or "").lower() == "online"
    if rat == "unknown" or len(fields) < 5:
        return CpsiReading(rat=rat, online=online)
    plmn = (_get(fields, 2) or "").replace("-", "")
    base = CpsiReading(
        rat=rat,
        online=online,
        mcc_mnc=plmn if _PLMN_RE.fullmatch(plmn) else None,
        tac=_opt_hex(_get(fields, 3)),
        cell_id=_opt_int(_get(fields, 4)),
    )
    if rat == "lte" and "NR" not in mode:
        sinr = _opt_int(_get(fields, 13))
        return replace(
            base,
            band=_get(fields, 6),
            rsrq_db=_tenths(_get(fields, 10)),
            rsrp_dbm=_tenths(_get(fields, 11)),
            rssi_dbm=_tenths(_get(fields, 12)),
            sinr_db=None if sinr is None else float(sinr),
        )
    if rat == "5gnr" and "SA" in mode and "NSA" not in mode:
        return replace(
            base,
            band=_get(fields, 6),
            rsrp_dbm=_tenths(_get(fields, 8)),
            rsrq_db=_tenths(_get(fields, 9)),
            sinr_db=_tenths(_get(fields, 10)),
        )
    return base
