"""The shipped systemd unit and udev rules: device access covers every port kind the agent opens."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "esim-agent.service"
RULES = ROOT / "systemd" / "70-esim-agent.rules"

#: /proc/devices names of the drivers behind the ports the agent opens (the kernel sources):
#: drivers/usb/serial/usb-serial.c registers "ttyUSB", drivers/usb/class/cdc-acm.c "ttyACM",
#: drivers/net/wwan/wwan_core.c register_chrdev(0, "wwan_port", ...).
PORT_DRIVERS = {"ttyUSB": "/dev/ttyUSB2", "ttyACM": "/dev/ttyACM0", "wwan_port": "/dev/wwan0at0"}


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """Sections -> key -> every value in order (systemd keys repeat; configparser cannot)."""
    out: dict[str, dict[str, list[str]]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            out.setdefault(section, {})
            continue
        key, _, value = line.partition("=")
        out.setdefault(section, {}).setdefault(key.strip(), []).append(value.strip())
    return out


def proc_devices() -> set[str]:
    """Character device driver names this kernel has registered now."""
    names: set[str] = set()
    in_char = False
    for line in Path("/proc/devices").read_text().splitlines():
        if line.startswith("Character devices"):
            in_char = True
        elif line.startswith("Block devices"):
            in_char = False
        elif in_char and line.strip():
            names.add(line.split(None, 1)[1])
    return names


def test_device_allow_covers_usb_serial_acm_and_kernel_wwan_ports() -> None:
    service = parse_unit(UNIT.read_text())["Service"]
    assert service["DevicePolicy"] == ["closed"]
    allowed = {}
    for entry in service["DeviceAllow"]:
        spec, _, access = entry.partition(" ")
        allowed[spec] = access
    for driver, example in PORT_DRIVERS.items():
        assert allowed.get(f"char-{driver}") == "rw", f"{example} would be refused"


def test_every_allowed_class_is_a_real_driver_name() -> None:
    service = parse_unit(UNIT.read_text())["Service"]
    names = {e.split()[0].removeprefix("char-") for e in service["DeviceAllow"]}
    # "wwan" is not a /proc/devices entry on any kernel: it would silently allow nothing
    assert names <= set(PORT_DRIVERS), names - set(PORT_DRIVERS)
    loaded = proc_devices()
    assert "wwan" not in loaded
    for name in loaded & set(PORT_DRIVERS):
        assert name in names  # a driver loaded here is one the unit names


def test_udev_rules_give_wwan_at_ports_to_the_agent_and_explain_the_mm_tags() -> None:
    text = RULES.read_text()
    wwan = [line for line in text.splitlines() if 'SUBSYSTEM=="wwan"' in line]
    assert wwan
    assert 'GROUP="dialout"' in wwan[0]
    assert "ID_MM_PORT_IGNORE" in text
    assert "ID_MM_DEVICE_IGNORE" in text
    # a rule line continued with a backslash must not end the file mid-rule
    assert not re.search(r"\\\s*\Z", text)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
def test_systemd_analyze_security_accepts_the_unit() -> None:
    out = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", str(UNIT)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert "Overall exposure level" in out.stdout, out.stderr
    assert "DeviceAllow" not in out.stderr
