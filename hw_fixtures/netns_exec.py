"""`python -m hw_fixtures.netns_exec NAME -- cmd ...`: run a command inside a network namespace.

It setns()es into the named namespace with pyroute2 (no `ip netns exec`) and execs the command,
so the command's exit status and signals are its own. Only the network namespace changes.
"""

from __future__ import annotations

import os
import sys

from pyroute2 import netns


def main(argv: list[str] | None = None) -> int:
    """Enter the namespace and exec; returns 2 on bad usage, 127 if the command is missing."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 3 or args[1] != "--":
        print("usage: python -m hw_fixtures.netns_exec NAME -- cmd [args...]", file=sys.stderr)
        return 2
    name, command = args[0], args[2:]
    if name not in netns.listnetns() and not os.path.exists(name):
        print(f"netns_exec: no network namespace {name!r}", file=sys.stderr)
        return 2
    # flags=0: enter only, never create a namespace by accident
    netns.setns(name, flags=0)
    try:
        os.execvp(command[0], command)  # replaces this process; returns only by raising
    except FileNotFoundError:
        print(f"netns_exec: {command[0]}: not found", file=sys.stderr)
    return 127


if __name__ == "__main__":
    raise SystemExit(main())
