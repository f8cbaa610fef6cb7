"""End to end in network namespaces: a companion's own probe through the link that reaches its
sibling (a sibling layer with `interface`), and traffic routed over that link.

    agent ns: mosquitto, the "phone" (an MQTT client that says it is connected), the watch's
              daemon; m0 198.18.1.2/24 is the watch's link to the phone (Wi-Fi, tether)
    operator ns: the phone's side of the link (198.18.1.1) and "the Internet" (198.19.0.1)

The phone keeps saying it is online and connected; only the watch's own probe through m0 can
tell that the link between them is cut. The host's own interfaces and routes are never touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import IPRoute

from agent.config import config_to_toml, default_demo_config, parse_config
from agent.daemon.control import ControlError, control_call
from agent.demo.mosquitto import MosquittoBroker
from agent.demo.stack import mosquitto_available
from agent.net.routes import ACTIVE_METRIC
from hw_fixtures.control_client import AsyncControlClient
from hw_fixtures.netns_testing import inside, netns_command
from hw_fixtures.testing import start_emulator
from tests.netns_lab import (
    INTERNET,
    Lab,
    add_agent_address,
    make_lab,
    needs_root,
    operator_servers,
)

pytestmark = [
    pytest.mark.e2e,
    needs_root(),
    pytest.mark.skipif(not mosquitto_available(), reason="needs mosquitto"),
]

WATCH_ICCID = "8931440000012345678"
STEP_S = 60.0

# The phone as its siblings see it: retained `online` (Last Will `offline`) and a retained
# state saying it is connected; then it stays until killed.
PHONE = """
import json, sys, time
import paho.mqtt.client as mqtt
host, port = sys.argv[1], int(sys.argv[2])
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="fake-phone", protocol=mqtt.MQTTv5)
c.will_set("esim-agent/phone/availability", b"offline", qos=1, retain=True)
c.connect(host, port, keepalive=5)
c.loop_start()
c.publish("esim-agent/phone/availability", b"online", qos=1, retain=True).wait_for_publish(10)
state = json.dumps({"device_id": "phone", "connectivity": True, "active_layer": "primary"})
c.publish("esim-agent/phone/state", state.encode(), qos=1, retain=True).wait_for_publish(10)
while True:
    time.sleep(3600)
"""

SCENARIO = """
[[modem]]
id = "m0"
vendor = "quectel"
imei = "867698041234569"
eid = "89049032123451234512345678909999"

[modem.registration]
state = "home"
act = "lte"

[modem.delays]
reattach = 0.5

[[modem.profiles]]
iccid = "8931440000012345678"
name = "Watch"
provider = "Watch Mobile"
operator_name = "Watch Mobile"
mcc_mnc = "00101"
enabled = true
"""


async def until(check: Callable[[], Any], what: str, timeout: float = STEP_S) -> None:
    try:
        async with asyncio.timeout(timeout):
            while not await check():  # noqa: ASYNC110 - the state lives in other processes
                await asyncio.sleep(0.2)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for: {what}") from None


def set_link(ns: str, ifname: str, up: bool) -> None:
    with IPRoute(netns=ns) as ipr:
        idx = int(ipr.link_lookup(ifname=ifname)[0])
        ipr.link("set", index=idx, state="up" if up else "down")


def main_defaults(ns: str) -> list[tuple[int | None, int | None]]:
    """(oif, metric) of every IPv4 default route in the namespace's main table."""
    with IPRoute(netns=ns) as ipr:
        return [
            (r.get("oif"), r.get("priority"))
            for r in ipr.route("dump", family=2)
            if r["dst_len"] == 0 and r.get("table") == 254
        ]


@pytest.fixture
def lab() -> Iterator[tuple[Lab, int]]:
    with make_lab(1) as lab:
        add_agent_address(lab, 0)
        with IPRoute(netns=lab.agent) as ipr:
            # What the system's Wi-Fi client would have set up on the link to the phone.
            m0 = int(ipr.link_lookup(ifname="m0")[0])
            ipr.route("add", dst="0.0.0.0/0", gateway=lab.operators[0].gateway, oif=m0)
        yield lab, m0


def spawn(argv: list[str], log: Path | None = None) -> subprocess.Popen[bytes]:
    with contextlib.ExitStack() as stack:
        err = stack.enter_context(log.open("ab")) if log is not None else subprocess.DEVNULL
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )


async def test_own_probe_through_the_sibling_link_decides_and_routes(
    tmp_path: Path, lab: tuple[Lab, int], request: pytest.FixtureRequest
) -> None:
    the_lab, m0 = lab
    async with operator_servers(the_lab):
        await run_story(tmp_path, the_lab.agent, the_lab.operators[0].ns, m0, request)


async def run_story(
    tmp_path: Path, agent_ns: str, op_ns: str, m0: int, request: pytest.FixtureRequest
) -> None:
    broker = MosquittoBroker(tmp_path / "mosquitto")
    broker.workdir.mkdir(parents=True)
    with inside(agent_ns):
        broker.start()
    scen = tmp_path / "scenario.toml"
    scen.write_text(SCENARIO)
    emu = await asyncio.to_thread(start_emulator, "--scenario", str(scen))
    emu_ctl = AsyncControlClient(emu.info["control"])
    cfg = default_demo_config(
        emu.info, broker.port, tmp_path / "state", [WATCH_ICCID], device_id="watch"
    )
    data = tomllib.loads(config_to_toml(cfg))
    data["mqtt"].update(keepalive=5, discovery=False)
    data["timers"].update(companion_grace=3.0, failback_stable=3.0, hold_down=1.0)
    data["group"] = {"name": "family", "devices": ["phone", "watch"]}
    own = data["layers"][0]
    # The emulator's loopback probe servers live outside this namespace: the modem's own word.
    own.update(name="own", role="failover", probes=[])
    probe = {
        "kind": "http",
        "target": f"http://{INTERNET}/generate_204",
        "interval": 0.5,
        "timeout": 0.4,
    }
    data["layers"] = [
        {
            "name": "phone-link",
            "device": "phone",
            "interface": "m0",
            "role": "primary",
            "probes": [probe],
        },
        own,
    ]
    config_path = tmp_path / "watch.toml"
    config_path.write_text(config_to_toml(parse_config(data, str(config_path))))
    log_path = tmp_path / "watch.log"
    phone = spawn(
        netns_command(agent_ns, [sys.executable, "-c", PHONE, "127.0.0.1", str(broker.port)])
    )
    watch = spawn(
        netns_command(
            agent_ns, [sys.executable, "-m", "agent", "run", "--config", str(config_path)]
        ),
        log_path,
    )
    sock = str(tmp_path / "state" / "control.sock")

    async def status() -> dict[str, Any]:
        reply = await control_call(sock, "status", timeout=10.0)
        assert isinstance(reply, dict)
        return reply

    async def enabled() -> list[str]:
        st = await emu_ctl.call("status", modem="m0")
        return [st["iccid"]] if st.get("iccid") else []

    def layer(st: dict[str, Any], name: str) -> dict[str, Any]:
        return next(x for x in st["layers"] if x["name"] == name)

    try:

        async def on_phone() -> bool:
            with contextlib.suppress(OSError, TimeoutError, ControlError):
                st = await status()
                # Our own probe may vouch for the link before the phone's retained state
                # arrives: wait for both.
                return (
                    st["active_layer"] == "phone-link"
                    and st["group"]["siblings"][0]["connectivity"] is True
                    and layer(st, "phone-link")["default"]
                    and await enabled() == []
                )
            return False

        await until(on_phone, "watch on the phone's link, routed over m0, own profile asleep")
        st = await status()
        (sib,) = st["group"]["siblings"]
        assert (sib["device"], sib["health"], sib["connectivity"]) == ("phone", "up", True)
        assert layer(st, "phone-link")["interface"] == "m0"
        # Traffic follows the link: the agent's own default route through m0, active metric.
        assert (m0, ACTIVE_METRIC) in await asyncio.to_thread(main_defaults, agent_ns)

        # The link to the phone breaks; the phone itself still says it is connected.
        await asyncio.to_thread(set_link, op_ns, "u0", False)

        async def on_own() -> bool:
            st = await status()
            return st["active_layer"] == "own" and await enabled() == [WATCH_ICCID]

        await until(on_own, "watch on its own profile after its probe through m0 failed")
        st = await status()
        (sib,) = st["group"]["siblings"]
        assert sib["connectivity"] is True
        assert sib["health"] == "down"
        assert "own probe" in sib["reason"]

        # The link heals: back to the phone after failback_stable, own profile asleep again.
        await asyncio.to_thread(set_link, op_ns, "u0", True)
        await until(on_phone, "watch back on the phone's link, own profile asleep")
    finally:
        for proc in (watch, phone):
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.to_thread(proc.wait), 20.0)
            except TimeoutError:
                proc.kill()
                await asyncio.to_thread(proc.wait)
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            lines = log_path.read_text(errors="replace").splitlines()
            keep = [x for x in lines if "probe_result" not in x and "urc" not in x]
            sys.stderr.write(f"--- watch (last 60 of {len(lines)})\n" + "\n".join(keep[-60:]))
        await asyncio.to_thread(emu.stop)
        broker.close()
