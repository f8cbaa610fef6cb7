"""`esim-agent modem list` discovering on its own (no daemon): the emulator's fake udev feed."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from hw_fixtures.testing import EmulatorHandle, start_emulator

SCENARIO = """
[[modem]]
id = "q"
vendor = "quectel"
imei = "867698040000005"
netdev = "wwan-q"

[[modem]]
id = "s"
vendor = "sierra"
imei = "359072061234563"
"""


@pytest.fixture
def emu(tmp_path: Path) -> Iterator[EmulatorHandle]:
    scenario = tmp_path / "two.toml"
    scenario.write_text(SCENARIO)
    with start_emulator("--scenario", str(scenario), "--fast", "--log-level", "warning") as handle:
        yield handle


def config(tmp_path: Path, emu: EmulatorHandle) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(
        f"""
device_id = "t"
state_dir = "{tmp_path}/state"

[discovery]
source = "emulator"
emulator_control = "{emu.control_path}"
dbus_address = "unix:path={tmp_path}/no-bus"

[[modems]]
id = "found"
imei = "359072061234563"

[[modems]]
id = "absent"
usb = {{ vendor = "1bc7", product = "1061", interface = "4" }}

[[layers]]
name = "only"
modem = "found"
profile = "89440000000000000011"
role = "primary"
"""
    )
    return path


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", "modem", "list", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_list_json_probes_matches_and_reports(emu: EmulatorHandle, tmp_path: Path) -> None:
    out = run("--config", str(config(tmp_path, emu)), "--json", "--local")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["source"] == "emulator"
    assert doc["modemmanager"] is None  # no bus there: unknown, not an error
    devices = {d["imei"]: d for d in doc["devices"]}
    assert set(devices) == {"867698040000005", "359072061234563"}
    sierra = devices["359072061234563"]
    assert sierra["entry"] == "found"
    assert sierra["at_port"] == emu.modem("s")["port"]
    assert sierra["ports"][0]["interface"] == "03"
    quectel = devices["867698040000005"]
    assert quectel["entry"] is None
    assert quectel["netdev"] == "wwan-q"
    assert "reported, not used" in quectel["why"]
    entries = {e["id"]: e for e in doc["entries"]}
    assert entries["absent"]["why"] == "no device usb 1bc7:1061"


def test_list_for_people_and_without_probing(emu: EmulatorHandle, tmp_path: Path) -> None:
    out = run("--config", str(config(tmp_path, emu)), "--local", "--no-probe")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert text.startswith("ModemManager: unknown")
    assert emu.modem("q")["port"] in text
    assert "at_primary" in text
    assert "no device usb 1bc7:1061" in text
    # nothing was asked: the IMEI entry cannot be matched without a probe
    assert "no AT port answered with IMEI 359072061234563" in text


def test_broken_config_is_one_line_and_exit_78(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('device_id = "t"\n[discovery]\nsource = "emulator"\n')
    out = run("--config", str(bad))
    assert out.returncode == 78
    assert "discovery.emulator_control" in out.stderr
