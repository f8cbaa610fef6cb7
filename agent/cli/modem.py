"""`esim-agent modem info|scan`: read a modem's state straight from its port."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

from agent.cli.args import add_vendor, positive_seconds
from agent.cli.output import error, print_json, print_sections, print_table
from agent.cli.port import cli_modem, describe
from agent.cli.progress import spinner
from agent.errors import AgentError
from agent.models import ModemInfo, ScanResult

EXIT_RUNTIME = 1
T = TypeVar("T")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the `modem` command group."""
    p = sub.add_parser("modem", help="read a modem's identity, SIM, signal, registration")
    msub = p.add_subparsers(dest="modem_command", metavar="ACTION")
    msub.required = True
    for name, helptext, handler in (
        ("info", "identity, SIM, signal, registration and operator", _info),
        ("scan", "search for operators (AT+COPS=?, slow)", _scan),
    ):
        q = msub.add_parser(name, help=helptext)
        q.add_argument("--port", required=True, help="serial port of the modem's AT interface")
        add_vendor(q)
        q.add_argument("--json", action="store_true", help="print JSON (stable field names)")
        if name == "scan":
            q.add_argument(
                "--timeout",
                type=positive_seconds,
                default=180.0,
                metavar="S",
                help="scan deadline in seconds (default 180)",
            )
        q.set_defaults(handler=handler)


def _info(args: argparse.Namespace) -> int:
    info = _run(args, _read_info(args.port, args.vendor))
    if info is None:
        return EXIT_RUNTIME
    if args.json:
        print_json(info)
    else:
        render_info(info)
    return 0


def _run(args: argparse.Namespace, work: Coroutine[Any, Any, T]) -> T | None:
    """Run one port session; a failure is one stderr line naming the port, and None."""
    try:
        return asyncio.run(work)
    except AgentError as exc:
        code, message = describe(exc, args.port)
        error(message, code)
    return None


async def _read_info(port: str, vendor: str) -> ModemInfo:
    async with cli_modem(port, vendor) as modem:
        return await modem.info()


def _scan(args: argparse.Namespace) -> int:
    result = _run(args, _run_scan(args.port, args.vendor, args.timeout))
    if result is None:
        return EXIT_RUNTIME
    if args.json:
        print_json(result)
    else:
        print_table(
            ("long", "short", "numeric", "status", "act"),
            [(o.long, o.short, o.numeric, o.status, o.act) for o in result.operators],
        )
    return 0


async def _run_scan(port: str, vendor: str, timeout: float) -> ScanResult:
    async with cli_modem(port, vendor) as modem:
        with spinner(f"scanning for operators on {port} (up to {timeout:g} s)"):
            return await modem.scan(timeout=timeout)


def render_info(info: ModemInfo) -> None:
    """The human form of `modem info`."""
    i, s, g, r, o = info.identity, info.sim, info.signal, info.registration, info.operator
    print_sections(
        [
            (
                "Identity",
                [
                    ("manufacturer", i.manufacturer),
                    ("model", i.model),
                    ("revision", i.revision),
                    ("imei", i.imei),
                ],
            ),
            ("SIM", [("state", s.state), ("iccid", s.iccid)]),
            (
                "Signal",
                [
                    ("rssi", None if g.rssi_dbm is None else f"{g.rssi_dbm} dBm"),
                    ("ber", g.ber),
                    ("rsrp", None if g.rsrp_dbm is None else f"{g.rsrp_dbm:g} dBm"),
                    ("rsrq", None if g.rsrq_db is None else f"{g.rsrq_db:g} dB"),
                    ("sinr", None if g.sinr_db is None else f"{g.sinr_db:g} dB"),
                ],
            ),
            (
                "Registration",
                [
                    ("state", r.state),
                    ("act", r.act),
                    ("lac", r.lac),
                    ("tac", r.tac),
                    ("cell_id", r.cell_id),
                ],
            ),
            ("Operator", [("name", o.name), ("mcc_mnc", o.mcc_mnc)]),
        ]
    )
