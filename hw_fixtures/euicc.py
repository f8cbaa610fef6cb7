"""Emulated eUICC: an ISD-R speaking ES10 over STORE DATA, with SGP.22's profile rules.

Its TLV code is deliberately independent of agent/euicc so a mistake in one is not mirrored
in the other.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from hw_fixtures.card_api import ISD_R_AID, CardEvents, ProfileSpec

if TYPE_CHECKING:
    from hw_fixtures.euicc_download import DownloadEngine

SW_OK = b"\x90\x00"
MAX_CHANNELS = 4  # basic channel 0 plus three logical channels, as most eUICCs report
CLASSES = {"test": 0, "provisioning": 1, "operational": 2}
OPS = {"install": 0, "enable": 1, "disable": 2, "delete": 3}
CI_KEY_ID = "81370F5125D0B1D408D4C3B232E6D25E795BEBFB"  # GSMA test CI key id
SMDP_ADDRESS = "smdp.example.test"


def _sw(sw: int) -> bytes:
    return sw.to_bytes(2, "big")


def _tlv(tag: int, value: bytes = b"") -> bytes:
    tag_b = tag.to_bytes(max(1, (tag.bit_length() + 7) // 8), "big")
    n = len(value)
    if n < 0x80:
        length = bytes([n])
    elif n < 0x100:
        length = bytes([0x81, n])
    else:
        length = bytes([0x82]) + n.to_bytes(2, "big")
    return tag_b + length + value


class _Malformed(Exception):
    pass


def _parse(data: bytes) -> list[tuple[int, bytes]]:
    out: list[tuple[int, bytes]] = []
    i = 0
    try:
        while i < len(data):
            tag = data[i]
            i += 1
            if tag & 0x1F == 0x1F:
                while True:
                    b = data[i]
                    i += 1
                    tag = tag << 8 | b
                    if not b & 0x80:
                        break
            n = data[i]
            i += 1
            if n & 0x80:
                k = n & 0x7F
                n = int.from_bytes(data[i : i + k], "big")
                i += k
            if i + n > len(data):
                raise _Malformed
            out.append((tag, data[i : i + n]))
            i += n
    except IndexError as exc:
        raise _Malformed from exc
    return out


def _get(items: list[tuple[int, bytes]], tag: int) -> bytes | None:
    return next((v for t, v in items if t == tag), None)


def iccid_to_bcd(iccid: str) -> bytes:
    """Human digits to SGP.22 swapped-nibble BCD."""
    d = iccid.ljust(20, "F")
    return bytes.fromhex("".join(d[i + 1] + d[i] for i in range(0, 20, 2)))


def bcd_to_iccid(raw: bytes) -> str:
    """Swapped-nibble BCD to human digits."""
    h = raw.hex().upper()
    return "".join(h[i + 1] + h[i] for i in range(0, len(h), 2)).rstrip("F")


def _int(n: int) -> bytes:
    return n.to_bytes(max(1, (n.bit_length() + 8) // 8), "big", signed=True)


@dataclass
class Notification:
    """A queued notification on the card."""

    seq: int
    operation: str
    iccid: str
    address: str = SMDP_ADDRESS
    raw: bytes | None = None  # the whole signed notification when the card made it (install)


@dataclass
class _Channel:
    selected: bytes | None = None
    request: bytearray = field(default_factory=bytearray)
    next_block: int = 0
    pending: bytes = b""  # response bytes still to fetch with GET RESPONSE


class EmulatedEuicc:
    """An in-memory eUICC implementing hw_fixtures.card_api.EmulatedCard."""

    def __init__(
        self, eid: str, profiles: list[ProfileSpec], events: CardEvents | None = None
    ) -> None:
        if len(eid) != 32:
            raise ValueError("EID must be 32 hex digits")
        self.eid = eid.upper()
        self.profiles = list(profiles)
        for slot, p in enumerate(self.profiles):
            if p.isdp_aid is None:
                p.isdp_aid = f"A0000005591010FFFFFFFF89{0x1000 + 0x100 * slot:08X}"
        if sum(p.enabled for p in self.profiles) > 1:
            raise ValueError("at most one profile may be enabled")
        self.events = events or CardEvents()
        self.notifications: list[Notification] = []
        self.next_seq = 1
        self.channels: dict[int, _Channel] = {0: _Channel()}
        # Test knobs: what a real card does under policy or a busy modem.
        self.policy_locked: set[str] = set()  # ICCIDs with PPR1/PPR2: no disable/delete
        self.cat_busy: int = 0  # answer catBusy to this many enable/disable calls
        self.refuse_info2: bool = False  # answer EUICCInfo2 with 6D00, as some cards do
        self.max_response: int = 256  # longer responses are fetched with 61xx/GET RESPONSE
        self.log: list[str] = []  # top-level tags of ES10 requests seen, hex
        self.download: DownloadEngine | None = None  # profile download (ES10b), when given keys

    # -------------------------------------------------------------- EmulatedCard

    def enabled_profile(self) -> ProfileSpec | None:
        """The profile that is enabled now, if any."""
        return next((p for p in self.profiles if p.enabled), None)

    def open_channel(self, aid: bytes) -> int:
        """Open the lowest free logical channel and select aid on it."""
        if aid != ISD_R_AID:
            raise KeyError(aid.hex().upper())
        for ch in range(1, MAX_CHANNELS):
            if ch not in self.channels:
                self.channels[ch] = _Channel(selected=aid)
                return ch
        raise RuntimeError("no free logical channel")

    def close_channel(self, channel: int) -> None:
        """Close a logical channel."""
        if channel == 0 or channel not in self.channels:
            raise KeyError(channel)
        del self.channels[channel]

    def transmit(self, channel: int, apdu: bytes) -> bytes:
        """One APDU on a channel the caller routes; the CLA's channel bits are ignored."""
        state = self.channels.get(channel)
        if state is None:
            return _sw(0x6881)  # logical channel not supported / not open
        if len(apdu) < 4:
            return _sw(0x6700)
        ins = apdu[1]
        if ins == 0xA4:
            return self._select(state, apdu)
        if ins == 0xC0:
            return self._get_response(state, apdu)
        if ins == 0x70:
            return self._manage_channel(apdu)
        if state.selected != ISD_R_AID:
            return _sw(0x6985)
        if ins == 0xE2:
            return self._store_data(state, apdu)
        return _sw(0x6D00)

    def transmit_basic(self, apdu: bytes) -> bytes:
        """AT+CSIM path: route by the CLA's channel bits."""
        if len(apdu) < 4:
            return _sw(0x6700)
        cla = apdu[0]
        channel = (cla & 0x0F) + 4 if cla & 0x40 else cla & 0x03
        return self.transmit(channel, apdu)

    # -------------------------------------------------------------- APDU layer

    def _manage_channel(self, apdu: bytes) -> bytes:
        p1, p2 = apdu[2], apdu[3]
        if p1 == 0x00:
            for ch in range(1, MAX_CHANNELS):
                if ch not in self.channels:
                    self.channels[ch] = _Channel()
                    return bytes([ch]) + SW_OK
            return _sw(0x6A81)
        if p1 == 0x80:
            if p2 == 0 or p2 not in self.channels:
                return _sw(0x6881)
            del self.channels[p2]
            return SW_OK
        return _sw(0x6A86)

    def _select(self, state: _Channel, apdu: bytes) -> bytes:
        if apdu[2] != 0x04 or len(apdu) < 5:
            return _sw(0x6A86)
        aid = apdu[5 : 5 + apdu[4]]
        if aid != ISD_R_AID:
            return _sw(0x6A82)
        state.selected = aid
        fci = _tlv(0x6F, _tlv(0x84, aid))
        return self._respond(state, fci)

    def _respond(self, state: _Channel, data: bytes) -> bytes:
        if len(data) <= self.max_response:
            state.pending = b""
            return data + SW_OK
        head, state.pending = data[: self.max_response], data[self.max_response :]
        return head + bytes([0x61, min(len(state.pending), 256) & 0xFF])

    def _get_response(self, state: _Channel, apdu: bytes) -> bytes:
        if not state.pending:
            return _sw(0x6985)
        le = apdu[4] if len(apdu) > 4 else 0
        le = le or 256
        if le > len(state.pending):
            return _sw(0x6C00 | len(state.pending))
        chunk, state.pending = state.pending[:le], state.pending[le:]
        if state.pending:
            return chunk + bytes([0x61, min(len(state.pending), 256) & 0xFF])
        return chunk + SW_OK

    def _store_data(self, state: _Channel, apdu: bytes) -> bytes:
        p1, p2 = apdu[2], apdu[3]
        lc = apdu[4] if len(apdu) > 4 else 0
        body = apdu[5 : 5 + lc]
        if len(body) != lc:
            return _sw(0x6700)
        if p2 == 0:
            state.request.clear()
            state.next_block = 0
        if p2 != state.next_block:
            state.request.clear()
            state.next_block = 0
            return _sw(0x6A86)
        state.request += body
        state.next_block += 1
        if not p1 & 0x80:
            return SW_OK
        request = bytes(state.request)
        state.request.clear()
        state.next_block = 0
        try:
            if self.download is not None and self.download.handles(request):
                self.log.append(request[:2].hex().upper())
                response: bytes | None = self.download.process(request)
            else:
                response = self._es10(request)
        except (_Malformed, ValueError):
            return _sw(0x6A80)
        if response is None:
            return _sw(0x6D00)
        return self._respond(state, response)

    # -------------------------------------------------------------- ES10 layer

    def _es10(self, request: bytes) -> bytes | None:
        items = _parse(request)
        if not items:
            raise _Malformed
        tag, body = items[0]
        self.log.append(f"{tag:X}")
        fields = _parse(body)
        handlers = {
            0xBF3E: self._get_euicc_data,
            0xBF20: self._info1,
            0xBF22: self._info2,
            0xBF2D: self._profiles_info,
            0xBF31: self._enable,
            0xBF32: self._disable,
            0xBF33: self._delete,
            0xBF29: self._set_nickname,
            0xBF28: self._list_notifications,
            0xBF2B: self._retrieve_notifications,
            0xBF30: self._notification_sent,
        }
        handler = handlers.get(tag)
        return None if handler is None else handler(fields)

    def _find(self, ident: list[tuple[int, bytes]]) -> ProfileSpec | None:
        iccid = _get(ident, 0x5A)
        aid = _get(ident, 0x4F)
        for p in self.profiles:
            if iccid is not None and iccid_to_bcd(p.iccid) == iccid:
                return p
            if aid is not None and p.isdp_aid is not None and bytes.fromhex(p.isdp_aid) == aid:
                return p
        return None

    def _notify(self, operation: str, profile: ProfileSpec) -> None:
        address = profile.notification_address or SMDP_ADDRESS
        self.notifications.append(Notification(self.next_seq, operation, profile.iccid, address))
        self.next_seq += 1

    def queue_install_notification(
        self, seq: int, pir: bytes, profile: ProfileSpec | None, address: str
    ) -> None:
        """Called by the download engine: the installed profile (if any) and its result."""
        if profile is not None:
            self.profiles.append(profile)
        iccid = profile.iccid if profile is not None else ""
        self.notifications.append(Notification(seq, "install", iccid, address, raw=pir))

    def info2_response(self) -> bytes:
        """EUICCInfo2 as euiccSigned1 carries it, even when the knob refuses the function."""
        refuse, self.refuse_info2 = self.refuse_info2, False
        try:
            info2 = self._info2([])
        finally:
            self.refuse_info2 = refuse
        assert info2 is not None
        return info2

    def _ci_keys(self) -> bytes:
        ids = self.download.ci_key_ids if self.download else [bytes.fromhex(CI_KEY_ID)]
        return b"".join(_tlv(0x04, k) for k in ids)

    def _get_euicc_data(self, fields: list[tuple[int, bytes]]) -> bytes:
        return _tlv(0xBF3E, _tlv(0x5A, bytes.fromhex(self.eid)))

    def _info1(self, fields: list[tuple[int, bytes]]) -> bytes:
        keys = self._ci_keys()
        return _tlv(0xBF20, _tlv(0x82, b"\x02\x02\x00") + _tlv(0xA9, keys) + _tlv(0xAA, keys))

    def _info2(self, fields: list[tuple[int, bytes]]) -> bytes | None:
        if self.refuse_info2:
            return None
        keys = self._ci_keys()
        ext = _tlv(0x81, bytes([len(self.profiles)])) + _tlv(0x82, (412_000).to_bytes(3, "big"))
        ext += _tlv(0x83, (15_000).to_bytes(2, "big"))
        body = (
            _tlv(0x81, b"\x02\x03\x01")
            + _tlv(0x82, b"\x02\x02\x00")
            + _tlv(0x83, b"\x04\x06\x00")
            + _tlv(0x84, ext)
            + _tlv(0x85, b"\x02\x00\x00")
            + _tlv(0x86, b"\x09\x02\x00")
            + _tlv(0x87, b"\x02\x03\x00")
            + _tlv(0x88, b"\x06\x00")
            + _tlv(0xA9, keys)
            + _tlv(0xAA, keys)
            + _tlv(0x8B, b"\x02")
            + _tlv(0x04, b"\x01\x00\x00")
            + _tlv(0x0C, b"EMU-SAS-0001")
        )
        return _tlv(0xBF22, body)

    def _profile_tlv(self, p: ProfileSpec, wanted: set[int] | None) -> bytes:
        values: list[tuple[int, bytes]] = [
            (0x5A, iccid_to_bcd(p.iccid)),
            (0x4F, bytes.fromhex(p.isdp_aid or "")),
            (0x9F70, b"\x01" if p.enabled else b"\x00"),
        ]
        if p.nickname is not None:
            values.append((0x90, p.nickname.encode()))
        values += [
            (0x91, p.provider.encode()),
            (0x92, p.name.encode()),
            (0x93, b"\x00"),
            (0x95, bytes([CLASSES.get(p.profile_class, 2)])),
        ]
        return _tlv(0xE3, b"".join(_tlv(t, v) for t, v in values if wanted is None or t in wanted))

    def _profiles_info(self, fields: list[tuple[int, bytes]]) -> bytes:
        tag_list = _get(fields, 0x5C)
        wanted: set[int] | None = None
        if tag_list is not None:
            wanted = set()
            i = 0
            while i < len(tag_list):
                if tag_list[i] & 0x1F == 0x1F and i + 1 < len(tag_list):
                    wanted.add(tag_list[i] << 8 | tag_list[i + 1])
                    i += 2
                else:
                    wanted.add(tag_list[i])
                    i += 1
        chosen = self.profiles
        criteria = _get(fields, 0xA0)
        if criteria is not None:
            crit = _parse(criteria)
            klass = _get(crit, 0x95)
            if klass is not None:
                chosen = [p for p in chosen if CLASSES.get(p.profile_class) == klass[0]]
            else:
                found = self._find(crit)
                chosen = [found] if found else []
        listing = b"".join(self._profile_tlv(p, wanted) for p in chosen)
        return _tlv(0xBF2D, _tlv(0xA0, listing))

    def _result(self, tag: int, code: int) -> bytes:
        return _tlv(tag, _tlv(0x80, _int(code)))

    def _enable(self, fields: list[tuple[int, bytes]]) -> bytes:
        ident = _get(fields, 0xA0)
        if ident is None:
            raise _Malformed
        target = self._find(_parse(ident))
        if target is None:
            return self._result(0xBF31, 1)
        if target.enabled:
            return self._result(0xBF31, 2)
        current = self.enabled_profile()
        if current is not None and current.iccid in self.policy_locked:
            return self._result(0xBF31, 3)
        if self.cat_busy > 0:
            self.cat_busy -= 1
            return self._result(0xBF31, 5)
        if current is not None:
            current.enabled = False
            self._notify("disable", current)
        target.enabled = True
        self._notify("enable", target)
        self.events.on_profile_change(target)
        return self._result(0xBF31, 0)

    def _disable(self, fields: list[tuple[int, bytes]]) -> bytes:
        ident = _get(fields, 0xA0)
        if ident is None:
            raise _Malformed
        target = self._find(_parse(ident))
        if target is None:
            return self._result(0xBF32, 1)
        if not target.enabled:
            return self._result(0xBF32, 2)
        if target.iccid in self.policy_locked:
            return self._result(0xBF32, 3)
        if self.cat_busy > 0:
            self.cat_busy -= 1
            return self._result(0xBF32, 5)
        target.enabled = False
        self._notify("disable", target)
        self.events.on_profile_change(None)
        return self._result(0xBF32, 0)

    def _delete(self, fields: list[tuple[int, bytes]]) -> bytes:
        target = self._find(fields)
        if target is None:
            return self._result(0xBF33, 1)
        if target.enabled:
            return self._result(0xBF33, 2)
        if target.iccid in self.policy_locked:
            return self._result(0xBF33, 3)
        self.profiles.remove(target)
        self._notify("delete", target)
        return self._result(0xBF33, 0)

    def _set_nickname(self, fields: list[tuple[int, bytes]]) -> bytes:
        target = self._find([(t, v) for t, v in fields if t == 0x5A])
        if target is None:
            return self._result(0xBF29, 1)
        nick = _get(fields, 0x90)
        target.nickname = nick.decode("utf-8", "replace") if nick else None
        return self._result(0xBF29, 0)

    def _metadata(self, n: Notification) -> bytes:
        bit = OPS[n.operation]
        body = (
            _tlv(0x80, _int(n.seq))
            + _tlv(0x81, bytes([7 - bit, 0x80 >> bit]))
            + _tlv(0x0C, n.address.encode())
            + (_tlv(0x5A, iccid_to_bcd(n.iccid)) if n.iccid else b"")
        )
        return _tlv(0xBF2F, body)

    def _operation_filter(self, raw: bytes | None) -> list[Notification]:
        if raw is None or len(raw) < 2:
            return list(self.notifications)
        bits = raw[1]
        return [n for n in self.notifications if bits & (0x80 >> OPS[n.operation])]

    def _list_notifications(self, fields: list[tuple[int, bytes]]) -> bytes:
        chosen = self._operation_filter(_get(fields, 0x81))
        return _tlv(0xBF28, _tlv(0xA0, b"".join(self._metadata(n) for n in chosen)))

    def _retrieve_notifications(self, fields: list[tuple[int, bytes]]) -> bytes:
        chosen = list(self.notifications)
        crit = _get(fields, 0xA0)
        if crit is not None:
            parsed = _parse(crit)
            seq = _get(parsed, 0x80)
            if seq is not None:
                want = int.from_bytes(seq, "big", signed=True)
                chosen = [n for n in chosen if n.seq == want]
            else:
                chosen = self._operation_filter(_get(parsed, 0x81))
        if not chosen:
            return _tlv(0xBF2B, _tlv(0x81, b"\x01"))
        out = b""
        for n in chosen:
            if n.raw is not None:
                out += n.raw
                continue
            meta = self._metadata(n)
            if self.download is not None:
                # With a PKI the notification is signed as SGP.22 asks: an SM-DP+ can verify it.
                out += _tlv(0x30, meta + self.download.sign_notification(meta))
                continue
            signature = hashlib.sha256(self.eid.encode() + meta).digest() * 2
            out += _tlv(0x30, meta + _tlv(0x5F37, signature) + _tlv(0x30, b"") + _tlv(0x30, b""))
        return _tlv(0xBF2B, _tlv(0xA0, out))

    def _notification_sent(self, fields: list[tuple[int, bytes]]) -> bytes:
        seq = _get(fields, 0x80)
        if seq is None:
            raise _Malformed
        want = int.from_bytes(seq, "big", signed=True)
        before = len(self.notifications)
        self.notifications = [n for n in self.notifications if n.seq != want]
        return self._result(0xBF30, 0 if len(self.notifications) < before else 1)
