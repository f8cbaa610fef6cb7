"""`esim-agent watch --json --config FILE` against a real daemon on the emulator (the demo stack)."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from agent.demo.stack import DEMO_ICCIDS, DemoStack, mosquitto_available

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not mosquitto_available(), reason="needs mosquitto (apt install mosquitto)"),
]

ROOT = Path(__file__).resolve().parent.parent
STEP_S = 60.0


async def watch_json(config: Path) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent", "watch", "--json", "--config", str(config),
        cwd=ROOT, stdout=subprocess.PIPE,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), STEP_S)
    assert proc.returncode == 0
    snap: dict[str, Any] = json.loads(out)
    return snap


async def test_watch_json_with_the_daemons_config_shows_the_daemon_and_its_last_transition(
    tmp_path: Path,
) -> None:
    stack = DemoStack(tmp_path / "stack", broker="mosquitto")
    await stack.start()
    try:
        await stack.wait_json("state", lambda s: s.get("active_layer") == "primary", STEP_S)
        await stack.wait_json("health/primary", lambda h: h.get("status") == "up", STEP_S)
        snap = await watch_json(stack.config_path)
        assert snap["complete"] is True
        (device,) = snap["devices"]
        assert device["device_id"] == stack.topic.rsplit("/", 1)[1]
        assert device["availability"] == "online"
        assert device["connectivity"] is True
        assert device["active_layer"] == "primary"
        assert device["active_profile"] == DEMO_ICCIDS[0]
        assert [x["name"] for x in device["layers"]] == ["primary", "failover", "emergency"]
        assert [x["active"] for x in device["layers"]] == [True, False, False]
        assert device["modems"], "the emulator's modems are listed"
        assert all(m["signal_bars"] is not None for m in device["modems"] if m["online"])

        # The initial transition was retained: a viewer arriving now still sees it.
        assert device["last_transition"]["kind"] == "initial"

        # A failover: the daemon keeps its record retained on `<base>/<device>/transition`,
        # and a snapshot taken afterwards (subscribing after the event went by) carries it.
        mark = stack.mark()
        await stack.control("link", modem="m0", state="down")
        event = await stack.wait_transition(lambda d: d["to_layer"] == "failover", STEP_S, mark)
        retained = await stack.wait_json("transition", lambda t: t["id"] == event["id"], STEP_S)
        assert retained == event
        (device,) = (await watch_json(stack.config_path))["devices"]
        shown = device["last_transition"]
        assert shown["id"] == event["id"]
        assert (shown["kind"], shown["from_layer"], shown["to_layer"], shown["outcome"]) == (
            "failover",
            "primary",
            "failover",
            "switched",
        )
        assert (shown["from_profile"], shown["to_profile"]) == DEMO_ICCIDS[:2]
        assert "primary is down" in shown["reason"]
        # Wall-clock times of the device and its own measured durations: both readable here.
        assert shown["detected_at"] <= shown["switched_at"] <= shown["verified_at"]
        assert shown["verified_at"].endswith("Z")
        timings = shown["timings_ms"]
        assert timings["total"] == event["timings_ms"]["total"]
        assert timings["total"] >= timings["decide_to_switch"] > 0

        # SIGKILL the daemon: the snapshot shows its Last Will as an alert.
        mark = stack.mark()
        await stack.stop_daemon(signal.SIGKILL)
        assert stack.watcher is not None
        await stack.watcher.wait_for(
            f"{stack.topic}/availability", lambda p: p == b"offline", STEP_S, mark
        )
        (device,) = (await watch_json(stack.config_path))["devices"]
        assert device["availability"] == "offline"
        assert device["last_transition"]["id"] == event["id"]  # retained beyond the daemon
        assert {"kind": "offline", "subject": device["device_id"], "detail": "Last Will"} in (
            device["alerts"]
        )
    finally:
        await stack.close()
