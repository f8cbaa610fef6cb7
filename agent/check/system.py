"""What lies around the agent: the clock, who holds our serial ports, ModemManager, the broker."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path

from agent.check.evaluate import item
from agent.check.report import CheckItem
from agent.config import Config
from agent.mqtt.reach import BrokerUnreachable, check_broker, settings_from_config
from agent.transport.modemmanager import ignored_by_modemmanager, modemmanager_running
from agent.transport.owners import port_holders

#: Nothing this agent runs on can be older than its own release: a clock before this is unset.
CLOCK_FLOOR = datetime(2025, 1, 1, tzinfo=UTC)
CLOCK_CEILING = datetime(2100, 1, 1, tzinfo=UTC)
TIMESYNC_FLAG = Path("/run/systemd/timesync/synchronized")
BROKER_TIMEOUT_S = 10.0
MM_TIMEOUT_S = 3.0


def clock_item(now: float | None = None) -> CheckItem:
    """The wall clock is plausible (TLS to the broker and quota periods depend on it)."""
    at = datetime.fromtimestamp(time.time() if now is None else now, tz=UTC)
    shown = at.strftime("%Y-%m-%d %H:%M:%S UTC")
    if not CLOCK_FLOOR <= at < CLOCK_CEILING:
        return item(
            "clock",
            "fail",
            f"the clock says {shown}",
            "set the time (timedatectl set-ntp true, or date -s); TLS and usage periods need it",
        )
    synced = " (systemd-timesyncd: synchronized)" if TIMESYNC_FLAG.exists() else ""
    return item("clock", "pass", f"{shown}{synced}")


def ports_item(ports: dict[str, str | None], allowed: Iterable[int] = ()) -> CheckItem:
    """No process but `allowed` ones (the running daemon) holds a modem's port.

    ports maps a modem id to its resolved port (None when it could not be resolved).
    """
    mine = set(allowed)
    problems: list[str] = []
    for modem, port in ports.items():
        if port is None:
            continue
        others = {pid: name for pid, name in port_holders(port).items() if pid not in mine}
        if others:
            who = ", ".join(f"{name} (pid {pid})" for pid, name in sorted(others.items()))
            problems.append(f"{modem} ({port}) is held by {who}")
    if problems:
        return item(
            "ports",
            "fail",
            "; ".join(problems),
            "stop the other program (ModemManager, a terminal, another agent) or give it "
            "another port; the udev rule in systemd/ keeps ModemManager off",
        )
    checked = [p for p in ports.values() if p is not None]
    if not checked:
        return item("ports", "skip", "no modem port could be resolved (see the modems item)")
    held = " (the running daemon holds them)" if mine else ""
    return item("ports", "pass", f"{len(checked)} port(s) free of other owners{held}")


async def modemmanager_item(
    cfg: Config,
    ports: dict[str, str | None],
    *,
    bus_address: str | None = None,
    ignored: Callable[[str], bool] = ignored_by_modemmanager,
) -> CheckItem:
    """ModemManager, when it runs, leaves our ports alone (udev rule) or shares them with us
    (share_with_modemmanager: inhibited around eUICC work)."""
    running = await modemmanager_running(MM_TIMEOUT_S, bus_address=bus_address)
    if running is None:
        return item("modemmanager", "pass", "no system D-Bus answers: ModemManager cannot run")
    if not running:
        return item("modemmanager", "pass", "ModemManager is not running")
    shared = {m.id for m in cfg.modems if m.share_with_modemmanager}
    exposed = [
        f"{modem} ({port})"
        for modem, port in sorted(ports.items())
        if port is not None and modem not in shared and not ignored(port)
    ]
    if exposed:
        return item(
            "modemmanager",
            "fail",
            "ModemManager runs and may take " + ", ".join(exposed),
            "install systemd/70-esim-agent.rules (ID_MM_PORT_IGNORE or ID_MM_DEVICE_IGNORE, "
            "docs/discovery.md) and reload udev, or set share_with_modemmanager = true",
        )
    how = [f"{m} shared (inhibited around eUICC work)" for m in sorted(shared & set(ports))]
    return item(
        "modemmanager",
        "pass",
        "ModemManager runs and leaves our ports alone" + (f"; {', '.join(how)}" if how else ""),
    )


async def broker_item(cfg: Config, config_path: str) -> CheckItem:
    """The configured broker accepts us with the configured credentials and TLS."""
    if not cfg.mqtt.enabled:
        return item("broker", "skip", "MQTT is disabled in the config (mqtt.enabled = false)")
    settings = settings_from_config(cfg, config_path)
    try:
        await check_broker(settings, BROKER_TIMEOUT_S)
    except BrokerUnreachable as exc:
        return item(
            "broker",
            "fail",
            str(exc),
            "check mqtt.host/port, the username and password (or password_file) and the TLS "
            "files in the config; is the broker running?",
        )
    tls = "TLS" if settings.tls else "no TLS"
    user = f"as {settings.username}" if settings.username else "anonymously"
    return item("broker", "pass", f"{settings.host}:{settings.port} accepted us {user} ({tls})")
