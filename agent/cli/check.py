"""`esim-agent check --config FILE [--json]`: the pre-travel checklist."""

from __future__ import annotations

import argparse
import sys

from agent.cli.output import print_json

EXIT_FAILED = 1
MARKS = {"pass": "ok  ", "fail": "FAIL", "skip": "skip"}


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the `check` command."""
    p = sub.add_parser(
        "check",
        help="pre-travel check: modems, profiles, probes, quotas, broker, clock, ports",
        description="Check everything a trip depends on; each item passes, fails (with how to "
        "fix it) or is skipped. Goes through the daemon when it runs, straight to the modems "
        "otherwise. Exit status 1 when an item fails, 78 when the config is invalid.",
    )
    p.add_argument("--config", required=True, metavar="FILE", help="TOML configuration file")
    p.add_argument("--json", action="store_true", help="print JSON (stable field names)")
    p.add_argument(
        "--socket",
        default=None,
        help="the daemon's control socket (default: the config's control.socket)",
    )
    p.set_defaults(handler=_check)


def _check(args: argparse.Namespace) -> int:
    from agent.check.run import check
    from agent.cli.progress import spinner
    from agent.config import EX_CONFIG

    with spinner("checking") as status:
        report = check(args.config, args.socket, lambda text: status.update(f"checking: {text}"))
    if args.json:
        print_json(report)
    else:
        via = {"daemon": " (through the running daemon)", "direct": " (straight to the modems)"}
        sys.stdout.write(f"{report.config}{via.get(report.via or '', '')}\n")
        for it in report.items:
            sys.stdout.write(f"  {MARKS[it.status]}  {it.title}: {it.detail}\n")
            if it.fix:
                sys.stdout.write(f"        fix: {it.fix}\n")
        s = report.summary
        sys.stdout.write(f"\nchecklist: {s.passed} pass, {s.failed} fail, {s.skipped} skip\n")
    if report.items[0].status == "fail":
        return EX_CONFIG
    return 0 if report.ok else EXIT_FAILED
