"""`esim-agent modem info|scan|list`: read a modem's state from its port; list what discovery sees."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Coroutine
from typing import Any, TypeVar

import msgspec

from agent.cli.args import add_vendor, positive_seconds
from agent.cli.output import error, print_json, print_sections, print_table
from agent.cli.port import cli_modem, describe
from agent.cli.progress import spinner
from agent.errors import AgentError
from agent.models import ModemInfo, ScanResult
from agent.net.netdev import interface_of_port

EXIT_RUNTIME = 1
EX_CONFIG = 78
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
    q = msub.add_parser(
        "list", help="devices, ports and roles, identities, network interfaces, matched entries"
    )
    q.add_argument("--config", default=None, help=f"configuration (default {DEFAULT_CONFIG})")
    q.add_argument("--socket", default=None, help="ask the daemon on this control socket")
    q.add_argument("--local", action="store_true", help="discover here even if a daemon runs")
    q.add_argument("--no-probe", action="store_true", help="do not send AT to unknown ports")
    q.add_argument("--json", action="store_true", help="print JSON (docs/discovery.md)")
    q.set_defaults(handler=_list)


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
        info = await modem.info()
    return msgspec.structs.replace(info, interface=interface_of_port(port))


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
            ("Network", [("interface", info.interface)]),
        ]
    )


# ---- modem list ------------------------------------------------------------------------------

DEFAULT_CONFIG = "/etc/esim-agent/config.toml"
MM_TIMEOUT_S = 2.0


def _list(args: argparse.Namespace) -> int:
    from agent.config import Config, load_config
    from agent.errors import ConfigError

    path = args.config or (DEFAULT_CONFIG if os.path.exists(DEFAULT_CONFIG) else None)
    try:
        cfg = load_config(path) if path else Config(device_id="local")
    except ConfigError as exc:
        error(str(exc))
        return EX_CONFIG
    doc = None
    if not args.local:
        from agent.cli.daemon import default_socket

        # the daemon's socket: as given, as the config places it, or where systemd puts it
        sockets = [args.socket] if args.socket else [cfg.control_socket, default_socket()]
        for socket in dict.fromkeys(sockets):
            if (doc := _from_daemon(socket)) is not None:
                break
    if doc is None:
        try:
            doc = asyncio.run(_discover(cfg, probe=not args.no_probe))
        except AgentError as exc:
            error(str(exc))
            return EXIT_RUNTIME
    if args.json:
        print_json(doc)
    else:
        render_list(doc)
    return 0


def _from_daemon(socket: str) -> dict[str, Any] | None:
    """The running daemon's view (it holds the ports, so it knows more); None when none runs."""
    from agent.daemon.control import ControlError, control_call

    if not os.path.exists(socket):
        return None
    try:
        doc = asyncio.run(control_call(socket, "modems", {}, timeout=30))
    except ControlError:
        return None
    return doc if isinstance(doc, dict) else None


async def _discover(cfg: Any, *, probe: bool) -> dict[str, Any]:
    from agent.daemon.devices import device_source, report
    from agent.modem.finder import Finder
    from agent.transport.modemmanager import modemmanager_running

    mm_task = asyncio.create_task(
        modemmanager_running(MM_TIMEOUT_S, bus_address=cfg.discovery.dbus_address)
    )
    source = device_source(cfg.discovery)
    finder = Finder(source) if source is not None else None
    try:
        if finder is not None:
            await finder.start()
            if probe:
                await finder.identify_all()
        return report(finder, cfg.modems, source=cfg.discovery.source, modemmanager=await mm_task)
    finally:
        if finder is not None:
            await finder.stop()


def render_list(doc: dict[str, Any]) -> None:
    """The human form of `modem list`."""
    mm = {True: "running", False: "not running", None: "unknown (no system bus)"}
    sys.stdout.write(f"ModemManager: {mm[doc.get('modemmanager')]}\n")
    if not doc["devices"]:
        sys.stdout.write(f"No modem devices ({doc['source']}).\n")
    for d in doc["devices"]:
        entry = f"entry {d['entry']}" if d["entry"] else "no entry"
        sys.stdout.write(
            f"\n{d['vendor']}:{d['product']} {d['model'] or ''} [{d['bus']}] {entry}"
            f"  imei {d['imei'] or '-'}  net {d['netdev'] or '-'}\n  {d['key']}\n"
        )
        if d["why"]:
            sys.stdout.write(f"  {d['why']}\n")
        print_table(
            ("port", "role", "if", "driver", "held by", "imei"),
            [
                (
                    p["path"],
                    p["role"],
                    p["interface"],
                    p["driver"],
                    ",".join(map(str, p["held_by"])) or None,
                    p["imei"] or p["probe_error"],
                )
                for p in d["ports"]
            ],
        )
    if doc["entries"]:
        sys.stdout.write("\n")
        print_table(
            ("entry", "by", "port", "net", "why"),
            [(e["id"], e["how"], e["port"], e["netdev"], e["why"]) for e in doc["entries"]],
        )
