"""The emulator's modems as udev-like devices, and the device source the agent reads them from.

Each emulated modem looks like a USB modem: a usb_device with vendor/product/serial, its pty as
the tty on an interface number (02 unless the scenario says otherwise), and optionally a network
interface. Unplug removes them (children first), replug adds them back on the new pty: the agent's
discovery sees exactly what it would see from udev, through the same `DeviceSource` interface.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import structlog

from agent.transport.udev import DeviceEvent, UdevDevice, device_from_dict

log = structlog.get_logger(__name__)

#: USB ids each personality presents (the real modems' ids; generic uses a pid.codes test id).
USB_IDS: dict[str, tuple[str, str]] = {
    "generic": ("1209", "0001"),
    "quectel": ("2c7c", "0125"),
    "sierra": ("1199", "9071"),
    "fibocom": ("2cb7", "0210"),
    "simcom": ("1e0e", "9001"),
    "dell": ("413c", "81b6"),
}
#: Where each personality's AT port sits (the real modems' layouts, agent.transport.discovery).
AT_INTERFACE: dict[str, str] = {"sierra": "03", "dell": "03"}
BUS_ROOT = "/devices/esim-emulator/usb9"
CONNECT_TIMEOUT_S = 5.0


def udev_records(
    *,
    index: int,
    port: str,
    symlink: str | None,
    vendor_name: str,
    manufacturer: str,
    model: str,
    imei: str,
    usb_vendor: str | None = None,
    usb_product: str | None = None,
    usb_serial: str | None = None,
    usb_interface: str | None = None,
    netdev: str | None = None,
) -> list[dict[str, Any]]:
    """The recorded form of one plugged-in emulated modem, parents first."""
    vid, pid = USB_IDS.get(vendor_name, USB_IDS["generic"])
    vid, pid = (usb_vendor or vid).lower(), (usb_product or pid).lower()
    serial = usb_serial or f"EMU{imei[-8:]}"
    dev = f"9-{index + 1}"
    usb = f"{BUS_ROOT}/{dev}"
    iface = f"{int(usb_interface or AT_INTERFACE.get(vendor_name, '02'), 16):02x}"
    tty_name = "pts" + port.rsplit("/", 1)[-1]
    ids = {
        "ID_BUS": "usb",
        "ID_VENDOR_ID": vid,
        "ID_MODEL_ID": pid,
        "ID_VENDOR": manufacturer,
        "ID_MODEL": model,
        "ID_SERIAL_SHORT": serial,
    }
    out: list[dict[str, Any]] = [
        {
            "subsystem": "usb",
            "devpath": usb,
            "properties": {"DEVTYPE": "usb_device", "SUBSYSTEM": "usb", **ids},
        },
        {
            "subsystem": "tty",
            "devpath": f"{usb}/{dev}:1.{int(iface, 16)}/{tty_name}/tty/{tty_name}",
            "properties": {
                "DEVNAME": port,
                "SUBSYSTEM": "tty",
                "ID_USB_INTERFACE_NUM": iface,
                "ID_USB_DRIVER": "option",
                "DEVLINKS": symlink or "",
                **ids,
            },
        },
    ]
    if netdev:
        out.append(
            {
                "subsystem": "net",
                "devpath": f"{usb}/{dev}:1.4/net/{netdev}",
                "properties": {"INTERFACE": netdev, "DEVTYPE": "wwan", "SUBSYSTEM": "net", **ids},
            }
        )
    return out


class EmulatorDeviceSource:
    """A `DeviceSource` over the emulator's `udev_monitor` control stream."""

    def __init__(self, control_path: str) -> None:
        self.control_path = control_path
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._snapshot: list[UdevDevice] = []

    async def _connect(self) -> None:
        if self._reader is not None:
            return
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            reader, writer = await asyncio.open_unix_connection(
                self.control_path, limit=4 * 1024 * 1024
            )
            writer.write(b'{"cmd": "udev_monitor"}\n')
            await writer.drain()
            first = json.loads(await reader.readline())
        if not first.get("ok"):
            writer.close()
            raise ConnectionError(f"emulator refused udev_monitor: {first.get('error')}")
        self._reader, self._writer = reader, writer
        self._snapshot = [device_from_dict(d, self.control_path) for d in first["devices"]]

    async def enumerate(self) -> list[UdevDevice]:
        """The emulator's devices now (opens the stream; later changes arrive as events)."""
        await self._connect()
        return list(self._snapshot)

    async def events(self) -> AsyncIterator[DeviceEvent]:
        """Events after the snapshot; ends when the emulator goes away or close() is called."""
        await self._connect()
        reader = self._reader
        assert reader is not None
        while True:
            line = await reader.readline()
            if not line:
                log.info("emulator_udev_feed_ended", control=self.control_path)
                return
            try:
                item = json.loads(line)
                action = item["action"]
                device = device_from_dict(item["device"], self.control_path)
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("emulator_udev_bad_line", error=str(exc))
                continue
            if action in ("add", "remove", "change"):
                yield DeviceEvent(action, device)

    async def close(self) -> None:
        """Hang up the stream."""
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
