"""Leaked eUICC logical channels are closed, and the channel record cannot be planted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import structlog

from agent.errors import AtError
from agent.euicc.lpa import Lpa
from agent.euicc.transport import (
    ISD_R_AID,
    AtApduTransport,
    _swept_ports,
    default_state_dir,
)
from agent.modem.driver import Modem, open_modem
from hw_fixtures.testing import EmulatorHandle, PortReader, start_emulator

HOME = "8944476500001224158"
TRAVEL = "89012345678901234567"
CCHO = f'AT+CCHO="{ISD_R_AID.hex().upper()}"'
CSIM_OPEN = 'AT+CSIM=10,"0070000001"'


def emulator(vendor: str = "generic") -> EmulatorHandle:
    return start_emulator(
        "--vendor",
        vendor,
        "--fast",
        "--log-level",
        "warning",
        "--profile",
        f"{HOME}:Home:enabled",
        "--profile",
        f"{TRAVEL}:Travel",
    )


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    code = "import sys; from agent.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )


async def fill_card(modem: Modem, vendor: str) -> int:
    """Open channels the way a process that died mid-open leaves them, until the card refuses."""
    leaked = 0
    for _ in range(4):
        try:
            reply = await modem.channel.command(CSIM_OPEN if vendor == "dell" else CCHO)
        except AtError:
            break
        if vendor == "dell" and reply.lines[0].strip('"').endswith("6A81"):
            break
        leaked += 1
    return leaked


@pytest.mark.parametrize("vendor", ["generic", "sierra", "dell"])
async def test_open_closes_stale_channels_when_the_card_has_none_free(
    vendor: str, tmp_path: Path
) -> None:
    with emulator(vendor) as emu:
        async with open_modem(emu.port) as modem:
            _swept_ports.add(modem.port)  # this process has started already: no start sweep
            leaked = await fill_card(modem, vendor)
            with structlog.testing.capture_logs() as logs:
                async with Lpa(
                    AtApduTransport(modem.channel, modem.port, state_dir=tmp_path)
                ) as lpa:
                    profiles = await lpa.list_profiles()
    events = [e["event"] for e in logs]
    assert leaked == 3
    assert [p.iccid for p in profiles] == [HOME, TRAVEL]
    assert "euicc_channels_exhausted" in events
    closed = next(e for e in logs if e["event"] == "euicc_stale_channels_closed")
    assert closed["log_level"] == "warning"
    assert closed["reason"] == "exhausted"


def test_a_new_process_closes_channels_a_dead_one_left(tmp_path: Path) -> None:
    """Two channels opened by a run that died during AT+CCHO: the next run closes them."""
    with emulator() as emu:
        with PortReader(emu.port) as port:
            for _ in range(2):
                assert "+CCHO:" in port.command(CCHO)
        assert len(emu.status()["sessions"]) == 2
        env = {**os.environ, "XDG_RUNTIME_DIR": str(tmp_path)}
        result = cli("profile", "list", "--port", emu.port, "--json", env=env)
        sessions = emu.status()["sessions"]
    assert result.returncode == 0, result.stderr
    assert [p["iccid"] for p in json.loads(result.stdout)["profiles"]] == [HOME, TRAVEL]
    assert sessions == {}


def test_record_lives_in_a_private_directory_without_xdg_runtime_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    state = default_state_dir()
    assert state == tmp_path / ".local" / "state" / "esim-agent"
    assert not str(state).startswith("/tmp/esim-agent")


async def test_a_planted_record_never_reaches_an_at_command(tmp_path: Path) -> None:
    """A record naming `1;+CFUN=0` as its session must not turn the radio off."""
    with emulator() as emu:
        async with open_modem(emu.port) as modem:
            safe = modem.port.strip("/").replace("/", "_")
            record = tmp_path / f"euicc-{safe}.json"
            record.write_text(json.dumps({"mode": "cgla", "session": "1;+CFUN=0"}))
            with structlog.testing.capture_logs() as logs:
                async with Lpa(
                    AtApduTransport(modem.channel, modem.port, state_dir=tmp_path)
                ) as lpa:
                    await lpa.list_profiles()
        status = emu.status()
    assert status["cfun"] == 1
    assert "euicc_channel_record_invalid" in [e["event"] for e in logs]


async def test_a_record_in_a_directory_others_can_write_is_ignored(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    with emulator("sierra") as emu:
        async with open_modem(emu.port) as modem:
            safe = modem.port.strip("/").replace("/", "_")
            (shared / f"euicc-{safe}.json").write_text(
                json.dumps({"mode": "cgla", "session": "2", "cchc": "missing"})
            )
            with structlog.testing.capture_logs() as logs:
                t = AtApduTransport(modem.channel, modem.port, state_dir=shared)
                async with Lpa(t) as lpa:
                    await lpa.list_profiles()
    assert ("euicc_channel_record_unsafe", "directory") in [
        (e["event"], e.get("reason")) for e in logs
    ]
    # Nothing is written there either.
    assert json.loads((shared / f"euicc-{safe}.json").read_text())["session"] == "2"
