"""The contract between the emulated modem (AT side) and the emulated eUICC (card side)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

ISD_R_AID = bytes.fromhex("A0000005591010FFFFFFFF8900000100")


@dataclass
class ProfileSpec:
    """A profile installed on the emulated eUICC, as a scenario file describes it."""

    iccid: str  # digits, human order ("8944..."), 19 or 20 digits
    name: str = "Profile"
    provider: str = "Operator"
    nickname: str | None = None
    profile_class: str = "operational"  # test | provisioning | operational
    enabled: bool = False
    isdp_aid: str | None = None  # hex; derived from the slot when None
    operator_name: str = "Emulated"
    mcc_mnc: str = "00101"
    broken: bool = False  # never registers once enabled: exercises rollback
    notification_address: str | None = None  # SM-DP+ for its notifications (default the card's)


@dataclass
class CardEvents:
    """Callbacks the card makes into the modem: an enable/disable changes what the radio can do."""

    on_profile_change: Callable[[ProfileSpec | None], None] = field(default=lambda _p: None)


class EmulatedCard(Protocol):
    """What the emulated modem needs from the eUICC; hw_fixtures.euicc implements it."""

    eid: str

    def enabled_profile(self) -> ProfileSpec | None:
        """The profile that is enabled now, if any."""

    def open_channel(self, aid: bytes) -> int:
        """Open a logical channel and select aid on it; raises KeyError for an unknown AID,
        RuntimeError when no channel is free."""

    def close_channel(self, channel: int) -> None:
        """Close a logical channel; raises KeyError when it is not open."""

    def transmit(self, channel: int, apdu: bytes) -> bytes:
        """Process one command APDU on a logical channel; returns response data + SW1 SW2.
        The CLA's channel bits are ignored: the caller routes by channel."""

    def transmit_basic(self, apdu: bytes) -> bytes:
        """AT+CSIM path: MANAGE CHANNEL, SELECT and others, routed by the CLA's channel bits."""
