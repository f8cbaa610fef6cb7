"""Home Assistant sees an unplugged modem as unavailable: the real daemon, a real Mosquitto and
the emulator's unplug fault."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.demo.mosquitto import Watcher
from agent.demo.stack import DemoStack, mosquitto_available

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not mosquitto_available(), reason="needs mosquitto (apt install mosquitto)"),
]

STEP_S = 60.0
HA = "homeassistant"


async def test_unplugged_modem_goes_unavailable_with_its_measurements_nulled(
    tmp_path: Path,
) -> None:
    stack = DemoStack(tmp_path / "stack", broker="mosquitto")
    try:
        await stack.start()
        await stack.wait_json("state", lambda s: s.get("active_layer") == "primary", STEP_S)
        assert stack.watcher is not None
        before = await stack.wait_json(
            "modems/m1", lambda m: m["online"] and m["signal"]["rssi_dbm"] is not None, STEP_S
        )
        assert before["registration"]["state"] in ("home", "roaming")
        await stack.watcher.wait_for(
            f"{stack.topic}/modems/m1/availability", lambda p: p == b"online"
        )

        # What Home Assistant is told: the m1 sensors follow the agent's Will AND m1's own topic.
        async with _ha_watcher(stack) as ha:
            cfg = await ha.wait_json(f"{HA}/sensor/demo_m1_signal/config", timeout=STEP_S)
        assert cfg["availability_mode"] == "all"
        assert [a["topic"] for a in cfg["availability"]] == [
            f"{stack.topic}/availability",
            f"{stack.topic}/modems/m1/availability",
        ]
        assert cfg["default_entity_id"] == "sensor.demo_m1_signal"
        assert cfg["entity_category"] == "diagnostic"
        assert cfg["origin"]["name"] == "esim-agent"

        mark = stack.mark()
        await stack.control("unplug", modem="m1")
        await stack.watcher.wait_for(
            f"{stack.topic}/modems/m1/availability", lambda p: p == b"offline", STEP_S, mark
        )
        gone = await stack.wait_json("modems/m1", lambda m: m["online"] is False, STEP_S, mark)
        # No stale measurements under an offline modem.
        assert gone["signal"] == {
            "rssi_dbm": None,
            "ber": None,
            "rsrp_dbm": None,
            "rsrq_db": None,
            "sinr_db": None,
        }
        assert gone["registration"]["state"] == "unknown"
        assert gone["operator"] == {"name": None, "mcc_mnc": None}
        # The agent itself is still online: only m1's entities are unavailable.
        assert stack.watcher.latest(f"{stack.topic}/availability") == b"online"

        mark = stack.mark()
        await stack.control("replug", modem="m1")
        await stack.watcher.wait_for(
            f"{stack.topic}/modems/m1/availability", lambda p: p == b"online", STEP_S, mark
        )
        back = await stack.wait_json(
            "modems/m1", lambda m: m["online"] and m["signal"]["rssi_dbm"] is not None, STEP_S, mark
        )
        assert back["registration"]["state"] in ("home", "roaming", "searching")
    finally:
        await stack.close()


def _ha_watcher(stack: DemoStack) -> Watcher:
    assert stack.address is not None
    return Watcher(stack.address, f"{HA}/#")
