"""`esim-agent emulator`: runs the modem emulator of hw_fixtures (its own options follow the word)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the `emulator` command (parsed by hw_fixtures.emulator itself)."""
    p = sub.add_parser(
        "emulator",
        help="run the serial modem emulator on a pty; --net netns (root) adds real interfaces "
        "(see docs/emulator.md; `esim-agent emulator --help` for its options)",
        add_help=False,
    )
    p.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from hw_fixtures.emulator import main

    return main([], prog="esim-agent emulator")
