"""End to end: three emulated modems in one daemon, found three ways through the fake udev feed.

m0 by its port, m1 by USB ids + interface, m2 by IMEI. During the failover scenario m0 is
unplugged and comes back on another pty, m1 hangs, and m2 keeps its layer and its MQTT state
fresh throughout; `modem list --json` shows all three with the entry each matched.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from agent.demo.stack import DemoStack, mosquitto_available

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not mosquitto_available(), reason="needs mosquitto (apt install mosquitto)"),
]

THREE = Path(__file__).resolve().parent.parent / "hw_fixtures" / "scenarios" / "three.toml"
ICCIDS = ("8944500102030405067", "8931440000012345678", "8988247000001234567")
STEP_S = 60.0


def find_three_ways(data: dict[str, Any], emulator_control: str) -> None:
    """m0 by port (as the demo config has it), m1 by USB ids + interface, m2 by IMEI."""
    _by_port, m1, m2 = data["modems"]
    for m in (m1, m2):
        del m["port"]
    m1["usb"] = {"vendor": "1199", "product": "9071", "interface": "03"}
    m2["imei"] = "356938035643809"
    data["discovery"] = {"source": "emulator", "emulator_control": emulator_control}
    for layer, name in zip(data["layers"], ("primary", "roam", "backup"), strict=True):
        layer["name"] = name
        layer["role"] = "primary" if name == "primary" else "failover"


@pytest.fixture
async def stack(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[DemoStack]:
    def tune(data: dict[str, Any]) -> None:
        # runs inside start(), after the emulator is up
        assert s.emulator is not None
        find_three_ways(data, s.emulator.control_path)

    s = DemoStack(
        tmp_path / "stack",
        scenario=THREE,
        iccids=ICCIDS,
        broker="mosquitto",
        emulator_args=("--fast",),
        tune=tune,
    )
    await s.start()
    try:
        yield s
    finally:
        await s.close()
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            lines = s.daemon_log.read_text(errors="replace").splitlines()
            keep = [line for line in lines if '"level": "debug"' not in line]
            sys.stderr.write("\n".join(keep[-80:]) + "\n")


def modem_list(socket: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "agent", "modem", "list", "--json", "--socket", socket],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    doc: dict[str, Any] = json.loads(out.stdout)
    return doc


async def test_three_modems_found_three_ways_survive_unplug_and_hang(stack: DemoStack) -> None:
    assert stack.emulator is not None
    await stack.wait_json("state", lambda s: s.get("active_layer") == "primary", STEP_S)

    async def all_online() -> dict[str, Any]:
        async with asyncio.timeout(STEP_S):
            while True:
                doc = await asyncio.to_thread(modem_list, stack.socket)
                if all(e["port"] for e in doc["entries"]):
                    return doc
                await asyncio.sleep(0.2)

    doc = await all_online()
    entries = {e["id"]: e for e in doc["entries"]}
    assert {k: v["how"] for k, v in entries.items()} == {"m0": "port", "m1": "usb", "m2": "imei"}
    for mid in ("m0", "m1", "m2"):
        assert entries[mid]["why"] is None
        assert entries[mid]["device"] is not None
    assert entries["m1"]["port"] == stack.emulator.modem("m1")["port"]
    assert entries["m2"]["port"] == stack.emulator.modem("m2")["port"]
    assert entries["m2"]["netdev"] == "wwan-m2"
    by_entry = {d["entry"]: d for d in doc["devices"]}
    assert sorted(by_entry) == ["m0", "m1", "m2"]
    assert by_entry["m1"]["ports"][0]["interface"] == "03"
    assert by_entry["m2"]["imei"] == "356938035643809"

    mark = stack.mark()
    old_port = stack.emulator.modem("m0")["port"]
    # m0 vanishes mid-poll: primary goes down at once, the policy fails over to roam (m1)
    await stack.control("unplug", modem="m0")
    await stack.wait_transition(lambda d: d["to_layer"] == "roam", STEP_S, mark)
    # m1 stops answering: roam goes down, the policy moves to backup (m2)
    await stack.control("fault", modem="m1", kind="hang")
    await stack.wait_transition(lambda d: d["to_layer"] == "backup", STEP_S, mark)
    # m2's session kept polling through all this: a new reading reaches MQTT
    await stack.control("set_signal", modem="m2", rssi_dbm=-63)
    await stack.wait_json(
        "modems/m2",
        lambda m: m["online"] and m["signal"]["rssi_dbm"] == -63,
        STEP_S,
        mark,
    )
    # m0 comes back on another pty: rediscovered, matched, and the primary returns
    new_port = (await stack.control("replug", modem="m0"))["port"]
    assert new_port != old_port
    await stack.wait_transition(lambda d: d["to_layer"] == "primary", STEP_S, mark)
    await stack.wait_json("modems/m0", lambda m: m["online"] and m["port"], STEP_S, mark)

    # backup (m2) never went down, whatever happened to the other two
    assert stack.watcher is not None
    for topic, payload, _, _ in stack.watcher.messages[mark:]:
        if topic == f"{stack.topic}/health/backup":
            assert json.loads(payload)["status"] != "down", payload
        if topic == f"{stack.topic}/modems/m2":
            assert json.loads(payload)["online"] is True, payload

    doc = await asyncio.to_thread(modem_list, stack.socket)
    entries = {e["id"]: e for e in doc["entries"]}
    assert entries["m2"]["port"] == stack.emulator.modem("m2")["port"]
    assert entries["m0"]["device"] is not None
    await stack.control("clear", modem="m1")
