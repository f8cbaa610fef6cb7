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


async def test_watch_json_with_the_daemons_config_shows_the_daemon(tmp_path: Path) -> None:
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

        # SIGKILL the daemon: the snapshot shows its Last Will as an alert.
        mark = stack.mark()
        await stack.stop_daemon(signal.SIGKILL)
        assert stack.watcher is not None
        await stack.watcher.wait_for(
            f"{stack.topic}/availability", lambda p: p == b"offline", STEP_S, mark
        )
        (device,) = (await watch_json(stack.config_path))["devices"]
        assert device["availability"] == "offline"
        assert {"kind": "offline", "subject": device["device_id"], "detail": "Last Will"} in (
            device["alerts"]
        )
    finally:
        await stack.close()
