"""`esim-agent watch` against a real daemon on the emulator (the demo stack): `--json --config`
with the daemon's own config, and the live view in a real terminal (tmux) beside three more
agents published by plain clients."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.demo.stack import DEMO_ICCIDS, DemoStack, mosquitto_available
from tests.watch_fleet import BASE, DEADLINE_S, Tmux, publish, seed

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


# ------------------------------------------------------------------- the live view in tmux


@pytest.fixture
def tmux(tmp_path: Path) -> Iterator[Tmux]:
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed")
    t = Tmux(tmp_path / "tmux.sock")
    yield t
    t("kill-server")


def with_quotas(cfg: dict[str, Any]) -> None:
    """The van's profiles get quotas and a shared pool, so its usage bars have something to fill."""
    usage = cfg.setdefault("usage", {})
    usage["quotas"] = dict.fromkeys(DEMO_ICCIDS, "1 GB")
    usage["pools"] = [{"name": "family", "quota_bytes": "4 GB", "members": list(DEMO_ICCIDS[:2])}]


async def test_live_view_in_a_real_terminal_shows_every_agent_and_quits_on_ctrl_c(
    tmp_path: Path, tmux: Tmux
) -> None:
    stack = DemoStack(tmp_path / "stack", broker="mosquitto", device_id="van", tune=with_quotas)
    await stack.start()
    try:
        await stack.wait_json("state", lambda s: s.get("active_layer") == "primary", STEP_S)
        await stack.wait_json("usage/pool/family", lambda p: p["quota_bytes"] > 0, STEP_S)
        # The van fails over for real: its last transition is what the view must show.
        mark = stack.mark()
        await stack.control("link", modem="m0", state="down")
        moved = await stack.wait_transition(lambda d: d["to_layer"] == "failover", STEP_S, mark)
        assert stack.mosquitto is not None
        await asyncio.to_thread(seed, stack.mosquitto)  # phone, watch, tablet and junk

        status, errors = tmp_path / "status", tmp_path / "stderr"
        cmd = (
            f"{sys.executable} -m agent watch --config {stack.config_path} 2> {errors}"
            f"; echo $? > {status}; sleep 600"
        )
        tmux(
            "new-session", "-d", "-s", "w", "-x", "250", "-y", "60",
            "-c", str(ROOT), "-e", f"PYTHONPATH={ROOT}", cmd,
        )  # fmt: skip

        def everyone(screen: str) -> bool:
            return all(d in screen for d in ("van", "phone", "watch", "tablet")) and (
                "failover primary→failover" in screen
            )

        screen = await asyncio.to_thread(tmux.wait_screen, everyone, "every agent")
        # Availability and Last Will.
        assert "online, connected" in screen
        assert "offline" in screen
        # Signal bars per modem: the publishing clients' and the van's two emulated modems.
        assert "m1 ▁▃▅▇ 4/4" in screen
        assert "m1 ▁▃▅▇ 1/4" in screen
        assert "m0 ▁▃▅▇" in screen
        # Usage bars against the quota and the shared pool, for the van too.
        assert "██████░░░░ 60%" in screen
        assert "██████████ 95%" in screen
        assert "pool family" in screen
        assert "░░░░░░░░░░ 0%" in screen  # the van: a few kB of 1 GB
        assert "/1.0 GB" in screen
        assert "/4.0 GB" in screen
        # Last transitions with their timings and the device's wall-clock time.
        assert "failover primary→backup switched 1112 ms" in screen
        assert "at 03:04:59Z" in screen
        assert f"at {moved['verified_at'][11:19]}Z" in screen
        assert f"{moved['timings_ms']['total']:.0f} ms" in screen
        assert "layer_down backup" in screen

        # A change on the broker is redrawn without any key press.
        await asyncio.to_thread(
            publish,
            stack.mosquitto,
            (f"{BASE}/phone/availability", b"offline"),
            (f"{BASE}/laptop/availability", b"online"),
        )
        await asyncio.to_thread(
            tmux.wait_screen, lambda s: "laptop" in s and "offline phone" in s, "the change"
        )

        tmux("send-keys", "-t", "w", "C-c")
        code = await asyncio.to_thread(read_status, status)
        assert code in ("0", "130")
        # The alternate screen is gone: the shell's screen is back, without the table, and
        # nothing went wrong on the way out.
        after = tmux.screen()
        assert "layer / profile" not in after
        assert "Traceback" not in after
        assert "Traceback" not in errors.read_text()
    finally:
        await stack.close()


def read_status(path: Path) -> str:
    deadline = time.monotonic() + DEADLINE_S
    while not (path.exists() and path.read_text().strip()):
        assert time.monotonic() < deadline, "watch did not exit on Ctrl-C"
        time.sleep(0.1)  # the exit status file is all there is to wait on
    return path.read_text().strip()
