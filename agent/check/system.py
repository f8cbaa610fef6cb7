"""What lies around the agent: the clock, who holds our serial ports, ModemManager, the broker."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path

from agent.check.evaluate import item
from agent.check.report import CheckItem
from agent.config import Config
from agent.mqtt.reach import BrokerUnreachable, check_broker, settings_from_config

#: Nothing this agent runs on can be older than its own release: a clock before this is unset.
CLOCK_FLOOR = datetime(2025, 1, 1, tzinfo=UTC)
CLOCK_CEILING = datetime(2100, 1, 1, tzinfo=UTC)
TIMESYNC_FLAG = Path("/run/systemd/timesync/synchronized")
BROKER_TIMEOUT_S = 10.0


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


def port_holders(port: str) -> dict[int, str]:
    """pid -> process name of every process with port open (any of its names resolved)."""
    try:
        target = os.stat(port)
    except OSError:
        return {}
    found: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fd_dir = f"/proc/{entry}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                st = os.stat(f"{fd_dir}/{fd}")
            except OSError:
                continue
            if (st.st_dev, st.st_ino, st.st_rdev) == (target.st_dev, target.st_ino, target.st_rdev):
                found[int(entry)] = _process_name(int(entry))
                break
    index = _pty_index(target.st_rdev)
    if index is not None:
        # The process driving the pty's master side is the device end (the emulator), not a
        # competitor for the port.
        found = {pid: name for pid, name in found.items() if not _holds_pty_master(pid, index)}
    return found


def _pty_index(rdev: int) -> int | None:
    """N of /dev/pts/N (Unix98 pty slaves: majors 136-143), None for other devices."""
    major = os.major(rdev)
    if 136 <= major <= 143:
        return (major - 136) * 256 + os.minor(rdev)
    return None


def _holds_pty_master(pid: int, index: int) -> bool:
    """Whether pid has the master side of /dev/pts/<index> open (fdinfo's tty-index)."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") not in ("/dev/ptmx", "/dev/pts/ptmx"):
                continue
            with open(f"/proc/{pid}/fdinfo/{fd}", encoding="utf-8") as fh:
                if f"tty-index:\t{index}\n" in fh.read():
                    return True
        except OSError:
            continue
    return False


def socket_owners(path: str) -> set[int]:
    """pids that hold the listening Unix socket bound at path (the daemon behind a control socket)."""
    inodes: set[str] = set()
    try:
        with open("/proc/net/unix", encoding="utf-8") as fh:
            for line in fh.readlines()[1:]:
                fields = line.split()
                if len(fields) >= 8 and fields[7] == path:
                    inodes.add(fields[6])
    except OSError:
        return set()
    owners: set[int] = set()
    wanted = {f"socket:[{i}]" for i in inodes}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            links = {
                os.readlink(f"/proc/{entry}/fd/{fd}") for fd in os.listdir(f"/proc/{entry}/fd")
            }
        except OSError:
            continue
        if links & wanted:
            owners.add(int(entry))
    return owners


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


def modemmanager_item(ports: dict[str, str | None]) -> CheckItem:
    """ModemManager leaves our ports alone."""
    return item(
        "modemmanager",
        "skip",
        "not yet checked: this version cannot ask ModemManager which ports it uses; the udev "
        "rule in systemd/70-esim-agent.rules tells it to leave the agent's ports alone",
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


def _process_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text(encoding="utf-8").strip()
    except OSError:
        return "?"
