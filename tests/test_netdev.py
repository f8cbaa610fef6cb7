"""interface_of_port on sysfs trees shaped like a USB modem's, a PCIe WWAN card's and a pty's."""

from __future__ import annotations

import os
from pathlib import Path

from agent.net.netdev import interface_of_port


def device(sysfs: Path, cls: str, name: str, target: str) -> None:
    """/sys/class/<cls>/<name>/device -> /sys/devices/<target> (as the kernel links it)."""
    real = sysfs / "devices" / target
    real.mkdir(parents=True, exist_ok=True)
    entry = sysfs / "class" / cls / name
    entry.mkdir(parents=True, exist_ok=True)
    os.symlink(real, entry / "device")


def netdev(sysfs: Path, under: str, name: str) -> None:
    (sysfs / "devices" / under / "net" / name).mkdir(parents=True)


def test_usb_modem_tty_finds_the_net_child_of_the_same_usb_device(tmp_path: Path) -> None:
    usb = "pci0000:00/0000:00:14.0/usb1/1-3"
    device(tmp_path, "tty", "ttyUSB2", f"{usb}/1-3:1.2/ttyUSB2")
    netdev(tmp_path, f"{usb}/1-3:1.4", "wwan0")
    netdev(tmp_path, "pci0000:00/0000:00:14.0/usb1/1-4/1-4:1.0", "usb0")  # another device's
    assert interface_of_port("/dev/ttyUSB2", tmp_path) == "wwan0"


def test_udev_symlink_is_followed_and_ecm_interface_found(tmp_path: Path) -> None:
    usb = "pci0000:00/0000:00:14.0/usb2/2-1.4"
    device(tmp_path, "tty", "ttyACM0", f"{usb}/2-1.4:1.0/tty/ttyACM0")
    netdev(tmp_path, f"{usb}/2-1.4:1.2", "enx0c5b8f279a64")
    link = tmp_path / "modem0"
    os.symlink("/dev/ttyACM0", link)
    assert interface_of_port(str(link), tmp_path) == "enx0c5b8f279a64"


def test_pcie_wwan_port_finds_the_wwan_interface(tmp_path: Path) -> None:
    pci = "pci0000:00/0000:00:1c.0/0000:02:00.0"
    device(tmp_path, "wwan", "wwan0at0", f"{pci}/wwan0/wwan0at0")
    netdev(tmp_path, pci, "wwan0")
    assert interface_of_port("/dev/wwan0at0", tmp_path) == "wwan0"


def test_a_pty_or_a_modem_without_network_function_has_none(tmp_path: Path) -> None:
    usb = "pci0000:00/0000:00:14.0/usb1/1-2"
    device(tmp_path, "tty", "ttyUSB0", f"{usb}/1-2:1.0/ttyUSB0")
    assert interface_of_port("/dev/ttyUSB0", tmp_path) is None
    assert interface_of_port("/dev/pts/7", tmp_path) is None
