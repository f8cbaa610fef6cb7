"""The one ICCID rule for what users type (CLI, config, MQTT): 18-20 digits, optional trailing F.

ITU-T E.118 ICCIDs are 19 or 20 digits (18 on some older cards); an F pads the BCD form to
whole bytes and is dropped. Spaces and dashes, as printed on SIM carriers, are ignored.
"""

from __future__ import annotations

import re

#: The rule as a regular expression over the compact form (what MQTT payloads are checked with).
ICCID_PATTERN = r"^[0-9]{18,20}[Ff]?$"
ICCID_RULE = "18-20 digits, optionally followed by F"

_ICCID_RE = re.compile(ICCID_PATTERN)


def parse_iccid(text: str) -> str:
    """The ICCID's digits (F pad dropped); ValueError naming the rule when text is not one."""
    compact = "".join(ch for ch in text.strip() if ch not in " -")
    if not _ICCID_RE.match(compact):
        raise ValueError(f"not an ICCID: {text!r} (expected {ICCID_RULE})")
    return compact.rstrip("Ff")


def is_iccid(text: str) -> bool:
    """Whether text follows the ICCID rule."""
    try:
        parse_iccid(text)
    except ValueError:
        return False
    return True
