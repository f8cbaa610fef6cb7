"""Discovery and matching driven by recorded udev properties of real modem types (tests/fixtures/udev)."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

import pytest

from agent.config import ModemConfig, UsbMatch
from agent.daemon.devices import report
from agent.errors import PortGoneError
from agent.modem.finder import Finder, Identity, ProbeSkipped
from agent.transport.discovery import (
    MatchSpec,
    ModemDevice,
    group,
    match_all,
    match_entry,
    network_interface,
    usb_at_port,
)
from agent.transport.udev import FakeDeviceSource, UdevDevice, load_recording

FIXTURES = Path(__file__).parent / "fixtures" / "udev"
RECORDINGS = sorted(FIXTURES.glob("*.json"))


def _load(name: str) -> tuple[dict[str, Any], list[UdevDevice]]:
    return load_recording(FIXTURES / name)


def _all_devices() -> list[UdevDevice]:
    return [d for path in RECORDINGS for d in load_recording(path)[1]]


def test_every_recording_names_its_sources() -> None:
    assert len(RECORDINGS) >= 4
    for path in RECORDINGS:
        meta, devices = load_recording(path)
        assert meta["sources"], path.name
        assert devices, path.name


@pytest.mark.parametrize("path", RECORDINGS, ids=lambda p: p.stem)
def test_recording_groups_into_one_modem_with_roles_at_port_and_network_interface(
    path: Path,
) -> None:
    meta, devices = load_recording(path)
    expect = meta["expect"]
    [modem] = group(devices)
    assert (modem.vendor, modem.product, modem.bus) == (
        expect["vendor"],
        expect["product"],
        expect["bus"],
    )
    assert {p.path: p.role for p in modem.ports} == expect["roles"]
    assert modem.at_candidates()[0].path == expect["at_port"]
    assert modem.netdev == expect["netdev"]
    assert network_interface([modem], expect["at_port"]) == expect["netdev"]
    if "serial" in expect:
        assert modem.serial == expect["serial"]
    # GPS/NMEA, diagnostics and MBIM ports are never offered as AT candidates
    offered = {p.role for p in modem.at_candidates()}
    assert not offered & {"gps", "diag", "mbim", "qmi", "other"}


def test_all_recordings_together_stay_separate_modems() -> None:
    modems = group(_all_devices())
    assert sorted((m.vendor, m.product) for m in modems) == [
        ("1199", "9079"),
        ("14c3", "4d75"),
        ("1bc7", "1061"),
        ("2c7c", "0125"),
    ]


def test_pcie_modem_uid_is_its_pci_function_for_modemmanager() -> None:
    [modem] = group(_load("fibocom-fm350.json")[1])
    assert modem.uid == "/sys/devices/pci0000:00/0000:00:1c.0/0000:05:00.0"
    assert modem.model == "T7XX 5G modem"


def test_ttys_outside_any_usb_or_wwan_device_are_not_modems() -> None:
    serial = UdevDevice("tty", "/devices/platform/serial8250/tty/ttyS0", {"DEVNAME": "/dev/ttyS0"})
    pts = UdevDevice("tty", "/devices/virtual/tty/ptmx", {"DEVNAME": "/dev/ptmx"})
    assert group([serial, pts]) == []


# ---- matching ---------------------------------------------------------------------------------


@pytest.fixture
def modems() -> list[ModemDevice]:
    return group(_all_devices())


def test_usb_ids_choose_the_at_port_by_role_not_the_first_tty(modems: list[ModemDevice]) -> None:
    m = match_entry(MatchSpec("a", vendor="2c7c", product="0125"), modems, {})
    assert m.port == "/dev/ttyUSB2"  # interface 02, not ttyUSB0 (DM)
    assert m.device is not None
    assert m.device.netdev == "wwan0"


def test_usb_interface_selects_that_port(modems: list[ModemDevice]) -> None:
    m = match_entry(MatchSpec("a", vendor="1bc7", product="1061", interface="5"), modems, {})
    assert m.port == "/dev/ttyUSB2"
    m = match_entry(MatchSpec("a", vendor="1bc7", product="1061", interface="0x0a"), modems, {})
    assert m.port is None
    assert m.why is not None
    assert "interface 0a" in m.why


def test_usb_serial_must_match_when_given(modems: list[ModemDevice]) -> None:
    ok = match_entry(
        MatchSpec("a", vendor="1199", product="9079", serial="LF71234567031021"), modems, {}
    )
    assert ok.port == "/dev/ttyUSB2"
    wrong = match_entry(MatchSpec("a", vendor="1199", product="9079", serial="X"), modems, {})
    assert wrong.port is None
    assert wrong.why == "no device usb 1199:9079 serial X"


def test_port_by_id_symlink_matches_its_device(modems: list[ModemDevice]) -> None:
    link = "/dev/serial/by-id/usb-Quectel_EC25-if02-port0"
    m = match_entry(MatchSpec("a", port=link), modems, {})
    assert m.port == link
    assert m.device is not None
    assert m.device.vendor == "2c7c"


def test_port_that_does_not_exist_says_so(modems: list[ModemDevice]) -> None:
    m = match_entry(MatchSpec("a", port="/dev/esim-test-nothing"), modems, {})
    assert m.port is None
    assert m.why == "/dev/esim-test-nothing does not exist"


def test_imei_matches_the_port_that_answered_it(modems: list[ModemDevice]) -> None:
    imeis = {"/dev/wwan0at0": "356938035643809", "/dev/ttyUSB2": "867698040000005"}
    m = match_entry(MatchSpec("a", imei="356938035643809"), modems, imeis)
    assert m.port == "/dev/wwan0at0"
    assert m.device is not None
    assert m.device.bus == "pci"
    none = match_entry(MatchSpec("a", imei="111111111111111"), modems, imeis)
    assert none.port is None
    assert "IMEI 111111111111111" in (none.why or "")


def test_one_modem_is_never_given_to_two_entries(modems: list[ModemDevice]) -> None:
    specs = [
        MatchSpec("first", vendor="2c7c", product="0125"),
        MatchSpec("second", vendor="2c7c", product="0125"),
    ]
    result = match_all(specs, modems, {})
    assert result["first"].port == "/dev/ttyUSB2"
    assert result["second"].port is None
    assert "already first's" in (result["second"].why or "")


# ---- the live finder --------------------------------------------------------------------------


class FakeProber:
    """Answers for ports by table; records what was probed; a port can hang until released."""

    def __init__(self, answers: dict[str, Identity]) -> None:
        self.answers = answers
        self.probed: list[str] = []
        self.hang: set[str] = set()
        self.release = asyncio.Event()

    async def __call__(self, path: str) -> Identity:
        self.probed.append(path)
        if path in self.hang:
            await self.release.wait()
        if path not in self.answers:
            raise ProbeSkipped(f"{path}: no answer")
        return self.answers[path]


def _renumbered(devices: list[UdevDevice], old: str, new: str) -> list[UdevDevice]:
    """The same modem re-enumerated with its ttys under other numbers."""
    out = []
    for d in devices:
        props = {k: v.replace(old, new) for k, v in d.properties.items()}
        out.append(dataclasses.replace(d, devpath=d.devpath.replace(old, new), properties=props))
    return out


async def test_imei_locate_probes_only_candidate_ports_and_caches() -> None:
    source = FakeDeviceSource(_all_devices())
    prober = FakeProber(
        {
            "/dev/ttyUSB2": Identity(imei="867698040000005"),
            "/dev/ttyUSB1": Identity(imei="351234567890123"),
            "/dev/wwan0at0": Identity(imei="356938035643809"),
        }
    )
    finder = Finder(source, prober=prober)
    await finder.start()
    try:
        found = await finder.locate(MatchSpec("m0", imei="356938035643809"))
        assert found.port == "/dev/wwan0at0"
        assert found.netdev == "wwan0"
        for never in ("/dev/ttyUSB0", "/dev/wwan0mbim0"):
            assert never not in prober.probed  # diagnostics, MBIM: never probed
        count = len(prober.probed)
        assert (await finder.locate(MatchSpec("m0", imei="356938035643809"))).port == found.port
        assert len(prober.probed) == count  # cached
    finally:
        await finder.stop()


async def test_hung_port_does_not_delay_finding_another_modem() -> None:
    _, ec25 = _load("quectel-ec25.json")
    _, fm350 = _load("fibocom-fm350.json")
    prober = FakeProber(
        {"/dev/ttyUSB2": Identity(imei="867698040000005"), "/dev/wwan0at0": Identity(imei="1")}
    )
    prober.hang.add("/dev/ttyUSB2")
    finder = Finder(FakeDeviceSource([*ec25, *fm350]), prober=prober)
    await finder.start()
    try:
        # the EC25's AT port hangs; the FM350 is found all the same
        found = await finder.locate(MatchSpec("x", imei="1"))
        assert found.port == "/dev/wwan0at0"
        assert not prober.release.is_set()
    finally:
        prober.release.set()
        await finder.stop()


async def test_unplug_tells_listeners_and_replug_on_another_number_is_found() -> None:
    _meta, ec25 = _load("quectel-ec25.json")
    source = FakeDeviceSource(ec25)
    finder = Finder(source, prober=FakeProber({}))
    await finder.start()
    removed: list[str] = []
    finder.on_port_removed(removed.append)
    spec = MatchSpec("m0", vendor="2c7c", product="0125")
    try:
        assert (await finder.locate(spec)).port == "/dev/ttyUSB2"
        usb = "/devices/pci0000:00/0000:00:14.0/usb1/1-4"
        source.remove(usb)
        await finder.wait_change(5.0)
        assert "/dev/ttyUSB2" in removed
        with pytest.raises(PortGoneError, match="no device usb 2c7c:0125"):
            await finder.locate(spec)
        # back on ttyUSB4..7 (the old numbers were still held when it re-enumerated)
        replugged = [
            d for i in range(4) for d in _renumbered([ec25[i + 1]], f"ttyUSB{i}", f"ttyUSB{i + 4}")
        ]
        changed = asyncio.ensure_future(finder.wait_change(5.0))
        source.add(ec25[0], *replugged, ec25[5])
        assert await changed
        assert (await finder.locate(spec)).port == "/dev/ttyUSB6"
    finally:
        await finder.stop()


# ---- the outside world ------------------------------------------------------------------------


def test_usb_at_port_for_the_check_command_needs_no_probe() -> None:
    devices = _all_devices()
    assert usb_at_port(devices, "2c7c", "0125") == "/dev/ttyUSB2"
    assert usb_at_port(devices, "1bc7", "1061", interface="05") == "/dev/ttyUSB2"
    with pytest.raises(PortGoneError, match="no device usb 1e0e:9001"):
        usb_at_port(devices, "1e0e", "9001")


# ---- the modem list report --------------------------------------------------------------------


async def test_report_shows_every_device_and_why_unmatched_ones_are_not_used() -> None:
    finder = Finder(FakeDeviceSource(_all_devices()), prober=FakeProber({}))
    await finder.start()
    try:
        cfgs = [
            ModemConfig(id="wwan", usb=UsbMatch(vendor="2c7c", product="0125")),
            ModemConfig(id="gone", usb=UsbMatch(vendor="1e0e", product="9001")),
        ]
        doc = report(finder, cfgs, source="udev", modemmanager=None)
    finally:
        await finder.stop()
    assert doc["source"] == "udev"
    assert doc["modemmanager"] is None
    devices = {d["vendor"]: d for d in doc["devices"]}
    assert set(devices) == {"2c7c", "1199", "14c3", "1bc7"}
    ec25 = devices["2c7c"]
    assert ec25["entry"] == "wwan"
    assert ec25["why"] is None
    assert ec25["at_port"] == "/dev/ttyUSB2"
    assert ec25["netdev"] == "wwan0"
    assert [p["role"] for p in ec25["ports"]] == ["diag", "gps", "at_primary", "ppp"]
    sierra = devices["1199"]
    assert sierra["entry"] is None
    assert sierra["why"] == "no [[modems]] entry matches usb 1199:9079: reported, not used"
    assert devices["14c3"]["bus"] == "pci"
    assert devices["14c3"]["at_port"] == "/dev/wwan0at0"
    entries = {e["id"]: e for e in doc["entries"]}
    assert entries["wwan"]["port"] == "/dev/ttyUSB2"
    assert entries["wwan"]["how"] == "usb"
    assert entries["gone"]["port"] is None
    assert entries["gone"]["why"] == "no device usb 1e0e:9001"


async def test_a_change_during_work_is_not_missed_by_the_next_wait() -> None:
    _, ec25 = _load("quectel-ec25.json")
    source = FakeDeviceSource()
    finder = Finder(source, prober=FakeProber({}))
    await finder.start()
    try:
        seen = finder.generation
        source.add(*ec25)  # arrives while the caller is busy elsewhere
        while finder.generation == seen:
            await finder.wait_change(5.0)
        # a caller that looked at generation `seen` is woken at once, not at its timeout
        assert await finder.wait_change(3600.0, since=seen)
        assert not await finder.wait_change(0.01, since=finder.generation)
    finally:
        await finder.stop()
