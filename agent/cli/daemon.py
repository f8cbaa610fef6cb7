"""`esim-agent run|status|switch|drill`: the daemon and its local control socket."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import Any

from agent.cli.output import error, print_json, print_table
from agent.config import DEFAULT_CONTROL_SOCKET, EX_CONFIG, load_config
from agent.errors import ConfigError

DEFAULT_SOCKET = DEFAULT_CONTROL_SOCKET
EXIT_RUNTIME = 1
EXIT_NO_DAEMON = 3


def default_socket() -> str:
    """The control socket: $ESIM_AGENT_SOCKET or the systemd RuntimeDirectory path."""
    return os.environ.get("ESIM_AGENT_SOCKET", DEFAULT_SOCKET)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the daemon commands."""
    p = sub.add_parser("run", help="run the daemon (as systemd's Type=notify service)")
    p.add_argument("--config", required=True, metavar="FILE", help="TOML configuration file")
    p.add_argument("--check", action="store_true", help="validate the config and exit")
    p.set_defaults(handler=_run)

    d = sub.add_parser(
        "demo", help="run the whole agent on the emulator with a scripted failover story"
    )
    d.add_argument(
        "--json", dest="json_out", default=None, metavar="FILE", help="write the timeline here"
    )
    d.add_argument(
        "--workdir", default=None, metavar="DIR", help="keep logs and config here (default: temp)"
    )
    d.add_argument(
        "--broker",
        choices=("auto", "mosquitto", "embedded"),
        default="auto",
        help="MQTT broker: Mosquitto when installed (auto, default) or the embedded demo broker",
    )
    d.set_defaults(handler=_demo)

    for name, helptext in (
        ("status", "show the running daemon's modems, layers and transitions"),
        ("drill", "rehearse a failover: move to the next usable layer now"),
        ("switch", "pin a layer (or --auto to unpin and let the policy choose)"),
    ):
        q = sub.add_parser(name, help=helptext)
        q.add_argument(
            "--socket",
            default=None,
            help=f"control socket (default $ESIM_AGENT_SOCKET or {DEFAULT_SOCKET})",
        )
        q.add_argument("--json", action="store_true", help="print JSON")
        if name == "switch":
            g = q.add_mutually_exclusive_group(required=True)
            g.add_argument("layer", nargs="?", help="layer name")
            g.add_argument("--auto", action="store_true", help="unpin")
        q.set_defaults(handler={"status": _status, "drill": _drill, "switch": _switch}[name])


def _run(args: argparse.Namespace) -> int:
    """Exit statuses (docs/systemd.md): 0 stopped, 1 runtime failure, 73 state_dir or control
    socket directory unusable, 75 another daemon on the socket, 77 a modem port that exists but
    cannot be opened, 78 invalid config."""
    from agent.daemon.preflight import (
        EX_CANTCREAT,
        EX_NOPERM,
        control_socket_problem,
        port_problem,
        state_dir_problem,
    )

    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        error(str(exc), "config")
        return EX_CONFIG
    if args.check:
        problem = state_dir_problem(cfg.state_dir, create=False) or control_socket_problem(
            cfg.control_socket, create=False
        )
        if problem is not None:
            error(f"{args.config}: {problem}")
            return EX_CANTCREAT
        for m in cfg.modems:
            if m.port is not None and (problem := port_problem(m.port)) is not None:
                error(f"{args.config}: {problem}")
                return EX_NOPERM
        sys.stdout.write(f"{args.config}: ok\n")
        return 0
    from agent import log as agent_log
    from agent.daemon.app import Daemon

    agent_log.configure(cfg.log_level)
    # A start that cannot work logs one `daemon_start_failed` line and returns its status.
    return asyncio.run(Daemon(cfg, args.config).run())


def _demo(args: argparse.Namespace) -> int:
    from agent.demo.run import DemoError
    from agent.demo.run import main as demo_main

    try:
        return demo_main(args.json_out, args.workdir, args.broker)
    except DemoError as exc:
        error(str(exc))
        return EXIT_RUNTIME


def call_daemon(socket: str | None, cmd: str, cmd_args: dict[str, Any] | None = None) -> Any:
    """One control-socket request; raises ControlError (DaemonNotRunning when nobody listens)."""
    from agent.daemon.control import control_call

    return asyncio.run(control_call(socket or default_socket(), cmd, cmd_args or {}, timeout=600))


def _control(args: argparse.Namespace, cmd: str, cmd_args: dict[str, Any] | None = None) -> Any:
    from agent.daemon.control import ControlError, DaemonNotRunning

    try:
        return call_daemon(args.socket, cmd, cmd_args)
    except DaemonNotRunning as exc:
        error(f"no daemon answers on {args.socket or default_socket()}: {exc.message}", "no_daemon")
        raise SystemExit(EXIT_NO_DAEMON) from None
    except ControlError as exc:
        error(f"{cmd}: {exc.message}", "daemon")
        raise SystemExit(EXIT_RUNTIME) from None


def _group_status(group: dict[str, Any] | None) -> None:
    """The sibling layers' view and the group claim, when the device is in a [group]."""
    if not group:
        return

    def yes_no(v: object) -> str:
        return "-" if v is None else ("yes" if v else "no")

    if group["siblings"]:
        sys.stdout.write("\n")
        print_table(
            ("sibling layer", "device", "online", "connectivity", "health", "reason"),
            [
                (
                    x["layer"],
                    x["device"],
                    yes_no(x["online"]),
                    yes_no(x["connectivity"]),
                    x["health"],
                    x["reason"],
                )
                for x in group["siblings"]
            ],
        )
    claim = group.get("claim")
    broker = "connected" if group["broker_connected"] else "unreachable"
    line = f"\nbroker: {broker}"
    if claim:
        line += f"  group {claim['group']} emergency claim: {claim['phase']}"
    sys.stdout.write(line + "\n")


def _profile_cell(layer: dict[str, Any]) -> str:
    """The layer's profile, marked when it is not on the eUICC (yet): store and forward."""
    state = layer.get("profile_state")
    if state in ("missing", "downloading"):
        return f"{layer['profile']} ({state}: {layer.get('profile_reason') or '?'})"
    return str(layer["profile"])


def _status(args: argparse.Namespace) -> int:
    st = _control(args, "status")
    if args.json:
        print_json(st)
        return 0
    sys.stdout.write(
        f"device {st['device_id']}  active layer: {st['active_layer'] or '-'}  ({st['phase']})\n\n"
    )
    print_table(
        ("layer", "role", "modem", "profile", "health", "reason", "active"),
        [
            (
                x["name"],
                x["role"],
                x["modem"],
                _profile_cell(x),
                x["health"],
                x["reason"],
                "*" if x["active"] else "",
            )
            for x in st["layers"]
        ],
    )
    _group_status(st.get("group"))
    sys.stdout.write("\n")
    rows = []
    for m in st["modems"]:
        info = m.get("info") or {}
        reg = info.get("registration") or {}
        sig = info.get("signal") or {}
        op = info.get("operator") or {}
        rows.append(
            (
                m["id"],
                m["port"],
                "online" if m["online"] else "offline",
                m["enabled_iccid"],
                reg.get("state"),
                reg.get("act"),
                sig.get("rssi_dbm"),
                op.get("name"),
            )
        )
    print_table(("modem", "port", "state", "profile", "reg", "act", "rssi", "operator"), rows)
    notes = st.get("notifications")
    if notes and notes.get("enabled"):
        pending = "?" if notes["pending"] is None else notes["pending"]
        retry = notes.get("next_retry_s")
        when = f", next retry in {retry:g} s" if retry is not None else ""
        sys.stdout.write(f"\nnotifications: {pending} pending{when}\n")
    if st["timeline"]:
        sys.stdout.write("\n")
        print_table(
            ("id", "kind", "from", "to", "outcome", "total ms", "reason"),
            [
                (
                    t["id"],
                    t["kind"],
                    t["from_layer"],
                    t["to_layer"],
                    t["outcome"],
                    t["timings_ms"]["total"],
                    t["reason"],
                )
                for t in st["timeline"]
            ],
        )
    return 0


def _print_transition(args: argparse.Namespace, result: dict[str, Any]) -> int:
    if args.json:
        print_json(result)
    else:
        t = result.get("transition")
        if t is None and getattr(args, "auto", False):
            sys.stdout.write("unpinned: the policy chooses the layer again\n")
        elif t is None:
            sys.stdout.write("no change\n")
        else:
            sys.stdout.write(
                f"{t['kind']}: {t['from_layer']} -> {t['to_layer']}: {t['outcome']} ({t['reason']})\n"
            )
    t = result.get("transition")
    return 0 if t is None or t.get("outcome") == "switched" else EXIT_RUNTIME


def _drill(args: argparse.Namespace) -> int:
    return _print_transition(args, _control(args, "drill"))


def _switch(args: argparse.Namespace) -> int:
    return _print_transition(
        args, _control(args, "switch_layer", {"layer": None if args.auto else args.layer})
    )
