"""The LPA over AT against the emulated modem: dialects, CSIM fallback, channel hygiene, switch."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from agent.errors import Es10Error
from agent.euicc.lpa import Lpa
from agent.euicc.switch import RefreshStrategy, SafeSwitch
from agent.euicc.transport import MODE_CGLA, MODE_CSIM, AtApduTransport
from agent.modem.driver import Modem, open_modem
from hw_fixtures.testing import EmulatorHandle, PortReader, start_emulator

HOME = "8944476500001224158"
TRAVEL = "89012345678901234567"
SPARE = "8933011122223333444"
PROFILES = (
    "--profile",
    f"{HOME}:Home:enabled",
    "--profile",
    f"{TRAVEL}:Travel",
    "--profile",
    f"{SPARE}:Spare",
)


def emulator(vendor: str = "generic") -> EmulatorHandle:
    return start_emulator("--vendor", vendor, "--fast", "--log-level", "warning", *PROFILES)


@pytest.fixture
def emu() -> Iterator[EmulatorHandle]:
    with emulator() as handle:
        yield handle


def transport(modem: Modem, state_dir: Path, mode: str | None = None) -> AtApduTransport:
    return AtApduTransport(modem.channel, modem.port, state_dir=state_dir, mode=mode)


@pytest.mark.parametrize(
    ("vendor", "expected_mode"),
    [
        ("generic", MODE_CGLA),
        ("sierra", MODE_CGLA),  # opaque hex session ids, no CCHC
        ("fibocom", MODE_CGLA),  # bare session id line, rejects =?
        ("simcom", MODE_CGLA),  # no space after the colon
        ("quectel", MODE_CGLA),
        ("dell", MODE_CSIM),  # no CCHO at all: MANAGE CHANNEL over AT+CSIM
    ],
)
async def test_every_dialect_lists_profiles(
    vendor: str, expected_mode: str, tmp_path: Path
) -> None:
    with emulator(vendor) as emu:
        async with open_modem(emu.port) as modem:
            t = transport(modem, tmp_path)
            async with Lpa(t) as lpa:
                eid = await lpa.get_eid()
                profiles = await lpa.list_profiles()
            mode = t.mode
        sessions = emu.status()["sessions"]
    assert eid == emu.modem()["eid"]
    assert mode == expected_mode
    assert [(p.iccid, p.state) for p in profiles] == [
        (HOME, "enabled"),
        (TRAVEL, "disabled"),
        (SPARE, "disabled"),
    ]
    if vendor != "sierra":  # Sierra has no CCHC: the channel stays until the card resets
        assert sessions == {}


async def test_every_es10_command_over_at(emu: EmulatorHandle, tmp_path: Path) -> None:
    async with open_modem(emu.port) as modem:
        async with Lpa(transport(modem, tmp_path)) as lpa:
            info = await lpa.info()
            await lpa.set_nickname(TRAVEL, "abroad")
            await lpa.delete_profile(SPARE)
            assert await lpa.enable_profile(TRAVEL) is True
        async with Lpa(transport(modem, tmp_path)) as lpa:
            profiles = {p.iccid: p for p in await lpa.list_profiles()}
            await lpa.disable_profile(TRAVEL)
            await lpa.enable_profile(HOME)
            notes = await lpa.list_notifications()
            pending = await lpa.retrieve_notifications()
            await lpa.remove_notification(notes[0].seq_number)
            left = await lpa.list_notifications()
            with pytest.raises(Es10Error) as err:
                await lpa.enable_profile(SPARE)
    assert info.eid == emu.modem()["eid"]
    assert info.free_nvm is not None
    assert info.svn is not None
    assert set(profiles) == {HOME, TRAVEL}
    assert profiles[TRAVEL].nickname == "abroad"
    assert profiles[TRAVEL].state == "enabled"
    assert [n.profile_management_operation for n in notes] == [
        "delete",
        "disable",
        "enable",
        "disable",
        "enable",
    ]
    assert [n.seq_number for n in notes] == sorted(n.seq_number for n in notes)
    assert len(pending) == len(notes)
    assert [n.seq_number for n in left] == [n.seq_number for n in notes[1:]]
    assert err.value.reason == "iccidOrAidNotFound"
    assert emu.status()["sessions"] == {}


async def test_cgla_refused_falls_back_to_csim_and_is_remembered(tmp_path: Path) -> None:
    with emulator("dell") as emu:
        async with open_modem(emu.port) as modem:
            first = transport(modem, tmp_path)
            async with Lpa(first) as lpa:
                await lpa.get_eid()
            second = transport(modem, tmp_path)
            async with Lpa(second) as lpa:
                await lpa.list_profiles()
            history = emu.status()["history"]
    assert (first.mode, second.mode) == (MODE_CSIM, MODE_CSIM)
    ccho_tries = [c for c in history if "CCHO" in str(c).upper()]
    assert len(ccho_tries) == 1, "the second session should not probe CCHO again"


async def test_channel_closed_on_error_and_cancellation(
    emu: EmulatorHandle, tmp_path: Path
) -> None:
    async with open_modem(emu.port) as modem:
        with pytest.raises(Es10Error):
            async with Lpa(transport(modem, tmp_path)) as lpa:
                await lpa.disable_profile(TRAVEL)
        assert emu.status()["sessions"] == {}

        started = asyncio.Event()

        async def slow_listing() -> None:
            async with Lpa(transport(modem, tmp_path)) as lpa:
                started.set()
                while True:
                    await lpa.list_profiles()

        task = asyncio.create_task(slow_listing())
        async with asyncio.timeout(10):
            await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # the modem's channel must be usable and the card's channel closed
        async with Lpa(transport(modem, tmp_path)) as lpa:
            assert len(await lpa.list_profiles()) == 3
    assert emu.status()["sessions"] == {}


async def test_channel_left_by_a_crashed_run_is_closed(emu: EmulatorHandle, tmp_path: Path) -> None:
    async with open_modem(emu.port) as modem:
        # A run that dies without closing: three of them would use every channel the card has.
        for _ in range(5):
            crashed = transport(modem, tmp_path)
            await crashed.open()
            assert len(emu.status()["sessions"]) == 1
        async with Lpa(transport(modem, tmp_path)) as lpa:
            assert await lpa.get_eid() == emu.modem()["eid"]
    assert emu.status()["sessions"] == {}


def tcp_probe(port: int) -> Callable[[], Awaitable[bool]]:
    """A data-path probe: the emulator's TCP endpoint accepts only while the path is up."""

    async def probe() -> bool:
        try:
            async with asyncio.timeout(2.0):
                _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except (OSError, TimeoutError):
            return False
        writer.close()
        await writer.wait_closed()
        return True

    return probe


async def test_modem_without_cchc_reuses_its_channel(tmp_path: Path) -> None:
    """Sierra EM9191 has no AT+CCHC: every run leaking a channel would exhaust the card."""
    with emulator("sierra") as emu:
        async with open_modem(emu.port) as modem:
            sessions = set()
            for _ in range(6):
                t = transport(modem, tmp_path)
                async with Lpa(t) as lpa:
                    assert len(await lpa.list_profiles()) == 3
                    sessions.add(t.session)
        open_on_card = emu.status()["sessions"]
    assert len(sessions) == 1
    assert len(open_on_card) == 1


async def test_safe_switch_to_a_working_profile(emu: EmulatorHandle, tmp_path: Path) -> None:
    probe = tcp_probe(emu.modem()["tcp_port"])
    async with open_modem(emu.port) as modem:
        switch = SafeSwitch(
            modem,
            lambda: Lpa(transport(modem, tmp_path)),
            rollback_timeout=10,
            poll_s=0.05,
            probe=probe,
        )
        report = await switch.run(TRAVEL)
    status = emu.status()
    assert report.outcome == "switched", report.error
    assert (report.from_iccid, report.to_iccid) == (HOME, TRAVEL)
    assert report.phases.enable is not None
    assert report.phases.reattach is not None
    assert report.phases.rollback is None
    assert status["iccid"] == TRAVEL
    assert status["registration"]["state"] in ("home", "roaming")


@pytest.mark.parametrize(
    ("vendor", "strategy"),
    [
        ("generic", RefreshStrategy.REFRESH),
        ("sierra", RefreshStrategy.CFUN),
        ("quectel", RefreshStrategy.CFUN),
        ("dell", RefreshStrategy.RESET),
    ],
)
async def test_safe_switch_rolls_back_from_a_broken_profile(
    vendor: str, strategy: RefreshStrategy, tmp_path: Path
) -> None:
    with emulator(vendor) as emu:
        emu.control("profile", op="broken", iccid=TRAVEL)
        async with open_modem(emu.port) as modem:
            switch = SafeSwitch(
                modem,
                lambda: Lpa(transport(modem, tmp_path)),
                strategy=strategy,
                rollback_timeout=3.0,
                poll_s=0.05,
            )
            report = await switch.run(TRAVEL)
            reg = await modem.wait_registered(5.0, poll_s=0.1)
        status = emu.status()
        cards = emu.control("profile")["profiles"]
    assert report.outcome == "rolled_back", report.error
    assert report.error
    assert report.phases.rollback is not None
    assert status["iccid"] == HOME
    assert reg.state in ("home", "roaming")
    assert [p["enabled"] for p in cards] == [True, False, False]
    assert "reattach" in (report.error or "")


async def test_failed_data_probe_rolls_back(emu: EmulatorHandle, tmp_path: Path) -> None:
    emu.control("link", state="down")
    probe = tcp_probe(emu.modem()["tcp_port"])
    async with open_modem(emu.port) as modem:
        switch = SafeSwitch(
            modem,
            lambda: Lpa(transport(modem, tmp_path)),
            rollback_timeout=5,
            poll_s=0.05,
            probe=probe,
        )
        report = await switch.run(TRAVEL)
    assert report.outcome == "rolled_back"
    assert "probe" in (report.error or "")
    assert report.phases.reattach is not None
    assert report.phases.verify is None
    assert emu.status()["iccid"] == HOME


def test_emulated_card_speaks_27007_to_any_client(emu: EmulatorHandle) -> None:
    """What lpac and friends send: lower-case hex, CLA without channel bits, <cmd>\r\n."""
    with PortReader(emu.port) as port:
        opened = port.command('AT+CCHO="a0000005591010ffffffff8900000100"')
        session = opened.split("+CCHO:")[1].split()[0]
        reply = port.command(f'AT+CGLA={session},22,"80e2910006bf3e035c015a"')
        port.command(f"AT+CCHC={session}")
    line = next(x for x in reply.splitlines() if x.startswith("+CGLA"))
    length, hexs = line.split(":", 1)[1].strip().split(",")
    hexs = hexs.strip('"')
    assert int(length) == len(hexs)
    assert hexs == hexs.upper()
    assert hexs == "BF3E125A10" + emu.modem()["eid"] + "9000"
    assert emu.status()["sessions"] == {}


async def test_safe_switch_to_unknown_profile_changes_nothing(
    emu: EmulatorHandle, tmp_path: Path
) -> None:
    async with open_modem(emu.port) as modem:
        switch = SafeSwitch(modem, lambda: Lpa(transport(modem, tmp_path)), rollback_timeout=5)
        report = await switch.run("8900000000000000001")
    assert report.outcome == "failed"
    assert "iccidOrAidNotFound" in (report.error or "")
    assert emu.status()["iccid"] == HOME


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    code = "import sys; from agent.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_cli_commands(emu: EmulatorHandle) -> None:
    port = emu.port
    info = cli("euicc", "info", "--port", port, "--json")
    assert info.returncode == 0, info.stderr
    data = json.loads(info.stdout)
    for key in (
        "eid",
        "svn",
        "firmware_version",
        "free_nvm",
        "free_vm",
        "profile_version",
        "euicc_ci_pki_ids",
    ):
        assert key in data
    assert data["eid"] == emu.modem()["eid"]

    listing = cli("profile", "list", "--port", port, "--json")
    assert listing.returncode == 0, listing.stderr
    profiles = json.loads(listing.stdout)["profiles"]
    assert [p["iccid"] for p in profiles] == [HOME, TRAVEL, SPARE]
    assert set(profiles[0]) == {
        "iccid",
        "isdp_aid",
        "state",
        "nickname",
        "service_provider_name",
        "profile_name",
        "profile_class",
    }
    assert profiles[0]["state"] == "enabled"
    assert profiles[0]["profile_class"] == "operational"

    refused = cli("profile", "delete", SPARE, "--port", port)
    assert refused.returncode == 2
    assert "--yes" in refused.stderr
    enabled = cli("profile", "delete", HOME, "--port", port, "--yes")
    assert enabled.returncode == 1
    assert "enabled" in enabled.stderr
    assert len(enabled.stderr.strip().splitlines()) == 1
    assert cli("profile", "delete", SPARE, "--port", port, "--yes").returncode == 0
    assert cli("profile", "nickname", TRAVEL, "away", "--port", port).returncode == 0

    switched = cli(
        "profile", "enable", TRAVEL, "--port", port, "--json", "--safe", "--rollback-timeout", "10"
    )
    assert switched.returncode == 0, switched.stderr
    assert json.loads(switched.stdout)["outcome"] == "switched"

    notes = cli("notification", "list", "--port", port, "--json")
    items = json.loads(notes.stdout)["notifications"]
    assert [n["profile_management_operation"] for n in items] == ["delete", "disable", "enable"]
    assert set(items[0]) == {
        "seq_number",
        "profile_management_operation",
        "notification_address",
        "iccid",
    }
    removed = cli("notification", "remove", str(items[0]["seq_number"]), "--port", port)
    assert removed.returncode == 0, removed.stderr
    again = cli("notification", "remove", str(items[0]["seq_number"]), "--port", port)
    assert again.returncode == 1
    assert "nothingToDelete" in again.stderr
