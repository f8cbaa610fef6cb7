"""argparse building blocks shared by the command groups: typed values checked at parse time,
so a bad value is a usage error (exit 2) before any port is opened."""

from __future__ import annotations

import argparse
import math
from typing import NoReturn

from agent.cli.output import error, json_errors
from agent.iccid import parse_iccid
from agent.modem.vendors import VENDORS

LOG_LEVELS = ("debug", "info", "warning", "error")
VENDOR_CHOICES = ("auto", "generic", *(v.name for v in VENDORS))
EXIT_USAGE = 2


class CliParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors follow --json (one JSON object on stdout)."""

    def error(self, message: str) -> NoReturn:
        if json_errors():
            error(f"{self.prog}: {message}", code="usage")
            raise SystemExit(EXIT_USAGE)
        super().error(message)


def iccid(text: str) -> str:
    """argparse type: an ICCID by the one rule (agent.iccid), returned as its digits."""
    try:
        return parse_iccid(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def positive_seconds(text: str) -> float:
    """argparse type: a duration in seconds, finite and > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def add_vendor(parser: argparse.ArgumentParser) -> None:
    """--vendor with its choices."""
    parser.add_argument(
        "--vendor",
        default="auto",
        choices=VENDOR_CHOICES,
        help="vendor personality (default: auto, detected from the manufacturer)",
    )


def add_log_level_everywhere(parser: argparse.ArgumentParser) -> None:
    """Accept --log-level after any sub-command too; the top-level default stays in force."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                if not any("--log-level" in a.option_strings for a in sub._actions):
                    sub.add_argument(
                        "--log-level",
                        choices=LOG_LEVELS,
                        default=argparse.SUPPRESS,
                        help="log level for this command (same as before the command)",
                    )
                add_log_level_everywhere(sub)
