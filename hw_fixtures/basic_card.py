"""A minimal card for when hw_fixtures.euicc is unavailable: channels and SELECT, no ES10."""

from __future__ import annotations

from hw_fixtures.card_api import ISD_R_AID, CardEvents, ProfileSpec

SW_OK = b"\x90\x00"
SW_INS_NOT_SUPPORTED = b"\x6d\x00"
SW_FILE_NOT_FOUND = b"\x6a\x82"
SW_WRONG_P1P2 = b"\x6b\x00"
MAX_CHANNELS = 4


class BasicCard:
    """Implements hw_fixtures.card_api.EmulatedCard with logical channels only."""

    def __init__(self, eid: str, profiles: list[ProfileSpec], events: CardEvents) -> None:
        self.eid = eid
        self.profiles = profiles
        self.events = events
        self.aids = {ISD_R_AID}
        self.channels: set[int] = set()

    def enabled_profile(self) -> ProfileSpec | None:
        """The enabled profile, if any."""
        return next((p for p in self.profiles if p.enabled), None)

    def open_channel(self, aid: bytes) -> int:
        """Open the lowest free channel with aid selected."""
        if aid not in self.aids:
            raise KeyError(aid.hex())
        for channel in range(1, MAX_CHANNELS):
            if channel not in self.channels:
                self.channels.add(channel)
                return channel
        raise RuntimeError("no free logical channel")

    def close_channel(self, channel: int) -> None:
        """Close an open channel."""
        self.channels.remove(channel)

    def transmit(self, channel: int, apdu: bytes) -> bytes:
        """No applet behind the channel: every command is unsupported."""
        if channel not in self.channels:
            raise KeyError(channel)
        return SW_INS_NOT_SUPPORTED

    def transmit_basic(self, apdu: bytes) -> bytes:
        """MANAGE CHANNEL open/close and SELECT by AID; anything else is unsupported."""
        if len(apdu) < 4:
            return b"\x67\x00"
        ins, p1, p2 = apdu[1], apdu[2], apdu[3]
        if ins == 0x70:
            if p1 == 0x00:
                try:
                    channel = self.open_channel(ISD_R_AID)
                except RuntimeError:
                    return b"\x6a\x81"
                return bytes([channel]) + SW_OK
            if p1 == 0x80 and p2 in self.channels:
                self.channels.discard(p2)
                return SW_OK
            return SW_WRONG_P1P2
        if ins == 0xA4 and p1 == 0x04:
            aid = apdu[5 : 5 + apdu[4]] if len(apdu) > 5 else b""
            return SW_OK if aid in self.aids else SW_FILE_NOT_FOUND
        return SW_INS_NOT_SUPPORTED
