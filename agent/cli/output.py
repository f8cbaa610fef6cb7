"""Rendering for the CLI: stable JSON for tools, aligned tables for people, one-line errors."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import msgspec


def print_json(value: Any) -> None:
    """Print value as indented JSON (msgspec Structs included)."""
    sys.stdout.write(msgspec.json.format(msgspec.json.encode(value), indent=2).decode() + "\n")


def fmt(value: object) -> str:
    """A table cell: '-' for None."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print rows under headers with aligned columns."""
    cells = [[fmt(c) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    line = "  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True))
    sys.stdout.write(line.rstrip() + "\n")
    for row in cells:
        sys.stdout.write(
            "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() + "\n"
        )


def print_sections(sections: Sequence[tuple[str, Sequence[tuple[str, object]]]]) -> None:
    """Print titled key/value blocks."""
    width = max((len(k) for _, items in sections for k, _ in items), default=0)
    for n, (title, items) in enumerate(sections):
        if n:
            sys.stdout.write("\n")
        sys.stdout.write(f"{title}\n")
        for key, value in items:
            sys.stdout.write(f"  {key.ljust(width)}  {fmt(value)}\n")


#: Set by the CLI's entry point when the command line asks for --json: errors become JSON too.
_json_errors = False


def set_json_errors(on: bool) -> None:
    """Report errors as one JSON object on stdout (for --json) instead of a line on stderr."""
    global _json_errors  # noqa: PLW0603 - one process, one command line
    _json_errors = on


def json_errors() -> bool:
    """Whether errors are reported as JSON."""
    return _json_errors


def error(message: str, code: str = "runtime") -> None:
    """Report an error: one line on stderr, or with --json `{"error": {"code", "message"}}` on stdout.

    Codes are stable: usage, runtime, config, port, port_busy, not_a_modem, timeout, daemon,
    no_daemon, broker, internal.
    """
    if _json_errors:
        print_json({"error": {"code": code, "message": message}})
    else:
        sys.stderr.write(f"esim-agent: {message}\n")
