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
        return "port_busy", _busy_message(exc.port, default_socket())
    if isinstance(exc, PortGoneError):
        return "port", f"{exc.port}: {exc.reason}"
    if isinstance(exc, AtTimeout) and exc.command == "AT":
        return "not_a_modem", str(exc)
    if isinstance(exc, AtTimeout):
        return "timeout", f"{port}: {exc}"
    return "runtime", f"{port}: {exc}" if port not in str(exc) else str(exc)


def _busy_message(port: str, default: str) -> str:
    """Who holds the port; for the esim-agent daemon, the --socket that reaches it."""
    from agent.transport.owners import is_esim_agent_daemon, listening_sockets, port_holders

    holders = port_holders(port)
    for pid in sorted(holders):
        if is_esim_agent_daemon(pid):
            sockets = listening_sockets(pid)
            where = f"--socket {sockets[0]}" if sockets else f"--socket (default {default})"
            return (
                f"{port}: in use by the esim-agent daemon (pid {pid}), which owns its modems' "
                f"ports: go through it with {where}"
            )
    who = ", ".join(f"{name} (pid {pid})" for pid, name in sorted(holders.items()))
    return (
        f"{port}: in use by another process{f' ({who})' if who else ''}. If the esim-agent "
        f"daemon runs, it owns its modems' ports: go through it with --socket (default {default})"
    )
