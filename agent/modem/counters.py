"""Modem data-volume counters: pure parsers per vendor and one async read over an AT channel.

Only commands documented by the vendor are sent. Quectel `AT+QGDCNT?` answers
`+QGDCNT: <bytes_sent>,<bytes_recv>` (sent first). Modems without a known counter command give
None, so usage accounting degrades to "unknown" instead of failing the poll.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import msgspec
import structlog

from agent.errors import AtError, AtTimeout, ParseError, PortGoneError

log = structlog.get_logger(__name__)

COUNTER_TIMEOUT_S = 5.0
_INT = re.compile(r'^\s*"?\s*(\d{1,20})\s*"?\s*$')


class Counters(msgspec.Struct, frozen=True, kw_only=True):
    """Bytes received (downlink) and sent (uplink) since the modem's counter last restarted."""

    rx_bytes: int
    tx_bytes: int


class Reply(Protocol):
    """What read_counters needs from a reply (agent.at.channel.AtResponse fits)."""

    def values(self, prefix: str) -> list[str]:
        """Payloads of the lines carrying prefix."""
        ...


class CommandChannel(Protocol):
    """What read_counters needs from a channel (agent.at.channel.AtChannel fits)."""

    async def command(self, command: str, *, timeout: float | None = None) -> Reply:
        """Send one command and return its reply."""
        ...


def _int_field(text: str, what: str, payload: str) -> int:
    m = _INT.match(text)
    if m is None:
        raise ParseError(f"{what} is not a byte count", payload)
    return int(m.group(1))


def parse_qgdcnt(payload: str) -> Counters:
    """`+QGDCNT: <sent>,<recv>` payload (after the colon) to Counters; ParseError otherwise."""
    fields = payload.strip().split(",")
    # Some firmware appends fields after the two counts; the first two are the contract.
    if len(fields) < 2:
        raise ParseError("+QGDCNT wants <bytes_sent>,<bytes_recv>", payload)
    sent = _int_field(fields[0], "bytes_sent", payload)
    recv = _int_field(fields[1], "bytes_recv", payload)
    return Counters(rx_bytes=recv, tx_bytes=sent)


@dataclass(frozen=True)
class CounterCommand:
    """How one vendor reports its data counter: query, reply prefix, parser, reset command."""

    query: str
    prefix: str
    parse: Callable[[str], Counters]
    reset: str | None = None


COUNTER_COMMANDS: dict[str, CounterCommand] = {
    "quectel": CounterCommand("AT+QGDCNT?", "+QGDCNT", parse_qgdcnt, reset="AT+QGDCNT=0"),
}


def counter_command(vendor: str) -> CounterCommand | None:
    """The counter command of a vendor name (case-insensitive), or None if it has none we know."""
    return COUNTER_COMMANDS.get(vendor.strip().lower())


async def read_counters(
    channel: CommandChannel, vendor: str, *, timeout: float = COUNTER_TIMEOUT_S
) -> Counters | None:
    """The modem's byte counters, or None when the vendor has no counter command or it fails.

    Raises only PortGoneError and AtTimeout: those mean the port, not the counter, is in trouble.
    """
    spec = counter_command(vendor)
    if spec is None:
        return None
    try:
        resp = await channel.command(spec.query, timeout=timeout)
    except (PortGoneError, AtTimeout):
        raise
    except AtError as exc:
        # Firmware without the command answers ERROR; that is "no counter", not a failure.
        log.debug("modem_counters_unsupported", vendor=vendor, error=str(exc))
        return None
    payloads = resp.values(spec.prefix)
    if not payloads:
        log.warning("modem_counters_missing", vendor=vendor, command=spec.query)
        return None
    try:
        return spec.parse(payloads[0])
    except ParseError as exc:
        log.warning("modem_counters_unparsable", vendor=vendor, text=payloads[0], error=str(exc))
        return None


async def reset_counters(
    channel: CommandChannel, vendor: str, *, timeout: float = COUNTER_TIMEOUT_S
) -> bool:
    """Zero the modem's counters; False when the vendor cannot. Raises like read_counters."""
    spec = counter_command(vendor)
    if spec is None or spec.reset is None:
        return False
    try:
        await channel.command(spec.reset, timeout=timeout)
    except (PortGoneError, AtTimeout):
        raise
    except AtError as exc:
        log.warning("modem_counters_reset_failed", vendor=vendor, error=str(exc))
        return False
    return True
