"""`esim-agent profile download` as a user runs it: the CLI in a subprocess, the emulated modem on
a real pty (every vendor personality), the test SM-DP+ over HTTPS with the test PKI. Failures
leave the card clean: no new profile, no open session on either side."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from agent.euicc.lpa import Lpa
from agent.euicc.transport import AtApduTransport
from agent.modem.driver import open_modem
from hw_fixtures.pki import TestPki
from hw_fixtures.smdp import Offer, SmdpCore, SmdpServer
from hw_fixtures.testing import EmulatorHandle, start_emulator

pytestmark = pytest.mark.e2e

HOME = "8944476500001224158"
NEW = "8988247000001234567"
CLI_TIMEOUT_S = 120.0


@pytest.fixture
async def smdp(test_pki: TestPki) -> AsyncIterator[SmdpServer]:
    server = SmdpServer(SmdpCore(pki=test_pki, address=test_pki.smdp_host))
    await server.start()
    server.core.address = f"{test_pki.smdp_host}:{server.port}"
    server.core.offer(Offer(matching_id="TRIP-1", iccid=NEW, name="Travel", provider="RoamCo"))
    yield server
    await server.stop()


def emulator(test_pki: TestPki, vendor: str = "generic") -> EmulatorHandle:
    assert test_pki.directory is not None
    return start_emulator(
        "--vendor",
        vendor,
        "--fast",
        "--log-level",
        "warning",
        "--pki",
        str(test_pki.directory),
        "--eid",
        test_pki.eid,
        "--profile",
        f"{HOME}:Home:enabled",
    )


@pytest.fixture
def emu(test_pki: TestPki) -> Iterator[EmulatorHandle]:
    with emulator(test_pki) as handle:
        yield handle


async def cli_download(
    test_pki: TestPki,
    smdp: SmdpServer,
    port: str,
    tmp_path: Path,
    *extra: str,
    matching_id: str = "TRIP-1",
) -> tuple[int, dict[str, object], str]:
    assert test_pki.directory is not None
    address = smdp.core.address
    code = "import sys; from agent.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        code,
        "profile",
        "download",
        "--port",
        port,
        "--code",
        f"LPA:1${address}${matching_id}",
        "--ci-cert",
        str(test_pki.directory / "ci.pem"),
        "--resolve",
        f"{address}:127.0.0.1",
        "--json",
        *extra,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={"XDG_RUNTIME_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    out, err = await asyncio.wait_for(proc.communicate(), CLI_TIMEOUT_S)
    assert proc.returncode is not None
    return proc.returncode, json.loads(out or b"{}"), err.decode()


async def card_state(port: str, tmp_path: Path) -> tuple[list[str], list[str | None]]:
    """(ICCIDs on the card, operations of the pending notifications), read over AT."""
    async with open_modem(port) as modem:
        lpa = Lpa(AtApduTransport(modem.channel, modem.port, state_dir=tmp_path))
        async with lpa:
            profiles = await lpa.list_profiles()
            notes = await lpa.list_notifications()
    return [p.iccid or "" for p in profiles], [n.profile_management_operation for n in notes]


@pytest.mark.parametrize("vendor", ["generic", "sierra", "fibocom", "simcom", "quectel", "dell"])
async def test_download_on_every_personality(
    vendor: str, test_pki: TestPki, smdp: SmdpServer, tmp_path: Path
) -> None:
    with emulator(test_pki, vendor) as emu:
        async with open_modem(emu.port) as modem:
            imei = (await modem.identity()).imei
        status, result, err = await cli_download(test_pki, smdp, emu.port, tmp_path)
        assert status == 0, err
        assert result["iccid"] == NEW
        assert result["profile_name"] == "Travel"
        assert result["notification_sent"] is True
        iccids, pending = await card_state(emu.port, tmp_path)
    assert iccids == [HOME, NEW]
    assert pending == []
    assert smdp.core.offers["TRIP-1"].state == "installed"
    assert smdp.core.device_tacs == [str(imei)[:8]], "deviceInfo carries the modem's TAC"


async def test_download_of_100_kb(
    emu: EmulatorHandle, test_pki: TestPki, smdp: SmdpServer, tmp_path: Path
) -> None:
    smdp.core.offers["TRIP-1"].size = 100_000
    status, result, err = await cli_download(test_pki, smdp, emu.port, tmp_path)
    assert status == 0, err
    assert isinstance(result["bpp_bytes"], int)
    assert result["bpp_bytes"] > 100_000


@pytest.mark.parametrize(
    "failure", ["wrong_confirmation_code", "expired", "already_downloaded", "server_error", "slow"]
)
async def test_failures_leave_the_card_clean(
    failure: str, emu: EmulatorHandle, test_pki: TestPki, smdp: SmdpServer, tmp_path: Path
) -> None:
    offer = smdp.core.offers["TRIP-1"]
    extra: list[str] = []
    if failure == "wrong_confirmation_code":
        offer.confirmation_code = "2468"
        extra = ["--confirmation-code", "1357"]
    elif failure == "expired":
        offer.expired = True
    elif failure == "already_downloaded":
        offer.state = "downloaded"
    elif failure == "server_error":
        offer.server_error = True
    else:
        smdp.core.delays["getBoundProfilePackage"] = 30.0
        extra = ["--timeout", "8"]
    status, result, _err = await cli_download(test_pki, smdp, emu.port, tmp_path, *extra)
    assert status == 1
    message = str(result["error"]["message"])  # type: ignore[index]
    expected = {
        "wrong_confirmation_code": "subject 8.2.7, reason 3.8",
        "expired": "subject 8.8.5, reason 4.10",
        "already_downloaded": "already downloaded",
        "server_error": "HTTP 500",
        "slow": "no result within",
    }[failure]
    assert expected in message, message
    iccids, pending = await card_state(emu.port, tmp_path)
    assert iccids == [HOME], "a profile was left behind"
    assert pending == []
    if failure in ("wrong_confirmation_code", "slow"):
        # The eUICC held a session: it was cancelled on the card and on the SM-DP+.
        assert len(smdp.core.cancelled) == 1


def test_bad_activation_code_is_a_usage_error(tmp_path: Path) -> None:
    import subprocess

    code = "import sys; from agent.cli import main; sys.exit(main(sys.argv[1:]))"
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            "profile",
            "download",
            "--port",
            "/dev/null",
            "--code",
            "LPA:2$x$y",
            "--ci-cert",
            "/nonexistent",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert json.loads(result.stdout)["error"]["code"] == "usage"


async def cli_notifications(
    test_pki: TestPki, smdp: SmdpServer, port: str, tmp_path: Path, *which: str
) -> tuple[int, dict[str, object]]:
    assert test_pki.directory is not None
    code = "import sys; from agent.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        code,
        "notification",
        "process",
        *which,
        "--port",
        port,
        "--ci-cert",
        str(test_pki.directory / "ci.pem"),
        "--resolve",
        f"{smdp.core.address}:127.0.0.1",
        # The emulated card's own profiles notify smdp.example.test:443, where nothing answers.
        "--resolve",
        "smdp.example.test:443:127.0.0.1",
        "--json",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={"XDG_RUNTIME_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    out, _err = await asyncio.wait_for(proc.communicate(), CLI_TIMEOUT_S)
    assert proc.returncode is not None
    return proc.returncode, json.loads(out or b"{}")


async def test_notification_process_removes_only_what_was_accepted(
    emu: EmulatorHandle, test_pki: TestPki, smdp: SmdpServer, tmp_path: Path
) -> None:
    status, _result, err = await cli_download(test_pki, smdp, emu.port, tmp_path)
    assert status == 0, err
    # Enable NEW (its notifications go to the test SM-DP+), which disables HOME (whose go to an
    # SM-DP+ that does not answer); then delete HOME.
    async with open_modem(emu.port) as modem:
        lpa = Lpa(AtApduTransport(modem.channel, modem.port, state_dir=tmp_path))
        async with lpa:
            await lpa.enable_profile(NEW, refresh=False)
            await lpa.delete_profile(HOME)
    before = len(smdp.core.notifications)
    status, result = await cli_notifications(test_pki, smdp, emu.port, tmp_path, "--all")
    assert status == 1, "not everything could be delivered"
    outcomes = {n["operation"]: n for n in result["notifications"]}  # type: ignore[attr-defined]
    assert outcomes["enable"]["removed"] is True
    assert outcomes["disable"]["removed"] is False
    assert outcomes["delete"]["removed"] is False
    assert outcomes["delete"]["error"]
    assert len(smdp.core.notifications) == before + 1
    assert smdp.core.notifications[-1]["verified"] is True, (
        "enable notification signed by the eUICC"
    )
    _iccids, pending = await card_state(emu.port, tmp_path)
    assert sorted(op or "" for op in pending) == ["delete", "disable"]
    # One by sequence number: the delete stays until its SM-DP+ takes it.
    seq = str(outcomes["delete"]["seq_number"])
    status, result = await cli_notifications(test_pki, smdp, emu.port, tmp_path, seq)
    assert status == 1
    _iccids, pending = await card_state(emu.port, tmp_path)
    assert "delete" in pending
