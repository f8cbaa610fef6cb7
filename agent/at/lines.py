"""Sans-IO framing: bytes from the modem in, complete text lines out. Knows nothing of meaning."""

from __future__ import annotations

MAX_LINE = 16384  # longer than any AT reply we use (a CGLA answer is ~520 characters)
_CONTROL = {c: None for c in range(0x20) if c not in (0x09,)}
_CONTROL[0x7F] = None


class LineReader:
    """Splits a byte stream on CR/LF; drops empty lines and control characters, never raises."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self.overflows = 0

    def feed(self, data: bytes) -> list[str]:
        """Add bytes; return the lines they complete, in order."""
        self._buf += data
        out: list[str] = []
        start = 0
        buf = self._buf
        for i, b in enumerate(buf):
            if b in (0x0D, 0x0A):
                if i > start:
                    line = clean(bytes(buf[start:i]))
                    if line:
                        out.append(line)
                start = i + 1
        del buf[:start]
        if len(buf) > MAX_LINE:
            # A modem spewing bytes without a terminator must not grow memory without bound.
            self.overflows += 1
            buf.clear()
        return out

    def pending(self) -> str:
        """The partial line held back, cleaned (for a prompt such as '> ')."""
        return clean(bytes(self._buf))

    def reset(self) -> None:
        """Forget any partial line (after a resync)."""
        self._buf.clear()


def clean(raw: bytes) -> str:
    """Decode one line as Latin-1 (total: every byte maps), strip controls and surrounding blanks."""
    return raw.decode("latin-1").translate(_CONTROL).strip()
