"""The `esim-agent` command line: one sub-command group per room, output as a table or --json."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from agent import __version__


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser; sub-command modules add their own groups."""
    from agent.cli import daemon as daemon_cli
    from agent.cli import emulator as emulator_cli
    from agent.cli import modem as modem_cli

    parser = argparse.ArgumentParser(
        prog="esim-agent",
        description="Connectivity agent: AT modems, eSIM profiles, link health, failover, MQTT.",
    )
    parser.add_argument("--version", action="version", version=f"esim-agent {__version__}")
    parser.add_argument(
        "--log-level",
        default="error",
        help="debug, info, warning or error (default; the daemon uses the config's level)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    modem_cli.register(sub)
    try:
        from agent.cli import euicc as euicc_cli
    except ImportError:  # pragma: no cover - only while the eUICC room is absent
        pass
    else:
        euicc_cli.register(sub)
    daemon_cli.register(sub)
    emulator_cli.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    # The emulator has its own parser: hand it everything after the word.
    if args_list[:1] == ["emulator"]:
        from hw_fixtures.emulator import main as emulator_main

        return emulator_main(args_list[1:])
    parser = build_parser()
    args = parser.parse_args(args_list)
    from agent import log as agent_log

    agent_log.configure(args.log_level, json=getattr(args, "log_json", None))
    handler = args.handler
    try:
        result: int = handler(args)
    except KeyboardInterrupt:
        return 130
    return result
