"""End to end: three real daemons acting as one group over one real Mosquitto, each with its
own emulator (docs/siblings.md).

- "phone": its own modem is its primary layer.
- "watch": a companion; its first layer is the phone, its own profile sleeps while the phone
  carries it.
- "tablet": holds the group's dormant emergency profile, woken only by the claim protocol.

The story: everyone settles (watch's own profile disabled, tablet's emergency disabled);
SIGKILL the phone -> the watch wakes its own profile; cut the watch's data link -> the tablet
wakes the emergency profile; heal all -> everyone dormant again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import tomllib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from agent.config import config_to_toml, default_demo_config, parse_config
from agent.daemon.control import control_call
from agent.demo.mosquitto import MosquittoBroker, Watcher
from agent.demo.stack import mosquitto_available
from hw_fixtures.control_client import AsyncControlClient
from hw_fixtures.testing import EmulatorHandle, start_emulator

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not mosquitto_available(), reason="needs mosquitto (apt install mosquitto)"),
]

BASE = "esim-agent"
PHONE_ICCID = "8944500102030405067"
WATCH_ICCID = "8931440000012345678"
SOS_ICCID = "8988247000001234567"
DEVICES = ["phone", "watch", "tablet", "laptop"]
STEP_S = 60.0


def scenario(imei: str, iccid: str, name: str, *, enabled: bool) -> str:
    """One modem with one profile (a tablet's emergency profile starts disabled)."""
    return textwrap.dedent(
        f"""
        [[modem]]
        id = "m0"
        vendor = "quectel"
        imei = "{imei}"
        eid = "8904903212345123451234567890{imei[-4:]}"

        [modem.registration]
        state = "home"
        act = "lte"

        [modem.delays]
        reattach = 0.5

        [[modem.profiles]]
        iccid = "{iccid}"
        name = "{name}"
        provider = "{name} Mobile"
        operator_name = "{name} Mobile"
        mcc_mnc = "00101"
        enabled = {"true" if enabled else "false"}
        """
    )


def tune(device: str, data: dict[str, Any]) -> None:
    """The demo config of one device, turned into its part of the group."""
    data["mqtt"]["keepalive"] = 5
    data["mqtt"]["discovery"] = False
    data["timers"].update(
        {"companion_grace": 3.0, "failback_stable": 3.0, "switch_timeout": 45.0, "hold_down": 1.0}
    )
    data["group"] = {
        "name": "family",
        "devices": DEVICES,
        "emergency_devices": ["tablet", "laptop"],
        "priority": {"tablet": 1, "laptop": 2},
        "claim_ttl": 8.0,
    }
    own = data["layers"][0]
    if device == "watch":
        own.update(name="own", role="failover")
        data["layers"] = [{"name": "phone-link", "device": "phone", "role": "primary"}, own]
    elif device in ("tablet", "laptop"):
        own.update(name="sos", role="emergency", scope="group")


@dataclass
class Device:
    name: str
    workdir: Path
    emulator: EmulatorHandle
    config_path: Path
    socket: str
    proc: subprocess.Popen[bytes] | None = None
    control: AsyncControlClient = field(init=False)

    def __post_init__(self) -> None:
        self.control = AsyncControlClient(self.emulator.info["control"])

    def start(self) -> None:
        with (self.workdir / "daemon.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "agent", "run", "--config", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )

    async def stop(self, sig: int = signal.SIGTERM) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            await asyncio.wait_for(asyncio.to_thread(proc.wait), 20.0)
        except TimeoutError:
            proc.kill()
            await asyncio.to_thread(proc.wait)

    async def enabled(self) -> list[str]:
        """What the emulator's eUICC has enabled (the card's truth, not the daemon's)."""
        status = await self.control.call("status", modem="m0")
        return [status["iccid"]] if status.get("iccid") else []

    async def status(self) -> dict[str, Any]:
        reply = await control_call(self.socket, "status", timeout=10.0)
        assert isinstance(reply, dict)
        return reply


@dataclass
class Group:
    broker: MosquittoBroker
    watcher: Watcher
    devices: dict[str, Device]

    def state(self, device: str) -> dict[str, Any] | None:
        raw = self.watcher.latest(f"{BASE}/{device}/state")
        return json.loads(raw) if raw else None

    def mark(self) -> int:
        return len(self.watcher.messages)

    def emergency_transitions(self, since: int) -> list[dict[str, Any]]:
        out = []
        for topic, payload, _, _ in self.watcher.messages[since:]:
            if topic.endswith("/events") and payload:
                event = json.loads(payload)
                data = event.get("data") or {}
                if event.get("type") == "transition" and data.get("kind") == "emergency":
                    out.append({"device": topic.split("/")[1], **data})
        return out


def status_text(device: Device) -> str:
    """`esim-agent status` as a person runs it."""
    done = subprocess.run(
        [sys.executable, "-m", "agent", "status", "--socket", device.socket],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return done.stdout


async def until(check: Callable[[], Any], what: str, timeout: float = STEP_S) -> None:
    """Wait for a condition on other processes' state, with a deadline that names it."""
    try:
        async with asyncio.timeout(timeout):
            while not await check():  # noqa: ASYNC110 - the state lives in other processes
                await asyncio.sleep(0.2)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for: {what}") from None


@pytest.fixture
async def group(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Group]:
    broker = MosquittoBroker(tmp_path / "mosquitto")
    broker.workdir.mkdir(parents=True)
    await asyncio.to_thread(broker.start)
    devices: dict[str, Device] = {}
    watcher = Watcher(broker, f"{BASE}/#")
    try:
        for i, (name, iccid, label, enabled) in enumerate(
            [
                ("phone", PHONE_ICCID, "Home", True),
                ("watch", WATCH_ICCID, "Watch", True),
                ("tablet", SOS_ICCID, "Sos", False),
                ("laptop", SOS_ICCID, "Sos", False),
            ]
        ):
            workdir = tmp_path / name
            workdir.mkdir()
            scen = workdir / "scenario.toml"
            scen.write_text(scenario(f"86769804123456{i}", iccid, label, enabled=enabled))
            emu = await asyncio.to_thread(start_emulator, "--scenario", str(scen))
            cfg = default_demo_config(
                emu.info, broker.port, workdir / "state", [iccid], device_id=name
            )
            data = tomllib.loads(config_to_toml(cfg))
            tune(name, data)
            config_path = workdir / "esim-agent.toml"
            config_path.write_text(config_to_toml(parse_config(data, str(config_path))))
            devices[name] = Device(
                name, workdir, emu, config_path, str(workdir / "state" / "control.sock")
            )
        await watcher.__aenter__()
        for device in devices.values():
            device.start()
        yield Group(broker, watcher, devices)
    finally:
        # The holder first: a group torn down phone first would look like an outage to it.
        for device in reversed(devices.values()):
            await device.stop()
        await watcher.__aexit__(None, None, None)
        report = getattr(request.node, "rep_call", None)
        for device in devices.values():
            if report is not None and report.failed:
                lines = (device.workdir / "daemon.log").read_text(errors="replace").splitlines()
                keep = [x for x in lines if "probe_result" not in x and '"debug"' not in x]
                sys.stderr.write(f"--- {device.name} (last 50 of {len(lines)})\n")
                sys.stderr.write("\n".join(keep[-50:]) + "\n")
            await asyncio.to_thread(device.emulator.stop)
        await asyncio.to_thread(broker.close)


async def test_phone_watch_tablet_story(group: Group) -> None:
    phone, watch, tablet, laptop = (group.devices[d] for d in DEVICES)

    async def settled() -> bool:
        ph, wa = group.state("phone"), group.state("watch")
        return (
            ph is not None
            and ph["connectivity"]
            and wa is not None
            and wa["active_layer"] == "phone-link"
            and await watch.enabled() == []
            and await tablet.enabled() == []
        )

    # The watch starts with its own profile enabled: with the phone carrying it, it sleeps.
    await until(settled, "phone connected, watch on the phone with its own profile asleep")
    st = await watch.status()
    (sibling,) = st["group"]["siblings"]
    assert sibling | {"online": True, "connectivity": True, "health": "up"} == sibling
    assert sibling["device"] == "phone"
    st = await tablet.status()
    assert st["group"]["claim"]["phase"] == "asleep"
    assert st["active_layer"] is None
    # What a person sees: the sibling's view on the watch, the claim on the tablet.
    shown = await asyncio.to_thread(status_text, watch)
    rows = [line.split() for line in shown.splitlines() if line.startswith("phone-link ")]
    row = rows[-1]  # the layers table first, then the siblings table
    assert row[:6] == ["phone-link", "phone", "yes", "yes", "up", "sibling"]
    assert "broker: connected" in shown
    assert "group family emergency claim: asleep" in await asyncio.to_thread(status_text, tablet)

    # SIGHUP with a changed [group]: refused with a reason, the old config keeps running.
    text = watch.config_path.read_text()
    watch.config_path.write_text(text.replace("claim_ttl = 8.0", "claim_ttl = 9.0"))
    assert "claim_ttl = 9.0" in watch.config_path.read_text()
    assert watch.proc is not None
    watch.proc.send_signal(signal.SIGHUP)
    log = watch.workdir / "daemon.log"

    async def refused() -> bool:
        return any(
            '"config_reload_refused"' in line and "needs a restart" in line
            for line in log.read_text(errors="replace").splitlines()
        )

    await until(refused, "the watch refusing a [group] change on SIGHUP")
    assert (await watch.status())["active_layer"] == "phone-link"

    # The phone dies without a goodbye: its Last Will wakes the watch's own profile.
    mark = group.mark()
    await phone.stop(signal.SIGKILL)

    async def watch_on_own() -> bool:
        wa = group.state("watch")
        return (
            wa is not None
            and wa["active_layer"] == "own"
            and wa["connectivity"]
            and await watch.enabled() == [WATCH_ICCID]
        )

    await until(watch_on_own, "watch carried by its own profile")
    assert await tablet.enabled() == []  # the watch is connected: no emergency
    assert group.emergency_transitions(mark) == []

    # The watch's own data link goes too: nobody in the group is connected, the tablet wakes.
    await watch.control.call("link", modem="m0", state="down")

    async def tablet_awake() -> bool:
        ta = group.state("tablet")
        return (
            ta is not None
            and ta["active_layer"] == "sos"
            and ta["connectivity"]
            and await tablet.enabled() == [SOS_ICCID]
        )

    await until(tablet_awake, "the tablet's group emergency profile awake and connected")
    # The tablet comes first in the group's wake order: the laptop stands by.
    assert await laptop.enabled() == []
    claim = (await laptop.status())["group"]["claim"]
    assert (claim["phase"], claim["claimed_by"], claim["order"]) == (
        "asleep",
        ["tablet"],
        ["tablet", "laptop"],
    )
    woken = group.emergency_transitions(mark)
    assert [(t["device"], t["outcome"]) for t in woken if t["outcome"] != "pending"] == [
        ("tablet", "switched")
    ]
    assert (await tablet.status())["group"]["claim"]["phase"] == "awake"

    # All heal: the watch's link comes back and the phone restarts.
    await watch.control.call("link", modem="m0", state="up")
    phone.start()

    async def dormant_again() -> bool:
        wa, ta = group.state("watch"), group.state("tablet")
        return (
            wa is not None
            and wa["active_layer"] == "phone-link"
            and ta is not None
            and ta["active_layer"] is None
            and await watch.enabled() == []
            and await tablet.enabled() == []
            and await laptop.enabled() == []
        )

    await until(dormant_again, "watch back on the phone, own profile and emergency asleep")
    assert (await tablet.status())["group"]["claim"]["phase"] == "asleep"


async def test_a_holder_killed_while_awake_comes_back_asleep(group: Group) -> None:
    phone, watch, tablet, laptop = (group.devices[d] for d in DEVICES)

    async def tablet_awake() -> bool:
        ta = group.state("tablet")
        return ta is not None and ta["active_layer"] == "sos" and ta["connectivity"]

    async def settled() -> bool:
        wa = group.state("watch")
        return wa is not None and wa["active_layer"] == "phone-link" and await watch.enabled() == []

    await until(settled, "watch on the phone")
    await watch.control.call("link", modem="m0", state="down")
    await phone.stop(signal.SIGKILL)
    await until(tablet_awake, "the tablet's group emergency awake")

    # The tablet dies while awake: its card keeps the emergency profile enabled.
    await tablet.stop(signal.SIGKILL)
    assert await tablet.enabled() == [SOS_ICCID]
    await watch.control.call("link", modem="m0", state="up")
    phone.start()

    async def phone_connected() -> bool:
        ph = group.state("phone")
        avail = group.watcher.latest(f"{BASE}/phone/availability")
        return avail == b"online" and ph is not None and ph["connectivity"]

    await until(phone_connected, "the phone back and connected")
    # Back with the group healthy, the tablet puts its emergency profile to sleep at start.
    mark = group.mark()
    tablet.start()

    async def tablet_asleep() -> bool:
        avail = group.watcher.latest(f"{BASE}/tablet/availability")
        return avail == b"online" and await tablet.enabled() == []

    await until(tablet_asleep, "the restarted tablet with its emergency profile disabled")
    st = await tablet.status()
    assert st["active_layer"] is None
    assert st["group"]["claim"]["phase"] == "asleep"
    assert group.emergency_transitions(mark) == []

    # The laptop (next in the wake order) may have stood in while the tablet was dead; with
    # the group healthy every emergency profile is asleep.
    async def laptop_asleep() -> bool:
        return await laptop.enabled() == []

    await until(laptop_asleep, "the laptop's emergency profile asleep")
