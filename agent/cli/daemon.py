"""`esim-agent run|status`: the daemon and its local control socket (filled in by the daemon room)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the daemon commands."""
