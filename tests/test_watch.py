"""`esim-agent watch`: the --json snapshot against a real Mosquitto, and the live view in tmux."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import pytest

from agent.watch.fleet import Fleet, signal_bars
from tests.mosquitto import MosquittoBroker
from tests.watch_fleet import BASE, device_tree

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "agent"]
DEADLINE_S = 20.0

DEVICE_KEYS = {
    "device_id",
    "availability",
    "connectivity",
    "active_layer",
    "active_profile",
    "updated_at",
    "modems",
    "layers",
    "usage",
    "pools",
    "last_transition",
    "alerts",
}


@pytest.fixture
def broker() -> Iterator[MosquittoBroker]:
    with MosquittoBroker() as b:
        yield b


def publish(broker: MosquittoBroker, *items: tuple[str, bytes]) -> None:
    async def go() -> None:
        async with aiomqtt.Client(broker.host, broker.port) as client:
            for topic, payload in items:
                await client.publish(topic, payload, qos=1, retain=True, timeout=10)

    asyncio.run(go())


def seed(broker: MosquittoBroker) -> None:
    """phone healthy, watch weak and near its quota with a transition, tablet dead (Last Will)."""
    trees = {**device_tree("phone"), **device_tree("watch", rssi=-99, used=950_000_000)}
    transition = {
        "kind": "failover",
        "outcome": "switched",
        "from_layer": "primary",
        "to_layer": "backup",
        "timings_ms": {
            "detect_to_decide": 12.0,
            "decide_to_switch": 800.0,
            "switch_to_verify": 300.0,
            "total": 1112.0,
        },
    }
    trees[f"{BASE}/watch/transition"] = json.dumps(transition).encode()
    trees[f"{BASE}/tablet/availability"] = b"offline"
    # Hostile or broken siblings: none of these may crash the view or blank the others.
    trees[f"{BASE}/tablet/state"] = b"{not json"
    trees[f"{BASE}/phone/health/backup"] = b'{"layer": 7}'
    trees[f"{BASE}/forger/state"] = json.dumps(
        {"device_id": "phone", "connectivity": False}
    ).encode()
    trees[f"{BASE}/watch/modems/m2"] = b"\xff\xfe"
    publish(broker, *trees.items())


def run_json(broker: MosquittoBroker, *extra: str) -> tuple[int, dict[str, object]]:
    proc = subprocess.run(
        [*CLI, "watch", "--broker", f"mqtt://{broker.host}:{broker.port}", "--json", *extra],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )
    return proc.returncode, json.loads(proc.stdout)


def test_json_snapshot_has_every_device_in_the_documented_shape(broker: MosquittoBroker) -> None:
    seed(broker)
    code, snap = run_json(broker)
    assert code == 0
    assert set(snap) == {
        "base_topic",
        "broker",
        "taken_at",
        "complete",
        "settled",
        "rejected",
        "devices",
    }
    assert snap["complete"] is True
    # It knew the retained state was all in by its own marker's echo, not by a silence.
    assert snap["settled"] == "marker"
    assert snap["rejected"] == 4
    devices = {d["device_id"]: d for d in snap["devices"]}  # type: ignore[attr-defined]
    assert sorted(devices) == ["forger", "phone", "tablet", "watch"]
    for d in devices.values():
        assert set(d) == DEVICE_KEYS
    phone, watch, tablet = devices["phone"], devices["watch"], devices["tablet"]
    assert phone["availability"] == "online"
    assert phone["connectivity"] is True
    assert phone["active_layer"] == "primary"
    assert phone["modems"][0]["signal_bars"] == 4
    assert watch["modems"] == [
        {
            "id": "m1",
            "online": True,
            "signal_bars": 1,
            "rssi_dbm": -99,
            "rsrp_dbm": None,
            "registration": "home",
            "operator": "Test Net",
        }
    ]
    assert phone["layers"][0] == {
        "name": "primary",
        "role": "primary",
        "health": "up",
        "latency_ms": 41.5,
        "active": True,
    }
    assert watch["usage"][0]["percent"] == 95.0
    assert watch["pools"][0]["name"] == "family"
    assert watch["last_transition"]["timings_ms"]["total"] == 1112.0
    assert {"kind": "quota", "subject": watch["usage"][0]["iccid"], "detail": "90% of 2026-12"} in (
        watch["alerts"]
    )
    assert tablet["availability"] == "offline"
    assert tablet["connectivity"] is None
    assert {"kind": "offline", "subject": "tablet", "detail": "Last Will"} in tablet["alerts"]
    # A state naming another device under "forger/" is ignored, not believed.
    assert devices["forger"]["connectivity"] is None


def test_json_reports_an_unreachable_broker_as_an_error() -> None:
    from tests.mosquitto import free_port

    proc = subprocess.run(
        [*CLI, "watch", "--broker", f"mqtt://127.0.0.1:{free_port()}", "--json", "--timeout", "3"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )
    assert proc.returncode == 1
    assert json.loads(proc.stdout)["error"]["code"] == "broker"


def test_bad_broker_url_is_a_config_error() -> None:
    proc = subprocess.run(
        [*CLI, "watch", "--broker", "http://x", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )
    assert proc.returncode == 78
    assert json.loads(proc.stdout)["error"]["code"] == "config"


def test_fleet_events_give_the_last_transition_and_quota_alerts() -> None:
    fleet = Fleet(BASE)
    event = {
        "type": "transition",
        "at": "2026-12-06T03:00:00Z",
        "data": {"kind": "failback", "outcome": "switched", "timings_ms": {"total": 5.0}},
    }
    assert fleet.ingest(f"{BASE}/van/events", json.dumps(event).encode())
    alert = {"type": "quota_alert", "data": {"subject": "pool:fam", "threshold": 75, "period": "p"}}
    assert fleet.ingest(f"{BASE}/van/events", json.dumps(alert).encode())
    assert not fleet.ingest(f"{BASE}/van/events", b"[1, 2]")
    van = fleet.snapshot(broker="b", complete=True)["devices"][0]
    assert van["last_transition"]["kind"] == "failback"
    assert {"kind": "quota", "subject": "pool:fam", "detail": "75% of p"} in van["alerts"]
    # A deleted retained topic (empty payload) removes what it named.
    assert fleet.ingest(f"{BASE}/van/usage/123", b'{"iccid":"1","period":"p","total_bytes":1}')
    assert fleet.ingest(f"{BASE}/van/usage/123", b"")
    assert fleet.snapshot(broker="b", complete=True)["devices"][0]["usage"] == []


@pytest.mark.parametrize(
    ("rssi", "rsrp", "bars"),
    [(None, None, None), (-113, None, 0), (-95, None, 2), (-51, None, 4), (-51, -121, 0)],
)
def test_signal_bars(rssi: int | None, rsrp: float | None, bars: int | None) -> None:
    assert signal_bars(rssi, rsrp) == bars


# ------------------------------------------------------------------------- the live view


class Tmux:
    """One detached tmux server of our own (socket in the test's temp dir), so nothing touches
    the user's and nothing is left behind."""

    def __init__(self, socket: Path) -> None:
        self.socket = str(socket)

    def __call__(self, *args: str) -> str:
        # The pane's own size must decide the layout, not a COLUMNS inherited from the runner.
        env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
        out = subprocess.run(
            ["tmux", "-S", self.socket, *args],
            capture_output=True,
            text=True,
            timeout=10,
            env=env,
            check=False,
        )
        return out.stdout

    def wait_screen(self, predicate: object, what: str) -> str:
        deadline = time.monotonic() + DEADLINE_S
        screen = ""
        while time.monotonic() < deadline:
            screen = self("capture-pane", "-p", "-t", "w")
            if callable(predicate) and predicate(screen):
                return screen
            # capture-pane has nothing to wait on: poll it briefly until the deadline.
            time.sleep(0.1)
        raise AssertionError(f"{what} never appeared; last screen:\n{screen}")


@pytest.fixture
def tmux(tmp_path: Path) -> Iterator[Tmux]:
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed")
    t = Tmux(tmp_path / "tmux.sock")
    yield t
    t("kill-server")


def test_live_view_in_a_real_terminal_shows_every_device_and_quits_on_ctrl_c(
    broker: MosquittoBroker, tmux: Tmux, tmp_path: Path
) -> None:
    seed(broker)
    status = tmp_path / "status"
    cmd = (
        " ".join([*CLI, "watch", "--broker", f"mqtt://{broker.host}:{broker.port}"])
        + f"; echo $? > {status}; sleep 600"
    )
    tmux(
        "new-session", "-d", "-s", "w", "-x", "200", "-y", "50",
        "-e", f"PYTHONPATH={ROOT}", "-c", str(ROOT), cmd,
    )  # fmt: skip
    screen = tmux.wait_screen(
        lambda s: all(d in s for d in ("phone", "watch", "tablet")) and "95%" in s, "every device"
    )
    assert "online, connected" in screen
    assert "offline" in screen
    assert "▁▃▅▇ 4/4" in screen  # signal bars
    assert "▁▃▅▇ 1/4" in screen
    assert "██████░░░░ 60%" in screen  # usage bars against quota
    assert "██████████ 95%" in screen
    assert "pool family" in screen
    assert "failover primary→backup switched 1112 ms" in screen
    assert "layer_down backup" in screen

    # A change on the broker is redrawn without any key press.
    publish(
        broker,
        (f"{BASE}/phone/availability", b"offline"),
        (f"{BASE}/laptop/availability", b"online"),
    )
    tmux.wait_screen(lambda s: "laptop" in s and "offline phone" in s, "the change")

    tmux("send-keys", "-t", "w", "C-c")
    deadline = time.monotonic() + DEADLINE_S
    while not (status.exists() and status.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.1)  # the exit status file is all there is to wait on
    assert status.read_text().strip() == "0"
    # The alternate screen is gone: the shell's screen is back, without the table.
    after = tmux("capture-pane", "-p", "-t", "w")
    assert "layer / profile" not in after


def test_fleet_ignores_devices_beyond_its_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("agent.watch.fleet.MAX_DEVICES", 2)
    fleet = Fleet(BASE)
    for name in ("a", "b", "c"):
        fleet.ingest(f"{BASE}/{name}/availability", b"online")
    assert sorted(fleet.devices) == ["a", "b"]
    assert fleet.rejected == 1
    # Known devices still update.
    assert fleet.ingest(f"{BASE}/a/availability", b"offline")
