"""ModemManager detection and inhibition against a real dbus-daemon and a small fake ModemManager."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

from agent.check.system import modemmanager_item
from agent.config import Config, ModemConfig, parse_config
from agent.daemon.session import ModemSession
from agent.euicc.lpa import Lpa
from agent.modem.finder import Finder
from agent.transport.modemmanager import (
    MM_NAME,
    ModemManagerError,
    ignored_by_modemmanager,
    inhibited,
    modemmanager_running,
)
from hw_fixtures.testing import start_emulator
from hw_fixtures.udev_feed import EmulatorDeviceSource

UID = "/sys/devices/pci0000:00/0000:00:14.0/usb1/1-4"


@pytest.fixture
def bus_address() -> Iterator[str]:
    exe = shutil.which("dbus-daemon")
    if exe is None:
        pytest.skip("dbus-daemon is not installed (Debian package dbus)")
    proc = subprocess.Popen(
        [exe, "--session", "--nofork", "--print-address=1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    address = proc.stdout.readline().decode().strip()
    try:
        assert address.startswith("unix:"), address
        yield address
    finally:
        proc.terminate()
        proc.wait(10)


class FakeModemManager:
    """Owns org.freedesktop.ModemManager1; InhibitDevice as ModemManager does it, per caller."""

    def __init__(self, bus: MessageBus) -> None:
        self.bus = bus
        self.inhibitions: dict[str, str] = {}  # uid -> unique name of the caller
        self.changed = asyncio.Event()

    def _changed(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    def handle(self, msg: Message) -> Message | bool | None:
        if msg.message_type == MessageType.SIGNAL and msg.member == "NameOwnerChanged":
            name, _old, new = msg.body
            if not new:
                # the caller's connection went away: ModemManager drops its inhibitions
                gone = [u for u, s in self.inhibitions.items() if s == name]
                for uid in gone:
                    del self.inhibitions[uid]
                if gone:
                    self._changed()
            return None
        if msg.message_type != MessageType.METHOD_CALL or msg.member != "InhibitDevice":
            return None
        uid, inhibit = msg.body
        if not uid.startswith("/sys/"):
            return Message.new_error(
                msg, "org.freedesktop.ModemManager1.Error.Core.NotFound", "no such device"
            )
        if inhibit:
            self.inhibitions[uid] = str(msg.sender)
        else:
            self.inhibitions.pop(uid, None)
        self._changed()
        return Message.new_method_return(msg)


@pytest.fixture
async def fake_mm(bus_address: str) -> AsyncIterator[FakeModemManager]:
    bus = await MessageBus(bus_address=bus_address).connect()
    fake = FakeModemManager(bus)
    bus.add_message_handler(fake.handle)
    await bus.call(
        Message(
            destination="org.freedesktop.DBus",
            path="/org/freedesktop/DBus",
            interface="org.freedesktop.DBus",
            member="AddMatch",
            signature="s",
            body=["type='signal',interface='org.freedesktop.DBus',member='NameOwnerChanged'"],
        )
    )
    await bus.request_name(MM_NAME)
    try:
        yield fake
    finally:
        bus.disconnect()


async def test_no_bus_is_unknown_not_an_error(tmp_path: os.PathLike[str]) -> None:
    assert await modemmanager_running(1.0, bus_address=f"unix:path={tmp_path}/none") is None


async def test_bus_without_modemmanager_says_not_running(bus_address: str) -> None:
    assert await modemmanager_running(5.0, bus_address=bus_address) is False


async def test_running_modemmanager_is_seen(fake_mm: FakeModemManager, bus_address: str) -> None:
    assert await modemmanager_running(5.0, bus_address=bus_address) is True


async def test_inhibited_for_the_block_and_released_after(
    fake_mm: FakeModemManager, bus_address: str
) -> None:
    async with inhibited(UID, bus_address=bus_address):
        assert UID in fake_mm.inhibitions
    assert fake_mm.inhibitions == {}


async def test_inhibition_refused_is_a_typed_error(
    fake_mm: FakeModemManager, bus_address: str
) -> None:
    with pytest.raises(ModemManagerError, match="NotFound"):
        async with inhibited("/not/a/sysfs/path", bus_address=bus_address):
            pass


CRASHER = """
import asyncio, sys
from agent.transport.modemmanager import inhibited

async def main():
    async with inhibited(sys.argv[2], bus_address=sys.argv[1]):
        print("inhibited", flush=True)
        await asyncio.sleep(3600)

asyncio.run(main())
"""


async def test_a_crash_inside_the_block_releases_the_modem(
    fake_mm: FakeModemManager, bus_address: str
) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CRASHER, bus_address, UID, stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    try:

        async def said_inhibited() -> None:
            assert proc.stdout is not None
            while (line := await proc.stdout.readline()).strip() != b"inhibited":
                assert line, "the child ended before inhibiting"

        await asyncio.wait_for(said_inhibited(), 20)
        assert UID in fake_mm.inhibitions
        released = fake_mm.changed
        proc.send_signal(signal.SIGKILL)  # no finally block runs: only the bus can release it
        await asyncio.wait_for(released.wait(), 20)
        assert fake_mm.inhibitions == {}
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


SHARED = """
[[modem]]
id = "m0"
vendor = "quectel"
imei = "867698040000005"
"""


async def test_shared_modem_is_inhibited_around_euicc_work_only(
    fake_mm: FakeModemManager, bus_address: str, tmp_path: Path
) -> None:
    scenario = tmp_path / "shared.toml"
    scenario.write_text(SHARED)
    emu = await asyncio.to_thread(
        start_emulator, "--scenario", str(scenario), "--fast", "--log-level", "warning"
    )
    finder = Finder(EmulatorDeviceSource(emu.control_path))
    online = asyncio.Event()
    cfg = ModemConfig(id="m0", imei="867698040000005", share_with_modemmanager=True)
    session = ModemSession(
        cfg,
        state_dir=tmp_path,
        on_update=lambda s: online.set() if s.online else None,
        finder=finder,
        dbus_address=bus_address,
    )
    await finder.start()
    task = asyncio.create_task(session.run())
    try:
        await asyncio.wait_for(online.wait(), 30)
        assert session.device is not None
        uid = session.device.uid
        assert fake_mm.inhibitions == {}  # polling does not inhibit

        seen: dict[str, str] = {}

        async def op(lpa: Lpa) -> object:
            seen.update(fake_mm.inhibitions)
            return await lpa.get_eid()

        eid = await session.with_lpa(op)
        assert eid == session.eid
        assert uid in seen  # inhibited while the eUICC was being worked on
        assert fake_mm.inhibitions == {}  # and released afterwards
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        if session.modem is not None:
            await session.modem.close()
        await finder.stop()
        await asyncio.to_thread(emu.stop)


# ------------------------------------------------------------------ the pre-travel check item


def _cfg(shared: bool) -> Config:
    return parse_config(
        {
            "device_id": "t",
            "modems": [{"id": "m0", "port": "/dev/null", "share_with_modemmanager": shared}],
            "layers": [
                {
                    "name": "primary",
                    "role": "primary",
                    "modem": "m0",
                    "profile": "8944000000000000011",
                }
            ],
        }
    )


async def test_check_passes_without_a_bus_or_without_modemmanager(
    tmp_path: os.PathLike[str], bus_address: str
) -> None:
    no_bus = await modemmanager_item(
        _cfg(False), {"m0": "/dev/pts/0"}, bus_address=f"unix:path={tmp_path}/none"
    )
    assert (no_bus.status, "D-Bus" in no_bus.detail) == ("pass", True)
    idle = await modemmanager_item(_cfg(False), {"m0": "/dev/pts/0"}, bus_address=bus_address)
    assert (idle.status, idle.detail) == ("pass", "ModemManager is not running")


async def test_check_fails_when_modemmanager_may_take_a_port(
    fake_mm: FakeModemManager, bus_address: str
) -> None:
    ports: dict[str, str | None] = {"m0": "/dev/pts/0"}
    exposed = await modemmanager_item(_cfg(False), ports, bus_address=bus_address)
    assert exposed.status == "fail"
    assert "m0 (/dev/pts/0)" in exposed.detail
    assert exposed.fix is not None
    assert "70-esim-agent.rules" in exposed.fix
    ruled = await modemmanager_item(
        _cfg(False), ports, bus_address=bus_address, ignored=lambda port: True
    )
    assert ruled.status == "pass"
    shared = await modemmanager_item(_cfg(True), ports, bus_address=bus_address)
    assert shared.status == "pass"
    assert "m0 shared" in shared.detail


def test_a_port_udev_does_not_know_is_not_ignored() -> None:
    assert ignored_by_modemmanager("/dev/null") is False
    assert ignored_by_modemmanager("/nonexistent/port") is False
