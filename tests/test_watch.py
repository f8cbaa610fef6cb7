"""`esim-agent watch`: the --json snapshot against a real Mosquitto, the Fleet, the live view's frames (the
live view in a real terminal is in test_e2e_watch.py)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

import agent.watch.render
from agent.cli.watch import _live
from agent.mqtt.bridge import MqttSettings
from agent.watch.fleet import Fleet, signal_bars
from tests.mosquitto import MosquittoBroker
from tests.watch_fleet import BASE, device_tree, publish, seed

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "agent"]

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

TRANSITION_KEYS = {
    "id",
    "kind",
    "outcome",
    "from_layer",
    "to_layer",
    "from_profile",
    "to_profile",
    "reason",
    "detected_at",
    "decided_at",
    "switched_at",
    "verified_at",
    "timings_ms",
}


@pytest.fixture
def broker() -> Iterator[MosquittoBroker]:
    with MosquittoBroker() as b:
        yield b


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
    assert set(watch["last_transition"]) == TRANSITION_KEYS
    assert watch["last_transition"]["timings_ms"] == {
        "detect_to_decide": 12.0,
        "decide_to_switch": 800.0,
        "switch_to_verify": 300.0,
        "total": 1112.0,
    }
    assert watch["last_transition"]["verified_at"] == "2026-12-06T03:04:59.212Z"
    assert phone["last_transition"] is None
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


def test_fleet_ignores_devices_beyond_its_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("agent.watch.fleet.MAX_DEVICES", 2)
    fleet = Fleet(BASE)
    for name in ("a", "b", "c"):
        fleet.ingest(f"{BASE}/{name}/availability", b"online")
    assert sorted(fleet.devices) == ["a", "b"]
    assert fleet.rejected == 1
    # Known devices still update.
    assert fleet.ingest(f"{BASE}/a/availability", b"offline")


async def test_live_view_redraws_only_when_what_it_shows_changes(
    broker: MosquittoBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    await asyncio.to_thread(seed, broker)
    # What each frame showed (the snapshot but its clock), in order.
    frames: list[dict[str, Any]] = []
    ingested = [0]
    drawn = asyncio.Condition()
    real_render, real_ingest = agent.watch.render.render, Fleet.ingest

    def counting_render(snapshot: dict[str, Any], problem: str | None = None) -> Any:
        frames.append({k: v for k, v in snapshot.items() if k != "taken_at"})
        asyncio.get_running_loop().create_task(notify())
        return real_render(snapshot, problem)

    def counting_ingest(self: Fleet, topic: str, payload: bytes) -> bool:
        ingested[0] += 1
        asyncio.get_running_loop().create_task(notify())
        return real_ingest(self, topic, payload)

    async def notify() -> None:
        async with drawn:
            drawn.notify_all()

    async def until(predicate: Callable[[], bool]) -> None:
        async with asyncio.timeout(20), drawn:
            await drawn.wait_for(predicate)

    # No coalescing of a burst into one frame: every frame the loop draws is counted.
    monkeypatch.setattr("agent.cli.watch.MIN_FRAME_S", 0.0)
    monkeypatch.setattr(agent.watch.render, "render", counting_render)
    monkeypatch.setattr(Fleet, "ingest", counting_ingest)
    settings = MqttSettings(host=broker.host, port=broker.port, base_topic=BASE)
    console = Console(file=io.StringIO(), force_terminal=True, width=200, height=50)
    view = asyncio.create_task(_live(settings, Fleet(BASE), "b", console))
    try:
        await until(lambda: bool(frames) and len(frames[-1]["devices"]) == 4)
        seen = ingested[0]
        # The phone publishes its whole tree again, unchanged, and the view reads it all...
        phone = list(device_tree("phone").items())
        await asyncio.to_thread(publish, broker, *phone)
        await until(lambda: ingested[0] >= seen + len(phone))
        # ...then one real change.
        await asyncio.to_thread(publish, broker, (f"{BASE}/laptop/availability", b"online"))
        await until(lambda: "laptop" in [d["device_id"] for d in frames[-1]["devices"]])
        # Every frame shows something its predecessor did not: nothing was drawn again for
        # messages that changed nothing, nor on a timer.
        repeated = [i for i in range(1, len(frames)) if frames[i] == frames[i - 1]]
        assert repeated == []
    finally:
        view.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await view
