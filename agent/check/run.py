"""The check from start to end: the config, then the modems (through the daemon when it runs),
then what lies around them. Returns a CheckReport; raises nothing a user should see."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Literal

from agent.check import evaluate, system
from agent.check.evaluate import ModemSeen, ProbeSeen, item
from agent.check.observe import observe_direct, observe_status, ports_from_status, resolved_ports
from agent.check.report import CheckItem, CheckReport, make_report
from agent.config import Config, load_config
from agent.errors import ConfigError
from agent.transport.owners import socket_owners

STATUS_TIMEOUT_S = 10.0
Progress = Callable[[str], None]


async def daemon_status(socket: str, cfg: Config) -> dict[str, Any] | None:
    """The running daemon's status when one answers on socket for this device; None otherwise."""
    from agent.daemon.control import ControlError, control_call

    try:
        status = await control_call(socket, "status", timeout=STATUS_TIMEOUT_S)
    except ControlError:
        return None
    if not isinstance(status, dict) or status.get("device_id") != cfg.device_id:
        return None
    return status


async def run_check(
    config_path: str, socket: str | None = None, progress: Progress = lambda _text: None
) -> CheckReport:
    """Every item of the checklist for the config at config_path."""
    try:
        cfg = load_config(config_path)
    except ConfigError as exc:
        items = [item("config", "fail", str(exc), "fix the named key; see docs/configuration.md")]
        items += [
            item(i, "skip", "the config is not valid") for i in evaluate.ORDER if i != "config"
        ]
        return make_report(config_path, None, items)
    progress("asking the daemon")
    status = await daemon_status(socket or cfg.control_socket, cfg)
    via: Literal["daemon", "direct"]
    reasons: dict[str, str] = {}
    if status is not None:
        via = "daemon"
        seen, probes = observe_status(cfg, status)
        reasons = {
            str(x.get("name")): str(x["profile_reason"])
            for x in status.get("layers") or []
            if isinstance(x, dict) and x.get("profile_reason")
        }
        ports = ports_from_status(cfg, status)
        # The daemon owns its modems' ports; anyone else holding them is the problem.
        owners = socket_owners(socket or cfg.control_socket)
        ports_item = system.ports_item(ports, owners)
    else:
        via = "direct"
        ports = resolved_ports(cfg)
        # Before we open the ports ourselves.
        ports_item = system.ports_item(ports)
        progress("reading the modems")
        seen, probes = await observe_direct(cfg)
    progress("reaching the broker")
    broker = await system.broker_item(cfg, config_path)
    progress("asking D-Bus about ModemManager")
    modemmanager = await system.modemmanager_item(cfg, ports)
    items = [
        item("config", "pass", f"{len(cfg.modems)} modem(s), {len(cfg.layers)} layer(s)"),
        *_modem_items(cfg, seen, probes),
        evaluate.downloads_item(cfg, seen, reasons),
        evaluate.quotas_item(cfg),
        broker,
        system.clock_item(),
        ports_item,
        modemmanager,
    ]
    return make_report(config_path, via, items)


def _modem_items(
    cfg: Config, seen: dict[str, ModemSeen], probes: dict[str, ProbeSeen]
) -> list[CheckItem]:
    return [
        evaluate.modems_item(cfg, seen),
        evaluate.primary_item(cfg, seen, probes),
        evaluate.failover_item(cfg, seen),
        evaluate.emergency_item(cfg, seen),
    ]


def check(
    config_path: str, socket: str | None = None, progress: Progress = lambda _t: None
) -> CheckReport:
    """run_check for synchronous callers (the CLI)."""
    return asyncio.run(run_check(config_path, socket, progress))
