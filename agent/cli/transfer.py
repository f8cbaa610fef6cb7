"""`esim-agent profile transfer`: move a profile to another device through the source's daemon."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from agent.cli.output import error, print_json
from agent.iccid import parse_iccid

EXIT_RUNTIME = 1
EXIT_USAGE = 2
EXIT_NO_DAEMON = 3
#: The daemon's own deadline for the target (1800 s) plus the source's side.
WAIT_S = 2400.0


def register(psub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `profile transfer` to the profile command group."""
    from agent.cli.daemon import DEFAULT_SOCKET

    p = psub.add_parser(
        "transfer",
        help="move a profile to another device of the group (the daemon does it, over MQTT)",
        description="The target device downloads the operator's new activation code, enables "
        "and verifies it; only then does this device disable and delete the old profile and "
        "send its notifications. If the target fails, nothing here changes.",
    )
    p.add_argument("--from-iccid", required=True, metavar="ICCID", help="the profile to move")
    p.add_argument("--to", required=True, metavar="DEVICE", help="the target's device_id")
    p.add_argument(
        "--code", required=True, help="the new activation code for the target, 'LPA:1$…'"
    )
    p.add_argument(
        "--confirmation-code", default=None, metavar="C", help="the operator's confirmation code"
    )
    p.add_argument("--modem", default=None, help="the source modem (found when left out)")
    p.add_argument(
        "--socket",
        default=None,
        help=f"control socket (default $ESIM_AGENT_SOCKET or {DEFAULT_SOCKET})",
    )
    p.add_argument("--json", action="store_true", help="print the transfer record as JSON")
    p.set_defaults(handler=_transfer)


def _transfer(args: argparse.Namespace) -> int:
    from agent.cli.daemon import default_socket
    from agent.daemon.control import ControlError, DaemonNotRunning, control_call

    try:
        iccid = parse_iccid(args.from_iccid)
    except ValueError as exc:
        error(f"--from-iccid: {exc}", "usage")
        return EXIT_USAGE
    body: dict[str, Any] = {"from_iccid": iccid, "to": args.to, "code": args.code}
    if args.confirmation_code is not None:
        body["confirmation_code"] = args.confirmation_code
    if args.modem is not None:
        body["modem"] = args.modem
    socket = args.socket or default_socket()
    try:
        result = asyncio.run(control_call(socket, "profile_transfer", body, timeout=WAIT_S))
    except DaemonNotRunning as exc:
        error(f"no daemon answers on {socket}: {exc.message}", "no_daemon")
        return EXIT_NO_DAEMON
    except ControlError as exc:
        error(f"profile transfer: {exc.message}", "daemon")
        return EXIT_RUNTIME
    if not isinstance(result, dict):
        error(f"profile transfer: unexpected answer {result!r}", "daemon")
        return EXIT_RUNTIME
    if args.json:
        print_json(result)
    else:
        _render(result)
    return 0 if result.get("step") == "done" else EXIT_RUNTIME


def _render(t: dict[str, Any]) -> None:
    if t.get("step") == "done":
        print(
            f"{t['from_iccid']} moved to {t['to']}: {t.get('target_iccid')} runs there, verified; "
            f"{t['from_iccid']} deleted here"
        )
        if t.get("notification") == "sent":
            print("the delete notification reached the SM-DP+")
        else:
            print("the delete notification is pending on the eUICC (sent on the next good link)")
        return
    print(f"transfer {t.get('id')} {t.get('step')}: {t.get('error')}")
    if t.get("step") == "failed":
        print(f"{t['from_iccid']} is untouched on this device")
