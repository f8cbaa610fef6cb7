"""Command APDUs for ES10 (ISO 7816-4 + SGP.22 §5.7): CLA channel bits, STORE DATA chunking, GET RESPONSE."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import structlog

from agent.errors import ApduError

log = structlog.get_logger(__name__)

SW_OK = 0x9000
STORE_DATA_BLOCK = 120  # the size most LPAs use; any card takes it
MAX_CHAINED = 64  # guards against a card that answers 61xx forever

Transmit = Callable[[bytes], Awaitable[bytes]]


def cla_for_channel(base: int, channel: int) -> int:
    """Set the logical-channel bits of a CLA (0..3 first-interindustry, 4..19 further)."""
    if not 0 <= channel <= 19:
        raise ValueError(f"logical channel out of range: {channel}")
    if channel <= 3:
        return (base & 0xFC) | channel
    return (base & 0xB0) | 0x40 | (channel - 4)


def split_sw(response: bytes) -> tuple[bytes, int]:
    """Split a response APDU into data and SW1SW2."""
    if len(response) < 2:
        raise ApduError(f"response too short: {response.hex().upper()!r}")
    return response[:-2], int.from_bytes(response[-2:], "big")


def is_success(sw: int) -> bool:
    """SW1 9x counts as success (91xx: proactive command pending, 92xx: retries)."""
    return sw >> 12 == 0x9


def build(
    cla: int, ins: int, p1: int, p2: int, data: bytes = b"", *, le: int | None = None
) -> bytes:
    """A short command APDU (cases 1-4); le=0 means 256."""
    if len(data) > 255:
        raise ValueError("short APDU data is limited to 255 bytes")
    out = bytes([cla, ins, p1, p2])
    if data:
        out += bytes([len(data)]) + data
    if le is not None:
        out += bytes([le & 0xFF])
    return out


def store_data_blocks(
    payload: bytes, channel: int, block_size: int = STORE_DATA_BLOCK
) -> list[bytes]:
    """Split an ES10 request into STORE DATA APDUs: P1 11 then 91 on the last, P2 the block number."""
    if not 1 <= block_size <= 255:
        raise ValueError("block_size must be 1..255")
    chunks = [payload[i : i + block_size] for i in range(0, len(payload), block_size)] or [b""]
    if len(chunks) > 256:
        raise ValueError("ES10 request too long for 256 STORE DATA blocks")
    cla = cla_for_channel(0x80, channel)
    return [
        build(cla, 0xE2, 0x91 if n == len(chunks) - 1 else 0x11, n, chunk)
        for n, chunk in enumerate(chunks)
    ]


def get_response(channel: int, le: int, base_cla: int = 0x80) -> bytes:
    """GET RESPONSE for the bytes announced by 61xx (xx=00 means 256), in the command's class:
    80 after STORE DATA (as SGP.22 cards expect), 00 after an interindustry SELECT."""
    return build(cla_for_channel(base_cla, channel), 0xC0, 0x00, 0x00, le=le)


def with_le(apdu: bytes, le: int) -> bytes:
    """Repeat an APDU with Le replaced after 6Cxx (cases 2 and 4)."""
    header = apdu[:4]
    if len(apdu) <= 5:
        return header + bytes([le])
    lc = apdu[4]
    return header + apdu[4 : 5 + lc] + bytes([le])


async def exchange(transmit: Transmit, apdu: bytes, channel: int) -> tuple[bytes, int]:
    """Send one APDU, follow 6Cxx and 61xx, return all data and the final status word."""
    raw = await transmit(apdu)
    data, sw = split_sw(raw)
    if sw >> 8 == 0x6C:
        raw = await transmit(with_le(apdu, sw & 0xFF))
        data, sw = split_sw(raw)
    base_cla = 0x80 if apdu[0] & 0x80 else 0x00
    collected = bytearray(data)
    for _ in range(MAX_CHAINED):
        if sw >> 8 != 0x61:
            break
        raw = await transmit(get_response(channel, sw & 0xFF, base_cla))
        data, sw = split_sw(raw)
        if sw >> 8 == 0x6C:
            raw = await transmit(get_response(channel, sw & 0xFF, base_cla))
            data, sw = split_sw(raw)
        collected += data
    else:
        raise ApduError("card kept answering 61xx", sw)
    return bytes(collected), sw


async def store_data(
    transmit: Transmit, payload: bytes, channel: int, block_size: int = STORE_DATA_BLOCK
) -> bytes:
    """Send an ES10 request as STORE DATA blocks and return the reassembled response data."""
    blocks = store_data_blocks(payload, channel, block_size)
    response = b""
    for n, block in enumerate(blocks):
        data, sw = await exchange(transmit, block, channel)
        if not is_success(sw):
            log.info("euicc_store_data_refused", block=n, sw=f"{sw:04X}")
            raise ApduError(f"STORE DATA block {n} refused: SW {sw:04X}", sw)
        response = data
    return response
