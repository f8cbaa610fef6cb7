"""systemd notify protocol (sd_notify(3)) spoken directly over NOTIFY_SOCKET; no-ops without it."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable

import structlog

log = structlog.get_logger(__name__)


def _address(raw: str) -> str | bytes | None:
    if raw.startswith("@"):
        # Abstract namespace: the leading '@' stands for a NUL byte.
        return b"\0" + raw[1:].encode()
    if raw.startswith("/"):
        return raw
    # vsock:... and other forms are not used by the units we ship.
    return None


def notify(state: str) -> bool:
    """Send one state datagram (`KEY=VALUE` lines); True if the service manager got it."""
    raw = os.environ.get("NOTIFY_SOCKET")
    if not raw:
        return False
    address = _address(raw)
    if address is None:
        log.warning("sd_notify_unsupported_socket", socket=raw)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            # A full queue means systemd is not reading; never block the event loop on it.
            sock.setblocking(False)
            sock.sendto(state.encode(), address)
    except OSError as exc:
        log.warning("sd_notify_failed", socket=raw, error=exc.strerror or repr(exc))
        return False
    return True


def ready(status_text: str | None = None) -> bool:
    """Tell systemd start-up is complete (Type=notify), with an optional STATUS line."""
    return notify("READY=1" + (f"\nSTATUS={status_text}" if status_text else ""))


def status(text: str) -> bool:
    """Set the one-line status shown by `systemctl status`."""
    return notify(f"STATUS={text.replace(chr(10), ' ')}")


def watchdog() -> bool:
    """Pet the watchdog (WatchdogSec=)."""
    return notify("WATCHDOG=1")


def stopping() -> bool:
    """Tell systemd the service is shutting down."""
    return notify("STOPPING=1")


def reloading() -> bool:
    """Tell systemd a reload started (Type=notify-reload wants MONOTONIC_USEC too); send ready() after."""
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify(f"RELOADING=1\nMONOTONIC_USEC={usec}")


def watchdog_interval() -> float | None:
    """WATCHDOG_USEC in seconds when the watchdog is meant for this process, else None."""
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 1_000_000 if value > 0 else None


async def run_watchdog(alive: Callable[[], bool] | None = None) -> None:
    """Pet the watchdog at half its interval while alive() holds; returns at once if unset."""
    interval = watchdog_interval()
    if interval is None:
        return
    while True:
        if alive is None or alive():
            watchdog()
        else:
            log.warning("sd_watchdog_withheld")
        await asyncio.sleep(interval / 2)
