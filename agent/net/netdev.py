"""The network interface of the modem behind an AT port, read from sysfs (`interface = "auto"`).

The AT port and the network function are children of one device: a USB modem's tty sits under
one of its USB interfaces (`1-1:1.2`) and its wwan0/usb0/enx... under another interface of the
same USB device (`1-1`); a PCIe modem's kernel-WWAN port (`wwan0at0`) and its `wwan0` share the
PCI function. So: resolve the port to its sysfs device, climb to that common device, and take
the network interfaces below it. Pure file reads; a port sysfs does not know (a pty) has none.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

#: A USB device (not one of its interfaces): `1-1`, `2-1.4.3`.
_USB_DEVICE = re.compile(r"^\d+-[\d.]+$")
#: A PCI function: `0000:02:00.0`.
_PCI_FUNCTION = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")
#: How far below the common device interfaces are searched (USB interface/net/name: 3).
_MAX_DEPTH = 4


def _rank(name: str) -> tuple[int, str]:
    """wwan first (the WWAN subsystem, MBIM/QMI), then usb/enx (ECM, RNDIS, NCM), then the rest."""
    for i, prefix in enumerate(("wwan", "usb", "enx", "eth")):
        if name.startswith(prefix):
            return i, name
    return 9, name


def _device_of(port: str, sysfs: Path) -> Path | None:
    name = os.path.basename(os.path.realpath(port))
    for cls in ("tty", "wwan"):
        link = sysfs / "class" / cls / name / "device"
        if link.exists():
            return Path(os.path.realpath(link))
    return None


def _common_device(start: Path, sysfs: Path) -> Path | None:
    here = start
    while sysfs in here.parents:
        if _USB_DEVICE.match(here.name) or _PCI_FUNCTION.match(here.name):
            return here
        here = here.parent
    return None


def _interfaces_below(device: Path) -> list[str]:
    found: list[str] = []
    base_depth = len(device.parts)
    for root, dirs, _ in os.walk(device, followlinks=False):
        depth = len(Path(root).parts) - base_depth
        if Path(root).name == "net":
            found.extend(dirs)
            dirs[:] = []
        elif depth >= _MAX_DEPTH:
            dirs[:] = []
    return found


def interface_of_port(port: str, sysfs: str | Path = "/sys") -> str | None:
    """The network interface of the modem whose AT port is `port` (a /dev path, maybe a udev
    symlink), or None when sysfs shows none."""
    root = Path(os.path.realpath(sysfs))
    device = _device_of(port, root)
    if device is None:
        return None
    common = _common_device(device, root)
    if common is None:
        return None
    names = _interfaces_below(common)
    return min(names, key=_rank) if names else None
