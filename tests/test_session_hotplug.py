"""Modem sessions under hotplug: the emulator's modems seen through the fake udev feed.

Unplug mid-command fails at once (not after a timeout), a replug on another port number is
followed, a hung modem delays no other, and a switch whose reset re-enumerates the modem
finishes on the new port.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from agent.config import ModemConfig
from agent.daemon.session import ModemSession
from agent.modem.finder import Finder
from hw_fixtures.testing import EmulatorHandle, start_emulator
from hw_fixtures.udev_feed import EmulatorDeviceSource

STEP_S = 30.0

SCENARIO = """
[[modem]]
id = "a"
vendor = "quectel"
imei = "867698040000005"

[[modem]]
id = "b"
vendor = "dell"
imei = "356938035643809"
reenumerate_on_reset = true

[[modem.profiles]]
iccid = "8901260000000000001"
name = "One"
provider = "One"
operator_name = "One"
mcc_mnc = "00101"
enabled = true

[[modem.profiles]]
iccid = "8901260000000000002"
name = "Two"
provider = "Two"
operator_name = "Two"
mcc_mnc = "00102"
"""


@pytest.fixture
def emu(tmp_path: Path) -> Iterator[EmulatorHandle]:
    scenario = tmp_path / "hotplug.toml"
    scenario.write_text(SCENARIO)
    with start_emulator("--scenario", str(scenario), "--fast", "--log-level", "warning") as handle:
        yield handle


class Watch:
    """Session updates as an awaitable condition."""

    def __init__(self) -> None:
        self.changed = asyncio.Event()
        #: Why each session went offline, in order.
        self.offline: list[str] = []

    def __call__(self, session: ModemSession) -> None:
        if not session.online and session.last_error:
            self.offline.append(session.last_error)
        self.changed.set()

    async def until(self, check: Callable[[], bool], timeout: float = STEP_S) -> None:
        async with asyncio.timeout(timeout):
            while not check():
                self.changed.clear()
                await self.changed.wait()


@asynccontextmanager
async def sessions(
    emu: EmulatorHandle, tmp_path: Path, *cfgs: ModemConfig
) -> AsyncIterator[tuple[dict[str, ModemSession], Watch]]:
    finder = Finder(EmulatorDeviceSource(emu.control_path))
    await finder.start()
    watch = Watch()
    made = {c.id: ModemSession(c, state_dir=tmp_path, on_update=watch, finder=finder) for c in cfgs}
    tasks = [asyncio.create_task(s.run()) for s in made.values()]
    try:
        yield made, watch
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for s in made.values():
            if s.modem is not None:
                await s.modem.close()
        await finder.stop()


async def test_unplug_mid_command_goes_offline_at_once_and_replug_is_followed(
    emu: EmulatorHandle, tmp_path: Path
) -> None:
    cfg = ModemConfig(id="a", imei="867698040000005", poll_interval=0.2)
    async with sessions(emu, tmp_path, cfg) as (made, watch):
        a = made["a"]
        await watch.until(lambda: a.online)
        old = a.port
        assert old == emu.modem("a")["port"]
        # the modem stops answering: the next poll's command stays in flight
        await asyncio.to_thread(emu.control, "fault", modem="a", kind="hang")
        await asyncio.to_thread(emu.control, "unplug", modem="a")
        await watch.until(lambda: not a.online)
        first = watch.offline[0]
        assert "device removed" in first or "port closed" in first
        assert "stopped answering" not in first  # not a command timeout
        await asyncio.to_thread(emu.control, "clear", modem="a")
        new = (await asyncio.to_thread(emu.control, "replug", modem="a"))["port"]
        assert new != old
        await watch.until(lambda: a.online)
        assert a.port == new


async def test_a_hung_modem_delays_no_other(emu: EmulatorHandle, tmp_path: Path) -> None:
    await asyncio.to_thread(emu.control, "fault", modem="a", kind="hang")
    hung = ModemConfig(id="hung", imei="867698040000005")
    fine = ModemConfig(id="fine", imei="356938035643809")
    async with sessions(emu, tmp_path, hung, fine) as (made, watch):
        await watch.until(lambda: made["fine"].online)
        assert made["fine"].port == emu.modem("b")["port"]
        assert not made["hung"].online


async def test_switch_follows_a_modem_that_reenumerates_on_reset(
    emu: EmulatorHandle, tmp_path: Path
) -> None:
    cfg = ModemConfig(id="b", imei="356938035643809", poll_interval=0.5)
    async with sessions(emu, tmp_path, cfg) as (made, watch):
        b = made["b"]
        await watch.until(lambda: b.online and b.enabled_iccid == "8901260000000000001")
        old = b.port
        assert b.refresh_strategy().value == "reset"
        report = await asyncio.wait_for(b.safe_switch("8901260000000000002", None), STEP_S)
        assert report.outcome == "switched", report.error
        assert b.port != old
        assert b.port == emu.status("b")["port"]
        assert b.enabled_iccid == "8901260000000000002"
        assert b.online
