"""Modem URCs as detection evidence: +CGEV context events and registration changes (27.007).

Pure: a line in, an Evidence (or None) out. Each URC is one piece of evidence, confirmed like a
failed probe (agent/health/detect.py), so a stray URC never makes an outage by itself.
"""

from __future__ import annotations

import re

from agent.at import parsers
from agent.errors import ParseError
from agent.health.detect import Evidence

#: URC prefixes to subscribe to on the AT channel.
URC_PREFIXES = ("+CGEV", "+CREG", "+CGREG", "+CEREG", "+C5GREG")

# 27.007 10.1.19: context and bearer deactivation, and detach, by the network or the modem.
_CGEV_LOST = re.compile(r"^\+CGEV:\s*(NW|ME)\s+(PDN\s+DEACT|DEACT|DETACH)\b", re.IGNORECASE)
_CGEV_UP = re.compile(r"^\+CGEV:\s*(NW|ME)\s+(PDN\s+ACT|ACT)\b", re.IGNORECASE)
# <stat> values with a registration that carries data: home, roaming, and the "CSFB not
# preferred" forms (9, 10). 4 (unknown) says nothing; everything else cannot carry data.
_REGISTERED_STATS = frozenset({1, 5, 9, 10})
_UNKNOWN_STAT = 4


def evidence_from_urc(line: str, at: float) -> Evidence | None:
    """The evidence an unsolicited line gives about the data path, or None."""
    text = line.strip()
    upper = text.upper()
    if upper.startswith("+CGEV"):
        m = _CGEV_LOST.match(text)
        if m is not None:
            what = "detach" if m.group(2).upper() == "DETACH" else "pdn_deactivated"
            return Evidence(kind="pdn_deactivated", at=at, reason=f"{what}_{m.group(1).lower()}")
        if _CGEV_UP.match(text):
            return Evidence(kind="pdn_activated", at=at)
        return None
    if not upper.startswith(("+CREG", "+CGREG", "+CEREG", "+C5GREG")):
        return None
    try:
        reply = parsers.parse_registration(text, solicited=False)
    except ParseError:
        return None
    if reply.stat in _REGISTERED_STATS:
        return Evidence(kind="registration_ok", at=at)
    if reply.stat == _UNKNOWN_STAT:
        return None
    return Evidence(kind="registration_lost", at=at, reason=f"registration_lost: {reply.state}")
