"""The `esim-agent` command line: one sub-command group per room, output as a table or --json."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from agent import __version__

EXIT_RUNTIME = 1
EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser; sub-command modules add their own groups."""
    from agent.cli import check as check_cli
    from agent.cli import daemon as daemon_cli
    from agent.cli import emulator as emulator_cli
    from agent.cli import euicc as euicc_cli
    from agent.cli import modem as modem_cli
    from agent.cli import watch as watch_cli
    from agent.cli.args import LOG_LEVELS, CliParser, add_log_level_everywhere

    parser: argparse.ArgumentParser = CliParser(
        prog="esim-agent",
        description="Connectivity agent: AT modems, eSIM profiles, link health, failover, MQTT.",
    )
    parser.add_argument("--version", action="version", version=f"esim-agent {__version__}")
    parser.add_argument(
        "--log-level",
        default="error",
        choices=LOG_LEVELS,
        help="log level on stderr (default error; the daemon uses the config's level)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", help="what to do")
    sub.required = True
    modem_cli.register(sub)
    euicc_cli.register(sub)
    daemon_cli.register(sub)
    check_cli.register(sub)
    emulator_cli.register(sub)
    watch_cli.register(sub)
    add_log_level_everywhere(parser)
    return parser


def _wants_json(args_list: Sequence[str]) -> bool:
    """--json on a command that prints data (demo's --json names a file instead)."""
    words = iter(args_list)
    command = None
    for word in words:
        if word == "--log-level":
            next(words, None)
        elif not word.startswith("-"):
            command = word
            break
    return "--json" in args_list and command != "demo"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    from agent.cli.output import error, set_json_errors

    args_list = list(sys.argv[1:] if argv is None else argv)
    # The emulator has its own parser: hand it everything after the word.
    if args_list[:1] == ["emulator"]:
        from hw_fixtures.emulator import main as emulator_main

        return emulator_main(args_list[1:], prog="esim-agent emulator")
    set_json_errors(_wants_json(args_list))
    parser = build_parser()
    args = parser.parse_args(args_list)
    set_json_errors(getattr(args, "json", False) is True)
    from agent import log as agent_log

    agent_log.configure(args.log_level, json=getattr(args, "log_json", None))
    handler = args.handler
    try:
        result: int = handler(args)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as exc:
        # Whatever slipped past the typed errors still gets one line, not a traceback; the
        # traceback is one flag away for a bug report.
        if args.log_level == "debug":
            raise
        error(
            f"unexpected {type(exc).__name__}: {exc} (--log-level debug shows the traceback)",
            code="internal",
        )
        return EXIT_RUNTIME
    return result
