"""Activation codes (SGP.22 §4.1): `[LPA:]1$SM-DP+ address$Matching ID[$SM-DP+ OID[$CC flag]]`.

Parsing is pure and liberal in what users paste: a leading `LPA:` in any case, whitespace and
line breaks anywhere (QR scanners and mail clients insert them), an upper-case host.
"""

from __future__ import annotations

import re
from typing import Final

import msgspec

from agent.errors import ParseError

AC_FORMAT: Final = "1"
LPA_PREFIX: Final = "LPA:"
MAX_MATCHING_ID: Final = 255  # SGP.22: up to 255 characters (UTF8String in ES9+)
MAX_CODE: Final = 1024  # longer input is a paste accident, not an activation code

_WHITESPACE = re.compile(r"\s+")
# A DNS name (labels of letters, digits, hyphen), optionally with :port for test networks.
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_HOST = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*(?::(\d{{1,5}}))?$")
_OID = re.compile(r"^[0-2](?:\.(?:0|[1-9]\d*))+$")
_MATCHING_ID = re.compile(r"^[0-9A-Za-z-]*$")


class ActivationCodeError(ParseError):
    """The text is not an SGP.22 activation code; field names which part is wrong."""

    def __init__(self, message: str, text: str, field: str | None = None) -> None:
        super().__init__(message, text)
        self.field = field


class ActivationCode(msgspec.Struct, frozen=True, kw_only=True):
    """A parsed activation code; smdp_address is lower case, matching_id as issued."""

    smdp_address: str
    matching_id: str
    smdp_oid: str | None = None
    confirmation_code_required: bool = False

    @property
    def host(self) -> str:
        """The SM-DP+ host name without a port."""
        return (
            self.smdp_address.rsplit(":", 1)[0] if ":" in self.smdp_address else self.smdp_address
        )

    @property
    def port(self) -> int:
        """The TCP port (443 unless the address names one)."""
        return int(self.smdp_address.rsplit(":", 1)[1]) if ":" in self.smdp_address else 443

    def text(self) -> str:
        """The canonical activation code (without the `LPA:` prefix)."""
        fields = [AC_FORMAT, self.smdp_address, self.matching_id]
        if self.smdp_oid is not None or self.confirmation_code_required:
            fields.append(self.smdp_oid or "")
        if self.confirmation_code_required:
            fields.append("1")
        return "$".join(fields)


def masked(code: ActivationCode) -> str:
    """The code for logs, status and errors: the matching ID is a bearer token (whoever has it
    can download the profile once), so only its first two characters and its length show."""
    mid = code.matching_id
    hidden = f"{mid[:2]}…({len(mid)})" if len(mid) > 4 else f"…({len(mid)})"
    return f"1${code.smdp_address}${hidden}"


def parse_activation_code(text: str) -> ActivationCode:
    """Parse an activation code as users paste it; raises ActivationCodeError naming the field."""
    if len(text) > MAX_CODE:
        raise ActivationCodeError(f"activation code longer than {MAX_CODE} characters", text[:64])
    compact = _WHITESPACE.sub("", text)
    if compact[: len(LPA_PREFIX)].upper() == LPA_PREFIX:
        compact = compact[len(LPA_PREFIX) :]
    if not compact:
        raise ActivationCodeError("empty activation code", text)
    fields = compact.split("$")
    if fields[0] != AC_FORMAT:
        raise ActivationCodeError(
            f"unsupported activation code format {fields[0]!r} (expected '1$…')", text, "format"
        )
    if len(fields) < 3:
        raise ActivationCodeError(
            "activation code needs '1$SM-DP+ address$matching ID'", text, "smdp_address"
        )
    if len(fields) > 5:
        raise ActivationCodeError("activation code has more than five '$' fields", text)
    address = fields[1].lower()
    match = _HOST.match(address)
    if not address or match is None or len(address) > 255:
        raise ActivationCodeError(f"bad SM-DP+ address {fields[1]!r}", text, "smdp_address")
    if match.group(1) is not None and not 0 < int(match.group(1)) < 65536:
        raise ActivationCodeError(f"bad port in SM-DP+ address {fields[1]!r}", text, "smdp_address")
    matching_id = fields[2]
    if len(matching_id) > MAX_MATCHING_ID or not _MATCHING_ID.match(matching_id):
        raise ActivationCodeError(
            "matching ID may hold only letters, digits and '-'", text, "matching_id"
        )
    oid: str | None = None
    if len(fields) >= 4 and fields[3]:
        if not _OID.match(fields[3]):
            raise ActivationCodeError(f"bad SM-DP+ OID {fields[3]!r}", text, "smdp_oid")
        oid = fields[3]
    required = False
    if len(fields) == 5:
        if fields[4] not in ("0", "1", ""):
            raise ActivationCodeError(
                f"confirmation code flag must be 1 (or absent), not {fields[4]!r}",
                text,
                "confirmation_code_required",
            )
        required = fields[4] == "1"
    return ActivationCode(
        smdp_address=address,
        matching_id=matching_id,
        smdp_oid=oid,
        confirmation_code_required=required,
    )
