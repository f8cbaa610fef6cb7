"""Opening a modem from the CLI: a quick answer or a plain reason, and a pointer to the daemon
when the daemon owns the port."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from agent.errors import AgentError, AtTimeout, PortBusyError, PortGoneError
from agent.modem.driver import Modem, open_modem

#: How long a person waits to learn that a port is not a modem (the issue's goal is <= 3 s).
ANSWER_WITHIN_S = 2.0


@asynccontextmanager
async def cli_modem(port: str, vendor: str) -> AsyncIterator[Modem]:
    """open_modem with a short first-answer deadline."""
    async with open_modem(port, vendor=vendor, answer_within=ANSWER_WITHIN_S) as modem:
        yield modem


def describe(exc: AgentError, port: str) -> tuple[str, str]:
    """(error code, one-line message) for a failure to talk to a modem on port."""
    from agent.cli.daemon import default_socket

    if isinstance(exc, PortBusyError):
        return (
            "port_busy",
            f"{exc.port}: in use by another process. If the esim-agent daemon runs, it owns its "
            f"modems' ports: go through it with --socket (default {default_socket()}) or use "
            "`esim-agent status`",
        )
    if isinstance(exc, PortGoneError):
        return "port", f"{exc.port}: {exc.reason}"
    if isinstance(exc, AtTimeout) and exc.command == "AT":
        return "not_a_modem", str(exc)
    if isinstance(exc, AtTimeout):
        return "timeout", f"{port}: {exc}"
    return "runtime", f"{port}: {exc}" if port not in str(exc) else str(exc)
