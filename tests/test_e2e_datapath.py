"""End to end in network namespaces: the real daemon steers traffic over real interfaces.

    agent ns (the test's)                         operator ns per modem (the emulator's)
    esim-agent run  (netns_exec)                  gateway 198.18.N.1, "Internet" 198.19.0.1:
    mosquitto on 127.0.0.1                        HTTP 204, TCP echo, DNS; every source logged
    m0 interface  <---------- veth ---------->    (control `requests`)
    m1 interface  <---------- veth ---------->

The emulator plays the demo's two modems (m0 Quectel in ECM mode: DHCP; m1 Sierra: QMI,
address from AT+CGCONTRDP) with the demo's three profiles. Everything waits on conditions (the
daemon's status, the kernel's routes) with a deadline; nothing sleeps a fixed time. The host's
own interfaces, routes and rules are never touched: the kernel is read inside the agent ns only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import IPRoute

from agent.config import config_to_toml, parse_config
from agent.daemon.control import ControlError, control_call
from agent.demo.mosquitto import MosquittoBroker
from agent.demo.stack import DEMO_ICCIDS, DEMO_SCENARIO, mosquitto_available
from agent.net.routes import ACTIVE_METRIC, RT_PROTO, TABLE_BASE, TABLE_SPAN
from hw_fixtures.netns_testing import inside, netns_command
from hw_fixtures.testing import EmulatorHandle
from tests.netns_lab import needs_root

pytestmark = [
    pytest.mark.e2e,
    needs_root(),
    pytest.mark.skipif(not mosquitto_available(), reason="needs mosquitto"),
]

PRIMARY, ROAM, EMERGENCY = DEMO_ICCIDS
INTERNET = "198.19.0.1"
ECHO_PORT = 7
STEP_S = 60.0
DEVICE = "e2e-net"
#: The daemon's probes use HTTP only, so the TCP echo server sees the test's own connections.
PROBE = {"kind": "http", "target": f"http://{INTERNET}/generate_204", "interval": 1.0}
APNS = {"primary": "home.apn", "failover": "roam.apn", "emergency": "sos.apn"}

# A subscriber for one retained topic, run inside the agent namespace (the broker lives there).
READ_RETAINED = """
import sys, paho.mqtt.client as mqtt
host, port, topic = sys.argv[1], int(sys.argv[2]), sys.argv[3]
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
c.on_connect = lambda c, u, f, rc, p: c.subscribe(topic)
def got(c, u, m):
    print(m.payload.decode()); c.disconnect()
c.on_message = got
c.connect(host, port)
c.loop_forever(timeout=1.0)
"""


@dataclass
class NetStack:
    """The emulator (fixture), a broker and the daemon in the agent namespace."""

    ns: str
    emu: EmulatorHandle
    workdir: Path
    broker: MosquittoBroker
    daemon: subprocess.Popen[bytes] | None = None
    config_path: Path = field(init=False)
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.config_path = self.workdir / "esim-agent.toml"
        self.log_path = self.workdir / "daemon.log"

    @property
    def socket(self) -> str:
        return str(self.workdir / "state" / "control.sock")

    def interface(self, modem: str) -> str:
        return str(self.emu.modem(modem)["interface"])

    def address(self, modem: str) -> str:
        return str(self.emu.modem(modem)["address"])

    def write_config(self) -> None:
        def layer(name: str, modem: str, iccid: str, role: str) -> dict[str, Any]:
            return {
                "name": name,
                "modem": modem,
                "profile": iccid,
                "role": role,
                "apn": APNS[name],
                "probes": [{**PROBE, "timeout": 1.0}],
            }

        data: dict[str, Any] = {
            "device_id": DEVICE,
            "state_dir": str(self.workdir / "state"),
            "modems": [
                {
                    "id": m,
                    "port": str(self.emu.modem(m)["link"]),
                    "vendor": vendor,
                    "interface": self.interface(m),
                    "poll_interval": 2.0,
                }
                for m, vendor in (("m0", "quectel"), ("m1", "sierra"))
            ],
            "layers": [
                layer("primary", "m0", PRIMARY, "primary"),
                layer("failover", "m1", ROAM, "failover"),
                layer("emergency", "m1", EMERGENCY, "emergency"),
            ],
            "health": {"down_after": 2, "up_after": 2, "probe_budget": 0},
            "timers": {
                "hold_down": 2.0,
                "hold_down_max": 20.0,
                "failback_stable": 3.0,
                "switch_timeout": 60.0,
                "rollback_timeout": 30.0,
            },
            "mqtt": {"enabled": True, "host": "127.0.0.1", "port": self.broker.port},
            "control": {"socket": self.socket},
        }
        self.config_path.write_text(config_to_toml(parse_config(data, "<e2e>")))

    def start_daemon(self) -> None:
        with self.log_path.open("ab") as log:
            self.daemon = subprocess.Popen(
                netns_command(
                    self.ns,
                    [sys.executable, "-m", "agent", "run", "--config", str(self.config_path)],
                ),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )

    async def stop_daemon(self, sig: int = signal.SIGTERM) -> int | None:
        proc, self.daemon = self.daemon, None
        if proc is None:
            return None
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            return await asyncio.wait_for(asyncio.to_thread(proc.wait), 30)
        except TimeoutError:
            proc.kill()
            return await asyncio.to_thread(proc.wait)

    async def status(self) -> dict[str, Any] | None:
        """The daemon's status (control socket: a path, reachable from any namespace)."""
        try:
            result = await control_call(self.socket, "status", timeout=5)
        except (ControlError, OSError, TimeoutError):
            return None
        assert isinstance(result, dict)
        return result

    async def until_status(
        self, want: Callable[[dict[str, Any]], bool], timeout: float = STEP_S
    ) -> dict[str, Any]:
        """Poll the daemon's status until `want` holds (the state lives in another process)."""
        last: dict[str, Any] | None = None
        try:
            async with asyncio.timeout(timeout):
                while True:
                    last = await self.status()
                    if last is not None and want(last):
                        return last
                    await asyncio.sleep(0.2)
        except TimeoutError:
            raise AssertionError(f"status never matched; last: {json.dumps(last)[:3000]}") from None

    async def requests(self, modem: str) -> dict[str, list[str]]:
        """What the modem's operator servers saw since the last call."""
        reply = await asyncio.to_thread(self.emu.control, "requests", modem=modem, reset=True)
        return dict(reply["requests"])

    async def emu_control(self, cmd: str, **params: Any) -> dict[str, Any]:
        return await asyncio.to_thread(self.emu.control, cmd, **params)

    def connect_echo(self) -> None:
        """A new TCP connection from the agent namespace, by whatever route the kernel picks."""
        with (
            inside(self.ns),
            socket.create_connection((INTERNET, ECHO_PORT), timeout=5) as sock,
        ):
            sock.sendall(b"ping\n")
            assert sock.recv(16) == b"ping\n"

    async def retained(self, topic: str) -> dict[str, Any]:
        argv = [sys.executable, "-c", READ_RETAINED, "127.0.0.1", str(self.broker.port), topic]
        done = await asyncio.to_thread(
            subprocess.run,
            netns_command(self.ns, argv),
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        value: dict[str, Any] = json.loads(done.stdout.splitlines()[0])
        return value


def layer_of(status: dict[str, Any], name: str) -> dict[str, Any]:
    entry: dict[str, Any] = next(x for x in status["layers"] if x["name"] == name)
    return entry


def carried_by(name: str) -> Callable[[dict[str, Any]], bool]:
    """Status predicate: `name` is active and its route is the one traffic follows."""

    def check(status: dict[str, Any]) -> bool:
        layer = layer_of(status, name)
        return status["active_layer"] == name and layer["default"] is True

    return check


def kernel_state(ns: str) -> dict[str, Any]:
    """The agent's routes (protocol 229, every table) and rules (ours or into our tables)."""
    with IPRoute(netns=ns) as ipr:
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        routes = [
            (
                r.get("table"),
                r.get("dst") or "default",
                r.get("priority"),
                names.get(r.get("oif")),
                r.get("gateway"),
            )
            for r in ipr.route("dump", family=socket.AF_INET)
            if r.get("proto") == RT_PROTO
        ]
        rules = [
            (r.get("table"), r.get("fwmark"), r.get("src"), r.get("priority"))
            for r in ipr.rule("dump", family=socket.AF_INET)
            if r.get("protocol") == RT_PROTO
            or TABLE_BASE <= (r.get("table") or 0) < TABLE_BASE + TABLE_SPAN
        ]
    return {"routes": routes, "rules": rules}


def main_defaults(state: dict[str, Any]) -> list[tuple[int, str]]:
    """(metric, interface) of every default route in the main table, lowest metric first."""
    return sorted(
        (int(metric or 0), str(oif))
        for table, dst, metric, oif, _ in state["routes"]
        if table == 254 and dst == "default"
    )


async def until_kernel(
    ns: str, want: Callable[[dict[str, Any]], bool], timeout: float = STEP_S
) -> dict[str, Any]:
    """Poll the agent namespace's routes and rules until `want` holds."""
    state: dict[str, Any] = {}
    try:
        async with asyncio.timeout(timeout):
            while True:
                state = await asyncio.to_thread(kernel_state, ns)
                if want(state):
                    return state
                await asyncio.sleep(0.2)
    except TimeoutError:
        raise AssertionError(f"kernel never matched: {state}") from None


def no_duplicates(state: dict[str, Any]) -> bool:
    return len(set(state["routes"])) == len(state["routes"]) and len(set(state["rules"])) == len(
        state["rules"]
    )


@pytest.fixture
async def net_stack(
    netns_emu_factory: Callable[..., EmulatorHandle],
    agent_netns: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> AsyncIterator[Callable[[], Awaitable[NetStack]]]:
    stacks: list[NetStack] = []

    async def make() -> NetStack:
        emu = await asyncio.to_thread(netns_emu_factory, "--scenario", str(DEMO_SCENARIO))
        broker = MosquittoBroker(tmp_path / "mosquitto")
        broker.workdir.mkdir(parents=True, exist_ok=True)
        with inside(agent_netns):  # the broker's process and its readiness check live there
            broker.start()
        stack = NetStack(agent_netns, emu, tmp_path, broker)
        stacks.append(stack)
        stack.write_config()
        stack.start_daemon()
        return stack

    yield make
    for stack in stacks:
        await stack.stop_daemon()
        stack.broker.close()
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed and stack.log_path.exists():
            lines = stack.log_path.read_text(errors="replace").splitlines()
            shown = [x for x in lines if '"level": "debug"' not in x][-80:]
            sys.stderr.write(f"--- {stack.log_path} (last of {len(lines)})\n" + "\n".join(shown))


async def test_data_connections_come_up_and_failover_moves_the_default_route(
    net_stack: Callable[[], Awaitable[NetStack]],
) -> None:
    stack = await net_stack()
    m0, m1 = stack.interface("m0"), stack.interface("m1")

    # Both data connections up (m0 by DHCP, m1 from CGCONTRDP), the default route on primary.
    status = await stack.until_status(
        lambda s: carried_by("primary")(s) and bool(layer_of(s, "failover")["addresses"])
    )
    primary, failover = layer_of(status, "primary"), layer_of(status, "failover")
    assert (primary["interface"], primary["addresses"]) == (m0, [stack.address("m0")])
    assert (failover["interface"], failover["addresses"]) == (m1, [stack.address("m1")])
    assert primary["metric"] == ACTIVE_METRIC < failover["metric"]
    assert failover["default"] is False
    assert primary["data"]["apn"] == APNS["primary"]
    assert failover["data"]["apn"] == APNS["failover"]
    assert main_defaults(await asyncio.to_thread(kernel_state, stack.ns))[0][1] == m0
    modem_state = await stack.retained(f"esim-agent/{DEVICE}/modems/m1")
    assert modem_state["interface"] == m1

    # New connections leave by the primary; each layer's probes only reach its own operator.
    for m in ("m0", "m1"):
        await stack.requests(m)
    await asyncio.to_thread(stack.connect_echo)
    seen0, seen1 = await stack.requests("m0"), await stack.requests("m1")
    assert seen0["tcp"] == [stack.address("m0")]
    assert seen1["tcp"] == []
    seen: dict[str, list[str]] = {"m0": [], "m1": []}
    async with asyncio.timeout(STEP_S):
        while not (seen["m0"] and seen["m1"]):  # a probe round of each layer
            for m in seen:
                seen[m] += (await stack.requests(m))["http"]
            await asyncio.sleep(0.2)
    assert set(seen["m0"]) == {stack.address("m0")}
    assert set(seen["m1"]) == {stack.address("m1")}

    # The silent failure: m0's upstream cut while it stays registered with its context up.
    await stack.emu_control("link", modem="m0", state="down")
    status = await stack.until_status(carried_by("failover"))
    assert layer_of(status, "failover")["metric"] == ACTIVE_METRIC
    assert layer_of(status, "primary")["default"] is False
    assert layer_of(status, "primary")["addresses"] == [stack.address("m0")]
    await until_kernel(stack.ns, lambda k: main_defaults(k)[0][1] == m1)
    await stack.requests("m1")
    await asyncio.to_thread(stack.connect_echo)
    assert (await stack.requests("m1"))["tcp"] == [stack.address("m1")]
    assert no_duplicates(await asyncio.to_thread(kernel_state, stack.ns))


async def test_emergency_and_failback_move_the_route(
    net_stack: Callable[[], Awaitable[NetStack]],
) -> None:
    stack = await net_stack()
    m0, m1 = stack.interface("m0"), stack.interface("m1")
    await stack.until_status(carried_by("primary"))

    await stack.emu_control("link", modem="m0", state="down")
    await stack.until_status(carried_by("failover"))
    # The roaming profile breaks too: m1 switches to its emergency profile, whose context is
    # created anew with the emergency layer's APN, and carries the traffic.
    await stack.emu_control("profile", modem="m1", op="broken", iccid=ROAM)
    status = await stack.until_status(carried_by("emergency"))
    emergency = layer_of(status, "emergency")
    assert emergency["interface"] == m1
    assert emergency["data"]["apn"] == APNS["emergency"]
    assert emergency["metric"] == ACTIVE_METRIC
    await until_kernel(stack.ns, lambda k: main_defaults(k)[0][1] == m1)
    await stack.requests("m1")
    await asyncio.to_thread(stack.connect_echo)
    assert (await stack.requests("m1"))["tcp"] == [stack.address("m1")]

    # Everything heals: failback to the primary, m1 back on its roaming profile.
    await stack.emu_control("link", modem="m0", state="up")
    await stack.emu_control("profile", modem="m1", op="broken", iccid=ROAM, broken=False)
    await stack.until_status(carried_by("primary"))
    await until_kernel(stack.ns, lambda k: main_defaults(k)[0][1] == m0)
    status = await stack.until_status(
        lambda s: (
            (layer_of(s, "failover")["data"] or {}).get("apn") == APNS["failover"]
            and bool(layer_of(s, "failover")["addresses"])
        )
    )
    assert layer_of(status, "emergency")["default"] is False
    await stack.requests("m0")
    await asyncio.to_thread(stack.connect_echo)
    assert (await stack.requests("m0"))["tcp"] == [stack.address("m0")]
    state = await asyncio.to_thread(kernel_state, stack.ns)
    assert no_duplicates(state)
    assert [oif for _, oif in main_defaults(state)] == [m0, m1]


async def test_sigkill_mid_failover_then_restart_leaves_no_stale_route_or_rule(
    net_stack: Callable[[], Awaitable[NetStack]],
) -> None:
    stack = await net_stack()
    m0, m1 = stack.interface("m0"), stack.interface("m1")
    await stack.until_status(
        lambda s: carried_by("primary")(s) and bool(layer_of(s, "failover")["addresses"])
    )
    settled = await asyncio.to_thread(kernel_state, stack.ns)
    assert no_duplicates(settled)

    # Kill it the moment the policy has decided to fail over (before the route moved).
    await stack.emu_control("link", modem="m0", state="down")
    await stack.until_status(lambda s: s["phase"] == "switching" or s["active_layer"] != "primary")
    assert await stack.stop_daemon(signal.SIGKILL) == -signal.SIGKILL
    left = await asyncio.to_thread(kernel_state, stack.ns)
    assert left["routes"], "a SIGKILL leaves the agent's routes behind (the sweep's work)"

    # The upstream returns while the daemon is down (in the emulator the ECM modem's DHCP
    # server sits behind the cut, so m0 could not get its lease otherwise).
    await stack.emu_control("link", modem="m0", state="up")
    stack.start_daemon()
    status = await stack.until_status(
        lambda s: carried_by("primary")(s) and bool(layer_of(s, "failover")["addresses"])
    )
    assert layer_of(status, "primary")["interface"] == m0
    state = await until_kernel(stack.ns, lambda k: main_defaults(k)[0][1] == m0)
    assert no_duplicates(state)
    # Exactly one default route per layer in the main table, one per layer table, and the
    # rules of the two layers that are up: nothing of the killed run is left over.
    assert [oif for _, oif in main_defaults(state)] == [m0, m1]
    tables = [t for t, dst, _, _, _ in state["routes"] if t != 254 and dst == "default"]
    assert len(tables) == len(set(tables)) == 2
    assert {t for t, *_ in state["rules"]} == set(tables)
    assert set(state["rules"]) == set(settled["rules"])
    assert set(state["routes"]) == set(settled["routes"])
