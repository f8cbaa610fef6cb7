"""Hand-written BER-TLV (ISO 8825-1 subset used by SGP.22): tags as ints, definite lengths only."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from agent.errors import ParseError

_MAX_LENGTH_OCTETS = 4


class TlvError(ParseError):
    """Bytes that are not well-formed BER-TLV; the only error the decoders raise."""


@dataclass(frozen=True, slots=True)
class Tlv:
    """One decoded data object; tag is the big-endian int of its tag bytes (0xBF2D, 0x5A)."""

    tag: int
    value: bytes

    @property
    def constructed(self) -> bool:
        """True when the value holds nested TLVs (bit 6 of the first tag byte)."""
        return is_constructed(self.tag)

    def children(self) -> list[Tlv]:
        """Decode the value as a sequence of TLVs."""
        return decode_all(self.value)

    def find(self, tag: int) -> Tlv | None:
        """The first direct child with tag, or None."""
        return find(self.children(), tag)


def _tag_bytes(tag: int) -> bytes:
    if tag < 0:
        raise ValueError(f"negative tag {tag}")
    return tag.to_bytes(max(1, (tag.bit_length() + 7) // 8), "big")


def is_constructed(tag: int) -> bool:
    """True when the tag's first byte has the constructed bit set."""
    return bool(_tag_bytes(tag)[0] & 0x20)


def encode_length(length: int) -> bytes:
    """Definite length in the shortest form."""
    if length < 0x80:
        return bytes([length])
    body = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def encode(tag: int, value: bytes = b"") -> bytes:
    """Encode one data object."""
    return _tag_bytes(tag) + encode_length(len(value)) + value


def encode_many(items: Iterable[tuple[int, bytes] | bytes]) -> bytes:
    """Concatenate already-encoded TLVs and (tag, value) pairs."""
    out = bytearray()
    for item in items:
        out += item if isinstance(item, bytes) else encode(*item)
    return bytes(out)


def decode_one(data: bytes, offset: int = 0) -> tuple[Tlv, int]:
    """Decode the TLV at offset; returns it and the offset just past it."""
    end = len(data)
    if offset >= end:
        raise TlvError("tag expected, end of data", data)
    pos = offset
    first = data[pos]
    pos += 1
    tag = first
    if first & 0x1F == 0x1F:
        while True:
            if pos >= end:
                raise TlvError("truncated multi-byte tag", data)
            b = data[pos]
            pos += 1
            tag = (tag << 8) | b
            if not b & 0x80:
                break
            if pos - offset > 4:
                raise TlvError("tag longer than 4 bytes", data)
    if pos >= end:
        raise TlvError("length expected, end of data", data)
    lb = data[pos]
    pos += 1
    if lb < 0x80:
        length = lb
    elif lb == 0x80:
        raise TlvError("indefinite length is not used by SGP.22", data)
    else:
        n = lb & 0x7F
        if n > _MAX_LENGTH_OCTETS or pos + n > end:
            raise TlvError("bad long-form length", data)
        length = int.from_bytes(data[pos : pos + n], "big")
        pos += n
    if pos + length > end:
        raise TlvError(f"value of tag {tag:X} runs past the data ({length} bytes)", data)
    return Tlv(tag, bytes(data[pos : pos + length])), pos + length


def iter_tlvs(data: bytes) -> Iterator[Tlv]:
    """Yield consecutive TLVs; 00/FF padding between objects is skipped as ISO 7816-4 allows."""
    pos = 0
    while pos < len(data):
        if data[pos] in (0x00, 0xFF):
            pos += 1
            continue
        item, pos = decode_one(data, pos)
        yield item


def decode_all(data: bytes) -> list[Tlv]:
    """Decode a whole buffer of consecutive TLVs."""
    return list(iter_tlvs(data))


def find(items: Iterable[Tlv], tag: int) -> Tlv | None:
    """The first item with tag, or None."""
    return next((i for i in items if i.tag == tag), None)


def find_all(items: Iterable[Tlv], tag: int) -> list[Tlv]:
    """Every item with tag, in order."""
    return [i for i in items if i.tag == tag]


MAX_INT_BYTES = 8  # every INTEGER in SGP.22 (result codes, sequence numbers) fits in 64 bits


def decode_int(value: bytes) -> int:
    """A BER INTEGER value (two's complement) of at most MAX_INT_BYTES bytes."""
    if not value:
        raise TlvError("empty INTEGER", value)
    if len(value) > MAX_INT_BYTES:
        raise TlvError(f"INTEGER of {len(value)} bytes (at most {MAX_INT_BYTES})", value[:16])
    return int.from_bytes(value, "big", signed=True)


def encode_int(number: int) -> bytes:
    """Minimal two's-complement INTEGER content."""
    length = max(1, (number + (number < 0)).bit_length() // 8 + 1)
    return number.to_bytes(length, "big", signed=True)
