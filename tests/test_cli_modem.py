"""`esim-agent modem info|scan` as a user runs it: a subprocess against the emulator's real pty."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import serial

from hw_fixtures.testing import EmulatorHandle, PortReader, start_emulator, wait_for

VENDORS = ["generic", "quectel", "sierra", "fibocom", "simcom", "dell"]
ICCID = "8944500102030405067"  # 19 digits: vendors that pad to 20 must not leak the F
CLI_TIMEOUT = 60.0


def run_cli(*args: str, timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def info_json(port: str) -> dict[str, Any]:
    result = run_cli("modem", "info", "--port", port, "--json")
    assert result.returncode == 0, result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    return data


@pytest.fixture(scope="module", params=VENDORS)
def vendor_emu(request: pytest.FixtureRequest) -> Iterator[EmulatorHandle]:
    with start_emulator(
        "--vendor", request.param, "--fast", "--profile", f"{ICCID}:Home:enabled"
    ) as handle:
        yield handle


@pytest.fixture
def emu() -> Iterator[EmulatorHandle]:
    with start_emulator("--vendor", "quectel", "--fast") as handle:
        yield handle


def test_info_json_for_every_personality(vendor_emu: EmulatorHandle) -> None:
    vendor_emu.control("set_signal", rssi_dbm=-83, rsrp_dbm=-104, rsrq_db=-12, sinr_db=7)
    vendor_emu.control("set_operator", name="Home Mobile", short="Home", mcc_mnc="23410")
    status = vendor_emu.status()
    data = info_json(vendor_emu.port)

    assert set(data) == {"identity", "sim", "signal", "registration", "operator", "interface"}
    assert data["interface"] is None  # a pty: no USB device, no network function
    ident = data["identity"]
    assert ident["imei"] is not None
    assert len(ident["imei"]) == 15
    assert ident["imei"].isdigit()
    assert ident["manufacturer"]
    assert ident["model"]
    assert data["sim"] == {"state": "ready", "iccid": ICCID}
    assert data["sim"]["iccid"] == status["iccid"]
    assert data["registration"]["state"] == "home"
    assert data["registration"]["act"] == status["registration"]["act"]
    assert data["registration"]["tac"] == status["registration"]["tac"]
    assert data["registration"]["cell_id"] == status["registration"]["cell_id"]
    assert data["operator"] == {"name": "Home Mobile", "mcc_mnc": "23410"}
    assert data["signal"]["rssi_dbm"] == -83
    assert data["signal"]["rsrp_dbm"] == -104
    assert data["signal"]["rsrq_db"] == -12
    if status["vendor"] in ("quectel", "simcom"):  # AT+QCSQ/AT+QENG, AT+CPSI?
        assert data["signal"]["sinr_db"] == 7
    else:
        assert data["signal"]["sinr_db"] is None


def test_info_human_output_has_every_section(vendor_emu: EmulatorHandle) -> None:
    result = run_cli("modem", "info", "--port", vendor_emu.port)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for title in ("Identity", "SIM", "Signal", "Registration", "Operator"):
        assert title in lines
    assert any(line.split() == ["iccid", ICCID] for line in lines)
    assert any(line.split()[:1] == ["rssi"] and line.endswith("dBm") for line in lines)


def test_scan_lists_operators_with_status_and_act_names(emu: EmulatorHandle) -> None:
    emu.control("set_delays", cops_scan=0.2)
    emu.control("set_operator", name="Home Mobile", short="Home", mcc_mnc="23410")
    emu.control(
        "operators",
        operators=[
            {"name": "Home Mobile", "short": "Home", "mcc_mnc": "23410", "act": "lte"},
            {"name": "Rival Net", "short": "Rival", "mcc_mnc": "23415", "status": "forbidden"},
            # UCS2 hex, as modems that ignore +CSCS send names: "Orange"
            {
                "name": "004F00720061006E00670065",
                "short": "Orange",
                "mcc_mnc": "23433",
                "status": "available",
                "act": "umts",
            },
        ],
    )
    result = run_cli("modem", "scan", "--port", emu.port, "--json", "--timeout", "10")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert set(data) == {"operators"}
    by_numeric = {op["numeric"]: op for op in data["operators"]}
    assert set(by_numeric) == {"23410", "23415", "23433"}
    assert by_numeric["23410"] == {
        "long": "Home Mobile",
        "short": "Home",
        "numeric": "23410",
        "status": "current",
        "act": "lte",
    }
    assert by_numeric["23415"]["status"] == "forbidden"
    assert by_numeric["23433"]["long"] == "Orange"
    assert by_numeric["23433"]["status"] == "available"
    assert by_numeric["23433"]["act"] == "umts"


def test_scan_in_ucs2_charset_decodes_names(emu: EmulatorHandle) -> None:
    emu.control("set_delays", cops_scan=0.2)
    emu.control(
        "operators",
        operators=[{"name": "00540065006C00E9", "short": "Tele", "mcc_mnc": "20801"}],
    )
    with PortReader(emu.port) as port:
        assert "OK" in port.command('AT+CSCS="UCS2"')
    result = run_cli("modem", "scan", "--port", emu.port, "--json", "--timeout", "10")
    assert result.returncode == 0, result.stderr
    names = {op["numeric"]: op["long"] for op in json.loads(result.stdout)["operators"]}
    assert names["20801"] == "Telé"


def test_scan_human_output_is_a_table(emu: EmulatorHandle) -> None:
    emu.control("set_delays", cops_scan=0.2)
    emu.control(
        "operators", operators=[{"name": "Rival Net", "short": "Rival", "mcc_mnc": "23415"}]
    )
    result = run_cli("modem", "scan", "--port", emu.port, "--timeout", "10")
    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.splitlines()
    assert header.split() == ["LONG", "SHORT", "NUMERIC", "STATUS", "ACT"]
    assert any("Rival Net" in row and "23415" in row for row in rows)


@pytest.mark.parametrize(("sim", "state"), [("absent", "absent"), ("pin", "sim-pin")])
def test_sim_absent_or_locked_is_reported_not_fatal(
    emu: EmulatorHandle, sim: str, state: str
) -> None:
    emu.control("sim", state=sim)
    data = info_json(emu.port)
    assert data["sim"]["state"] == state
    if sim == "absent":
        assert data["sim"]["iccid"] is None
    assert data["identity"]["imei"] is not None


@pytest.mark.parametrize("state", ["denied", "searching", "roaming", "not_registered"])
def test_registration_states(emu: EmulatorHandle, state: str) -> None:
    emu.control("set_registration", state=state, act="lte")
    data = info_json(emu.port)
    assert data["registration"]["state"] == state
    if state == "roaming":
        assert data["operator"]["mcc_mnc"] == emu.status()["operator"]["mcc_mnc"]
    else:
        assert data["operator"] == {"name": None, "mcc_mnc": None}


def test_rejected_commands_leave_fields_null(tmp_path: Path) -> None:
    scenario = tmp_path / "rejecting.toml"
    scenario.write_text(
        "[[modem]]\n"
        'vendor = "generic"\n'
        "[modem.replies]\n"
        '"AT+CGMR" = "\\nERROR\\n"\n'
        '"AT+CESQ" = "\\n+CME ERROR: 100\\n"\n'
        '"AT+CCID" = "\\nERROR\\n"\n',
        encoding="utf-8",
    )
    with start_emulator("--scenario", str(scenario), "--fast") as emu:
        data = info_json(emu.port)
        assert data["identity"]["revision"] is None
        assert data["identity"]["model"] == "EMU-LTE"
        assert data["signal"]["rsrp_dbm"] is None
        assert data["signal"]["rssi_dbm"] == emu.status()["signal"]["rssi_dbm"]
        # generic falls back from AT+CCID to the other ICCID commands; none answers here
        assert data["sim"] == {"state": "ready", "iccid": None}
        assert data["registration"]["state"] == "home"


def assert_one_line_error(result: subprocess.CompletedProcess[str], port: str) -> str:
    assert result.returncode != 0
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert port in lines[0]
    return lines[0]


def test_unplug_during_a_command_is_one_line_naming_the_port(emu: EmulatorHandle) -> None:
    before = emu.status()["commands"]
    emu.control("fault", kind="slow", delay=30)
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent", "modem", "info", "--port", emu.port],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # the CLI has the port open and its first AT is waiting for the slow reply
        wait_for(lambda: emu.status()["commands"] > before, timeout=15.0)
        emu.control("unplug")
        out, err = proc.communicate(timeout=15.0)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    assert_one_line_error(result, emu.port)


def test_unplugged_port_is_one_line_naming_the_port(emu: EmulatorHandle) -> None:
    # the stable link, not /dev/pts/N: another process may be handed that pty number at once
    link = emu.modem()["link"]
    assert info_json(link)["sim"]["state"] == "ready"
    emu.control("unplug")
    wait_for(lambda: not os.path.lexists(link))
    for command in ("info", "scan"):
        line = assert_one_line_error(run_cli("modem", command, "--port", link), link)
        assert "no such file" in line.lower()


def test_missing_port_is_one_line_naming_the_port(tmp_path: Path) -> None:
    port = str(tmp_path / "ttyUSB9")
    line = assert_one_line_error(run_cli("modem", "info", "--port", port), port)
    assert "no such file" in line.lower()


def test_port_held_by_another_process_is_in_use(emu: EmulatorHandle) -> None:
    with serial.Serial(emu.port, timeout=0, exclusive=True):
        started = time.monotonic()
        result = run_cli("modem", "info", "--port", emu.port)
        line = assert_one_line_error(result, emu.port)
        assert "in use" in line
        assert time.monotonic() - started < 10.0
    # once released, the same port works
    assert info_json(emu.port)["sim"]["state"] == "ready"
