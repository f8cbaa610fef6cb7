"""structlog set-up: JSON lines under systemd (journald), readable key=value on a terminal.

When stderr is journald's stream (JOURNAL_STREAM names stderr's device and inode, see
systemd.exec(5)) every line starts with its syslog priority, `<4>` for a warning, so journald
files it at that priority instead of as info (SyslogLevelPrefix=, on by default).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, TextIO

import structlog

#: syslog(3) priorities for our level names.
SYSLOG_PRIORITY = {
    "debug": 7,
    "info": 6,
    "warning": 4,
    "warn": 4,
    "error": 3,
    "exception": 3,
    "critical": 2,
}


def stderr_is_journal(stream: TextIO | None = None, environ: dict[str, str] | None = None) -> bool:
    """Whether stream (stderr) is connected to journald, by JOURNAL_STREAM's `dev:inode`."""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not sep or not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat((stream or sys.stderr).fileno())
    except (OSError, ValueError):
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


class _PriorityPrefix:
    """Wraps a renderer: `<N>` + the rendered line, N from the event's level."""

    def __init__(self, renderer: structlog.types.Processor) -> None:
        self._renderer = renderer

    def __call__(self, logger: Any, method_name: str, event_dict: Any) -> str:
        level = str(event_dict.get("level", method_name)).lower()
        line = self._renderer(logger, method_name, event_dict)
        text = line.decode() if isinstance(line, bytes) else str(line)
        return f"<{SYSLOG_PRIORITY.get(level, 6)}>{text}"


def configure(level: str = "info", *, json: bool | None = None) -> None:
    """Configure structlog once for the process; json defaults to on when stderr is not a tty."""
    journal = stderr_is_journal()
    if json is None:
        json = journal or bool(os.environ.get("JOURNAL_STREAM")) or not sys.stderr.isatty()
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    if journal:
        renderer = _PriorityPrefix(renderer)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
        ),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
