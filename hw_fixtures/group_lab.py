"""A group of devices on one machine: each its own emulator and its own `esim-agent run`
process, all on a real Mosquitto with the shipped ACL and per-device credentials, each behind
its own cuttable TCP proxy (hw_fixtures/tcp_proxy.py), so a test can kill a device, cut its data
path or partition it from the broker. Used by tests/test_e2e_siblings*.py and
bench/bench_companion.py.

    lab = GroupLab(tmp_path, [phone, watch, tablet])
    async with lab:
        await lab.kill("phone")
        await lab.state("watch", lambda s: s["active_layer"] == "own")

Profile states are read from the emulators (the truth the modems hold), not from what the
daemons publish: `enabled()` asks every emulator's control socket, and `ProfileMonitor`
samples them continuously and checks invariants on every change it sees.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from agent.config import config_to_toml, parse_config
from agent.demo.mosquitto import MosquittoBroker, Watcher
from hw_fixtures.control_client import AsyncControlClient
from hw_fixtures.scenario import luhn_complete
from hw_fixtures.tcp_proxy import BrokerProxy
from hw_fixtures.testing import EmulatorHandle, start_emulator

ROOT = Path(__file__).resolve().parent.parent
SHIPPED_ACL = ROOT / "config" / "mosquitto" / "acl"
BASE = "esim-agent"
GROUP = "family"
VIEWER = "viewer"
STOP_TIMEOUT_S = 20.0

#: Short timers so a whole outage and its recovery take seconds (docs/configuration.md).
FAST_TIMERS: dict[str, float] = {
    "hold_down": 1.0,
    "hold_down_max": 4.0,
    "hold_down_decay": 30.0,
    "failback_stable": 1.5,
    "switch_timeout": 12.0,
    "rollback_timeout": 10.0,
    "companion_grace": 1.5,
}
#: The smallest MQTT keepalive the config takes, and the smallest claim ttl it allows with it.
KEEPALIVE_S = 5
CLAIM_TTL_S = 8.0
PROBE_INTERVAL_S = 0.5


@dataclass(frozen=True)
class Profile:
    """One eSIM profile on an emulated modem."""

    iccid: str
    enabled: bool = False


@dataclass(frozen=True)
class ModemSpec:
    """One emulated modem of a device."""

    id: str
    profiles: tuple[Profile, ...]


@dataclass
class DeviceSpec:
    """A device of the group: its modems (one emulator for all) and its `[[layers]]`."""

    name: str
    modems: tuple[ModemSpec, ...]
    layers: list[dict[str, Any]]
    #: Extra config keys merged over the generated config (after the timers).
    tune: dict[str, Any] = field(default_factory=dict)
    #: Which of the lab's brokers this device talks to (bridged labs have two).
    broker: str = "main"

    @property
    def holds_group_emergency(self) -> bool:
        """Whether a layer of this device is the group emergency."""
        return any(layer.get("scope") == "group" for layer in self.layers)


def own_layer(
    name: str, iccid: str, role: str = "failover", *, modem: str = "m0", scope: str = "device"
) -> dict[str, Any]:
    """A layer on this device's own modem and profile (its probes are added by the lab)."""
    layer: dict[str, Any] = {"name": name, "modem": modem, "profile": iccid, "role": role}
    if scope != "device":
        layer["scope"] = scope
    return layer


def sibling_layer(name: str, device: str, role: str = "primary") -> dict[str, Any]:
    """A layer that is another device of the group (companion link, hotspot)."""
    return {"name": name, "device": device, "role": role}


def iccid_for(device_index: int, n: int) -> str:
    """A distinct, valid 19-digit ICCID per device and profile."""
    return f"89882470{device_index:05d}{n:05d}7"


class LabBroker(MosquittoBroker):
    """Mosquitto with per-device credentials and the shipped ACL (plus `acl_extra`), and any
    further config lines (a bridge)."""

    def __init__(
        self,
        workdir: Path,
        users: dict[str, str],
        *,
        acl_extra: str = "",
        lines: Sequence[str] = (),
    ) -> None:
        super().__init__(workdir, users=users)
        self.acl_extra = acl_extra
        self.extra_lines = list(lines)

    def _write_config(self) -> Path:
        conf = super()._write_config()
        acl = self.workdir / "acl"
        acl.write_text(SHIPPED_ACL.read_text() + "\n" + self.acl_extra)
        text = conf.read_text() + f"acl_file {acl}\n" + "".join(f"{x}\n" for x in self.extra_lines)
        conf.write_text(text)
        return conf


def passwords(names: Iterable[str]) -> dict[str, str]:
    """A password per user (devices, the viewer, the controller)."""
    return {n: f"pw-{n}-lab" for n in (*names, VIEWER, "home")}


def scenario_toml(index: int, spec: DeviceSpec) -> str:
    """The emulator scenario of one device: its modems, each with short delays."""
    out: list[str] = []
    for m_index, modem in enumerate(spec.modems):
        n = index * 10 + m_index
        out += [
            "[[modem]]",
            f'id = "{modem.id}"',
            'vendor = "quectel"',
            f'imei = "{luhn_complete(f"86769804{n:06d}")}"',
            f'eid = "890490321234512345123456789{n:05d}"',
            "[modem.registration]",
            'state = "home"',
            'act = "lte"',
            "[modem.delays]",
            "reattach = 0.3",
            "cops_scan = 0.3",
            "reset = 0.3",
        ]
        for p in modem.profiles:
            out += [
                "[[modem.profiles]]",
                f'iccid = "{p.iccid}"',
                f'name = "{spec.name}-{p.iccid[-6:]}"',
                f'provider = "Lab {spec.name}"',
                f"enabled = {'true' if p.enabled else 'false'}",
                f'operator_name = "Lab {spec.name}"',
                'mcc_mnc = "00101"',
            ]
    return "\n".join(out) + "\n"


class LabDevice:
    """One running device: emulator, proxy, config and (while alive) its daemon process."""

    def __init__(self, lab: GroupLab, index: int, spec: DeviceSpec) -> None:
        self.lab = lab
        self.index = index
        self.spec = spec
        self.name = spec.name
        self.workdir = lab.workdir / spec.name
        self.config_path = self.workdir / "esim-agent.toml"
        self.log_path = self.workdir / "daemon.log"
        self.socket = str(self.workdir / "state" / "control.sock")
        self.emulator: EmulatorHandle | None = None
        self.control: AsyncControlClient | None = None
        self.proxy: BrokerProxy | None = None
        self.daemon: subprocess.Popen[bytes] | None = None

    @property
    def iccids(self) -> list[str]:
        """Every profile of every modem of this device."""
        return [p.iccid for m in self.spec.modems for p in m.profiles]

    def modem_info(self, modem: str = "m0") -> dict[str, Any]:
        """The emulator's start-up facts of one modem (ports, endpoints)."""
        assert self.emulator is not None
        return self.emulator.modem(modem)

    async def start_emulator(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        scenario = self.workdir / "scenario.toml"
        scenario.write_text(scenario_toml(self.index, self.spec))
        self.emulator = await asyncio.to_thread(start_emulator, "--scenario", str(scenario))
        self.control = AsyncControlClient(self.emulator.control_path)

    def config(self, broker_port: int) -> dict[str, Any]:
        """The daemon's config as a dict (docs/configuration.md)."""
        assert self.emulator is not None
        lab = self.lab
        layers: list[dict[str, Any]] = []
        for spec_layer in self.spec.layers:
            layer = dict(spec_layer)
            if "modem" in layer:
                info = self.emulator.modem(layer["modem"])
                layer["probes"] = [
                    {
                        "kind": "tcp",
                        "target": f"127.0.0.1:{info['tcp_port']}",
                        "interval": PROBE_INTERVAL_S,
                        "timeout": PROBE_INTERVAL_S,
                    }
                ]
            layers.append(layer)
        holders = [d.name for d in lab.specs if d.holds_group_emergency]
        data: dict[str, Any] = {
            "device_id": self.name,
            "state_dir": str(self.workdir / "state"),
            "log_level": "info",
            "modems": [
                {
                    "id": m.id,
                    "port": str(self.emulator.modem(m.id)["link"]),
                    "vendor": "quectel",
                    "poll_interval": 1.0,
                }
                for m in self.spec.modems
            ],
            "layers": layers,
            "health": {
                "down_after": 2,
                "up_after": 2,
                "probe_budget": 0,
                "failure_interval": 0.2,
            },
            "policy": {"down_after": 1, "up_after": 1},
            "timers": dict(lab.timers),
            "mqtt": {
                "enabled": True,
                "host": "127.0.0.1",
                "port": broker_port,
                "username": self.name,
                "password": lab.users[self.name],
                "client_id": f"esim-agent-{self.name}",
                "keepalive": KEEPALIVE_S,
                "base_topic": BASE,
            },
            "group": {
                "name": GROUP,
                "devices": [d.name for d in lab.specs],
                "emergency_devices": holders,
                "priority": dict(lab.priority),
                "claim_ttl": lab.claim_ttl,
            },
            "control": {"socket": self.socket},
        }
        _merge(data, self.spec.tune)
        return data

    def write_config(self, broker_port: int) -> None:
        cfg = parse_config(self.config(broker_port), str(self.config_path))
        self.config_path.write_text(config_to_toml(cfg))

    def start_daemon(self) -> None:
        """Start `esim-agent run` on the written config (again after a kill)."""
        if self.daemon is not None and self.daemon.poll() is None:
            raise RuntimeError(f"{self.name}: the daemon is already running")
        with self.log_path.open("ab") as log:
            self.daemon = subprocess.Popen(
                [sys.executable, "-m", "agent", "run", "--config", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                cwd=ROOT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )

    async def stop_daemon(self, sig: int = signal.SIGTERM) -> int | None:
        """Signal the daemon and wait for it to exit; its exit status."""
        proc, self.daemon = self.daemon, None
        if proc is None:
            return None
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            return await asyncio.wait_for(asyncio.to_thread(proc.wait), STOP_TIMEOUT_S)
        except TimeoutError:
            proc.kill()
            return await asyncio.to_thread(proc.wait)

    @property
    def alive(self) -> bool:
        """Whether the daemon process runs."""
        return self.daemon is not None and self.daemon.poll() is None

    async def emu(self, cmd: str, **params: Any) -> dict[str, Any]:
        """One request to this device's emulator."""
        assert self.control is not None
        return await self.control.call(cmd, **params)

    async def enabled(self) -> frozenset[str]:
        """The ICCIDs enabled on this device's modems now, as the emulator holds them."""
        out: set[str] = set()
        for modem in self.spec.modems:
            reply = await self.emu("profile", modem=modem.id, op="list")
            out |= {p["iccid"] for p in reply["profiles"] if p["enabled"]}
        return frozenset(out)

    def log_tail(self, lines: int = 60) -> str:
        """The daemon's log without debug and probe chatter (for failure reports)."""
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        keep = [x for x in text if '"level": "debug"' not in x and "probe_result" not in x]
        return "\n".join(x[:600] for x in keep[-lines:])

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.stop_daemon()
        if self.proxy is not None:
            await self.proxy.close()
        if self.emulator is not None:
            await asyncio.to_thread(self.emulator.stop)


def _merge(into: dict[str, Any], extra: dict[str, Any]) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


Snapshot = dict[str, frozenset[str]]


class GroupLab:
    """The whole group: one broker (or the caller's), and per device emulator, proxy, daemon."""

    def __init__(
        self,
        workdir: Path,
        specs: Sequence[DeviceSpec],
        *,
        timers: dict[str, float] | None = None,
        priority: dict[str, int] | None = None,
        claim_ttl: float = CLAIM_TTL_S,
        brokers: dict[str, MosquittoBroker] | None = None,
    ) -> None:
        self.workdir = workdir
        self.specs = list(specs)
        self.timers = {**FAST_TIMERS, **(timers or {})}
        self.priority = priority or {}
        self.claim_ttl = claim_ttl
        self.users = passwords(s.name for s in self.specs)
        self.brokers: dict[str, MosquittoBroker] = dict(brokers or {})
        self._own_broker = not self.brokers
        self.devices = {s.name: LabDevice(self, i, s) for i, s in enumerate(self.specs)}
        self.watcher: Watcher | None = None

    def __getitem__(self, name: str) -> LabDevice:
        return self.devices[name]

    @property
    def broker(self) -> MosquittoBroker:
        """The main broker."""
        return self.brokers["main"]

    async def start(self, *, daemons: bool = True) -> GroupLab:
        """Broker, emulators, proxies and configs; the daemons too unless told otherwise.
        On any failure what was started is stopped again and the error raised."""
        try:
            return await self._start(daemons)
        except BaseException:
            await self.close()
            raise

    async def _start(self, daemons: bool) -> GroupLab:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self._own_broker:
            broker = LabBroker(self.workdir / "mosquitto", self.users)
            broker.workdir.mkdir(parents=True, exist_ok=True)
            self.brokers["main"] = broker
            await asyncio.to_thread(broker.start)
        await asyncio.gather(*(d.start_emulator() for d in self.devices.values()))
        for device in self.devices.values():
            upstream = self.brokers[device.spec.broker]
            device.proxy = await BrokerProxy(upstream.host, upstream.port, name=device.name).start()
            device.write_config(device.proxy.port)
        self.watcher = self.viewer()
        await self.watcher.__aenter__()
        if daemons:
            for device in self.devices.values():
                device.start_daemon()
        return self

    def viewer(self, broker: str = "main") -> Watcher:
        """A read-only MQTT subscriber on the whole tree (enter it with `async with`)."""
        return Watcher(
            self.brokers[broker], f"{BASE}/#", username=VIEWER, password=self.users[VIEWER]
        )

    async def close(self) -> None:
        """Stop the daemons (so they say goodbye), proxies, emulators, the watcher, the broker."""
        await asyncio.gather(*(d.close() for d in self.devices.values()), return_exceptions=True)
        if self.watcher is not None:
            await self.watcher.__aexit__(None, None, None)
            self.watcher = None
        if self._own_broker:
            for broker in self.brokers.values():
                await asyncio.to_thread(broker.close)

    async def __aenter__(self) -> GroupLab:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- what a test does to the group ------------------------------------------------------

    async def kill(self, name: str) -> None:
        """SIGKILL a device's daemon: no goodbye, the broker publishes its Last Will."""
        await self.devices[name].stop_daemon(signal.SIGKILL)

    def restart(self, name: str) -> None:
        """Start a device's daemon again."""
        self.devices[name].start_daemon()

    async def cut_data(self, name: str, modem: str = "m0") -> None:
        """The device's data path dies (the emulated link goes down; AT still answers)."""
        await self.devices[name].emu("link", modem=modem, state="down")

    async def heal_data(self, name: str, modem: str = "m0") -> None:
        """The device's data path works again."""
        await self.devices[name].emu("link", modem=modem, state="up")

    async def block_broker(self, name: str, *, refuse: bool = False, silent: bool = False) -> None:
        """Partition the device from the broker: its connection dropped (or, `silent`, kept
        open but carrying nothing), new ones blackholed (or refused)."""
        proxy = self.devices[name].proxy
        assert proxy is not None
        await proxy.cut(refuse=refuse, silent=silent)

    async def unblock_broker(self, name: str) -> None:
        """End the partition."""
        proxy = self.devices[name].proxy
        assert proxy is not None
        await proxy.heal()

    async def enabled(self) -> Snapshot:
        """Every device's enabled profiles, read from the emulators at (nearly) one instant."""
        names = list(self.devices)
        got = await asyncio.gather(*(self.devices[n].enabled() for n in names))
        return dict(zip(names, got, strict=True))

    # --- what a test waits for ----------------------------------------------------------------

    def mark(self) -> int:
        """A position in the viewer's message log (waits may look only after it)."""
        assert self.watcher is not None
        return len(self.watcher.messages)

    async def state(
        self, name: str, predicate: Callable[[Any], bool], timeout: float = 60.0, since: int = 0
    ) -> Any:
        """Wait for `<base>/<name>/state` whose JSON satisfies predicate."""
        assert self.watcher is not None
        return await self.watcher.wait_json(f"{BASE}/{name}/state", predicate, timeout, since)

    async def availability(
        self, name: str, value: str, timeout: float = 60.0, since: int = 0
    ) -> None:
        """Wait for `<base>/<name>/availability` == value (online / offline)."""
        assert self.watcher is not None
        await self.watcher.wait_for(
            f"{BASE}/{name}/availability", lambda p: p == value.encode(), timeout, since
        )

    async def ready(self, timeout: float = 60.0) -> None:
        """Every running daemon online and its state published."""
        for name, device in self.devices.items():
            if device.alive:
                await self.availability(name, "online", timeout)
                await self.state(name, lambda s: True, timeout)

    def latest_state(self, name: str) -> dict[str, Any] | None:
        """The last `state` the viewer saw from a device."""
        assert self.watcher is not None
        raw = self.watcher.latest(f"{BASE}/{name}/state")
        return None if not raw else json.loads(raw)

    def report(self, out: TextIO, lines: int = 60) -> None:
        """Every daemon's story (for a failing test's output)."""
        for device in self.devices.values():
            out.write(f"--- {device.name}: {device.log_path}\n{device.log_tail(lines)}\n")


Check = Callable[[Snapshot], str | None]


class ProfileMonitor:
    """Samples every emulator's enabled profiles without pause and runs `checks` on each change.

    A check returns None when the snapshot is fine, else what is wrong; every violation is kept
    (with the time and snapshot) and `assert_clean()` raises with all of them."""

    def __init__(self, lab: GroupLab, checks: Sequence[Check] = (), interval: float = 0.05) -> None:
        self.lab = lab
        self.checks = list(checks)
        self.interval = interval
        self.current: Snapshot = {}
        #: (monotonic time, snapshot) on every change seen.
        self.history: list[tuple[float, Snapshot]] = []
        self.violations: list[str] = []
        self.samples = 0
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> ProfileMonitor:
        await self._sample()
        self._task = asyncio.create_task(self._run(), name="profile-monitor")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self._sample()

    async def _sample(self) -> None:
        snap = await self.lab.enabled()
        self.samples += 1
        if snap == self.current and self.history:
            return
        now = time.monotonic()
        async with self._changed:
            self.current = snap
            self.history.append((now, snap))
            for check in self.checks:
                problem = check(snap)
                if problem is not None:
                    self.violations.append(f"{problem} at t={now:.2f}: {_show(snap)}")
            self._changed.notify_all()

    async def wait(self, predicate: Callable[[Snapshot], bool], timeout: float = 60.0) -> Snapshot:
        """Wait until a sample satisfies predicate; returns it. TimeoutError names what the
        emulators held last."""
        try:
            async with asyncio.timeout(timeout), self._changed:
                await self._changed.wait_for(lambda: predicate(self.current))
                return self.current
        except TimeoutError:
            raise TimeoutError(
                f"not within {timeout:g} s; enabled: {_show(self.current)}"
            ) from None

    def assert_clean(self) -> None:
        """Raise AssertionError listing every violation seen so far."""
        if self.violations:
            raise AssertionError("invariant violated:\n" + "\n".join(self.violations))

    def timeline(self) -> str:
        """Every change seen, one line each (for failure reports)."""
        if not self.history:
            return ""
        t0 = self.history[0][0]
        return "\n".join(f"{t - t0:8.2f}s {_show(s)}" for t, s in self.history)


def _show(snap: Snapshot) -> str:
    return ", ".join(f"{k}={sorted(v) or '-'}" for k, v in snap.items())


async def until(check: Callable[[], Awaitable[bool]], timeout: float = 60.0) -> None:
    """Wait for a condition held by another process (no event to wait on), with a deadline."""
    async with asyncio.timeout(timeout):
        while not await check():  # noqa: ASYNC110 - the state lives in other processes
            await asyncio.sleep(0.05)
