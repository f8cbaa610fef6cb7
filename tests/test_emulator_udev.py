"""The emulator's modems seen through the fake udev feed: discovery, IMEI probing, unplug/replug."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.modem.finder import Finder, ProbeSkipped, probe_identity
from agent.transport.discovery import MatchSpec, group
from agent.transport.udev import DeviceEvent
from hw_fixtures.testing import EmulatorHandle, start_emulator
from hw_fixtures.udev_feed import EmulatorDeviceSource

SCENARIO = """
[[modem]]
id = "q"
vendor = "quectel"
imei = "867698040000005"
netdev = "wwan-emu0"

[[modem]]
id = "g"
vendor = "generic"
imei = "356938035643809"
usb_interface = "03"
"""


@pytest.fixture
def emu(tmp_path: Path) -> Iterator[EmulatorHandle]:
    scenario = tmp_path / "two.toml"
    scenario.write_text(SCENARIO)
    with start_emulator("--scenario", str(scenario), "--fast", "--log-level", "warning") as handle:
        yield handle


async def test_emulated_modems_look_like_usb_modems(emu: EmulatorHandle) -> None:
    source = EmulatorDeviceSource(emu.control_path)
    try:
        modems = group(await source.enumerate())
    finally:
        await source.close()
    by_vendor = {m.vendor: m for m in modems}
    quectel, generic = by_vendor["2c7c"], by_vendor["1209"]
    assert [p.path for p in quectel.ports] == [emu.modem("q")["port"]]
    assert quectel.ports[0].role == "at_primary"  # interface 02 of an EC25
    assert quectel.ports[0].links == (emu.modem("q")["link"],)
    assert quectel.netdev == "wwan-emu0"
    assert generic.ports[0].interface == "03"
    assert generic.ports[0].role == "unknown"  # nothing says what it is: it gets probed


async def test_probe_reads_the_imei_and_skips_a_held_port(emu: EmulatorHandle) -> None:
    port = emu.modem("g")["port"]
    # the emulator drives the pty's master side: it is the device end, not another user
    assert (await probe_identity(port)).imei == "356938035643809"
    fd = os.open(port, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    try:
        with pytest.raises(ProbeSkipped, match=f"is open in pid {os.getpid()}"):
            await probe_identity(port)
    finally:
        os.close(fd)


async def test_imei_found_then_followed_across_unplug_and_replug(emu: EmulatorHandle) -> None:
    finder = Finder(EmulatorDeviceSource(emu.control_path))
    await finder.start()
    removed: list[str] = []
    finder.on_port_removed(removed.append)
    spec = MatchSpec("m0", imei="356938035643809")
    try:
        first = await finder.locate(spec)
        assert first.port == emu.modem("g")["port"]
        changed = asyncio.ensure_future(finder.wait_change(10.0))
        await asyncio.to_thread(emu.control, "unplug", modem="g")
        assert await changed
        assert removed == [first.port]
        # another pty is taken first so the modem cannot come back on the same number
        other = await asyncio.to_thread(emu.control, "unplug", modem="q")
        assert other["plugged"] is False
        new_port = (await asyncio.to_thread(emu.control, "replug", modem="g"))["port"]
        async with asyncio.timeout(10.0):
            while finder.device_for_port(new_port) is None:  # usb device first, then its tty
                await finder.wait_change(10.0)
        again = await finder.locate(spec)
        assert again.port == emu.status("g")["port"]
        assert again.device is not None
        assert again.device.key == first.device.key if first.device else False
    finally:
        await finder.stop()


async def test_feed_events_arrive_in_kernel_order(emu: EmulatorHandle) -> None:
    source = EmulatorDeviceSource(emu.control_path)
    await source.enumerate()
    events: list[DeviceEvent] = []

    async def collect() -> None:
        async for ev in source.events():
            events.append(ev)
            if len(events) == 6:
                return

    task = asyncio.ensure_future(collect())
    await asyncio.to_thread(emu.control, "unplug", modem="q")
    await asyncio.to_thread(emu.control, "replug", modem="q")
    await asyncio.wait_for(task, 10.0)
    await source.close()
    assert [(e.action, e.device.subsystem) for e in events] == [
        ("remove", "net"),
        ("remove", "tty"),
        ("remove", "usb"),
        ("add", "usb"),
        ("add", "tty"),
        ("add", "net"),
    ]
