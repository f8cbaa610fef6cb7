"""Living beside ModemManager over D-Bus (dbus-fast): is it running, and keep it off a modem.

ModemManager owns `org.freedesktop.ModemManager1` on the system bus. Its
`org.freedesktop.ModemManager1.InhibitDevice(uid, inhibit)` call makes it release a modem
(`uid` is the modem's `Device` property: the sysfs path of the physical device) until the same
caller un-inhibits it — or until the caller's D-Bus connection goes away, which is why a crashed
agent never leaves a modem inhibited.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import structlog
from dbus_fast import BusType, Message, MessageType
from dbus_fast.aio import MessageBus

from agent.errors import AgentError

log = structlog.get_logger(__name__)

MM_NAME = "org.freedesktop.ModemManager1"
MM_PATH = "/org/freedesktop/ModemManager1"
MM_IFACE = "org.freedesktop.ModemManager1"
DBUS_NAME = "org.freedesktop.DBus"
DBUS_PATH = "/org/freedesktop/DBus"


class ModemManagerError(AgentError):
    """ModemManager refused or did not answer a request."""


async def _connect(bus_address: str | None, timeout: float) -> MessageBus:
    bus = MessageBus(bus_address=bus_address, bus_type=BusType.SYSTEM)
    async with asyncio.timeout(timeout):
        await bus.connect()
    return bus


async def modemmanager_running(timeout: float, *, bus_address: str | None = None) -> bool | None:
    """True/False whether ModemManager holds its name on the system bus; None when no bus answers.

    A missing bus (containers, minimal images) is "unknown", not an error.
    """
    try:
        bus = await _connect(bus_address, timeout)
    except Exception as exc:  # no bus at all, refused, or not answering: unknown
        log.debug("dbus_unavailable", error=str(exc))
        return None
    try:
        async with asyncio.timeout(timeout):
            reply = await bus.call(
                Message(
                    destination=DBUS_NAME,
                    path=DBUS_PATH,
                    interface=DBUS_NAME,
                    member="NameHasOwner",
                    signature="s",
                    body=[MM_NAME],
                )
            )
    except TimeoutError:
        return None
    finally:
        bus.disconnect()
    if reply is None or reply.message_type != MessageType.METHOD_RETURN:
        return None
    return bool(reply.body[0])


async def _inhibit_call(bus: MessageBus, uid: str, inhibit: bool, timeout: float) -> None:
    async with asyncio.timeout(timeout):
        reply = await bus.call(
            Message(
                destination=MM_NAME,
                path=MM_PATH,
                interface=MM_IFACE,
                member="InhibitDevice",
                signature="sb",
                body=[uid, inhibit],
            )
        )
    if reply is None or reply.message_type == MessageType.ERROR:
        detail = reply.body[0] if reply is not None and reply.body else "no reply"
        name = reply.error_name if reply is not None else None
        raise ModemManagerError(f"InhibitDevice({uid!r}, {inhibit}) refused: {name}: {detail}")


@contextlib.asynccontextmanager
async def inhibited(
    uid: str, *, timeout: float = 10.0, bus_address: str | None = None
) -> AsyncIterator[None]:
    """Keep ModemManager off the modem `uid` for the duration of the block.

    The inhibition lives on a D-Bus connection of its own, opened here and closed on the way
    out: should the agent die inside the block, the bus drops the connection and ModemManager
    takes the modem back by itself.
    """
    try:
        bus = await _connect(bus_address, timeout)
    except Exception as exc:  # no bus, refused, not answering: one typed error for the caller
        raise ModemManagerError(f"no D-Bus to reach ModemManager: {exc}") from exc
    try:
        await _inhibit_call(bus, uid, True, timeout)
        log.info("modemmanager_inhibited", uid=uid)
        try:
            yield
        finally:
            try:
                await _inhibit_call(bus, uid, False, timeout)
                log.info("modemmanager_released", uid=uid)
            except (ModemManagerError, TimeoutError) as exc:
                # closing the connection below releases it all the same
                log.warning("modemmanager_release_failed", uid=uid, error=str(exc))
    finally:
        bus.disconnect()


#: udev properties by which ModemManager leaves a port, or a whole device, alone.
MM_IGNORE_PROPERTIES = ("ID_MM_PORT_IGNORE", "ID_MM_DEVICE_IGNORE")


def ignored_by_modemmanager(port: str) -> bool:
    """Whether udev tells ModemManager to leave this port alone (the port's own properties or
    its parents', where ID_MM_DEVICE_IGNORE is usually set). False when udev does not know it."""
    try:
        import pyudev

        context = pyudev.Context()
        device: Any = pyudev.Devices.from_device_file(context, str(Path(port).resolve()))
    except Exception:  # not a device node udev knows (a pty, a missing file): nothing set
        return False
    while device is not None:
        if any(device.properties.get(key) == "1" for key in MM_IGNORE_PROPERTIES):
            return True
        device = device.parent
    return False
