"""Bounds on outside input shared by every intake (control socket, MQTT commands)."""

from __future__ import annotations

# Our requests nest three levels; msgspec recurses once per level, so a deep document would
# exhaust the interpreter's stack before any validation runs.
MAX_JSON_DEPTH = 32


def json_depth(data: bytes) -> int:
    """Deepest nesting of objects/arrays in a JSON text (strings skipped); no recursion."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in data:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            deepest = max(deepest, depth)
        elif byte in (0x5D, 0x7D):  # ] }
            depth -= 1
    return deepest


def too_deep(data: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """True when data nests deeper than limit."""
    return json_depth(data) > limit
