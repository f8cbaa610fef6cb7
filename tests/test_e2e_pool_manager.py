"""The plan manager's duty, end to end: three real daemons on one real Mosquitto, and again
with the phone on a travel router's Mosquitto bridged to the others' ("Beyond one broker").

"phone" is the pool's manager, "watch" and "tablet" its successors in that order; "van" is a
fourth device (a plain MQTT client here) whose share pushes the pool over its thresholds. The
manager announces each crossing once; SIGKILL it (its Last Will fires) and after the takeover
period the watch announces a new crossing once and none of the old ones; the phone comes back,
takes the duty back and repeats nothing.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from agent.demo.mosquitto import MosquittoBroker, Watcher
from agent.demo.stack import mosquitto_available
from agent.usage.store import period_of
from tests.mosquitto_lab import ConfiguredMosquitto

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not mosquitto_available(), reason="needs mosquitto"),
]

BASE = "esim-agent"
DEVICES = ("phone", "watch", "tablet")
ICCID = "89000000000000000011"
QUOTA = 10_000
TAKEOVER_S = 3.0
STEP_S = 60.0


def config_text(device: str, port: int, workdir: Path) -> str:
    others = [d for d in (*DEVICES, "van") if d != device]
    return f"""
device_id = "{device}"
state_dir = "{workdir / device / "state"}"
[mqtt]
enabled = true
host = "127.0.0.1"
port = {port}
[control]
socket = "{workdir / device / "control.sock"}"
[discovery]
source = "none"
[usage]
alert_thresholds = [50, 75, 90, 100]
[[usage.pools]]
name = "team"
members = ["{ICCID}"]
quota_bytes = {QUOTA}
devices = {json.dumps(others)}
manager = "phone"
successors = ["watch", "tablet"]
manager_takeover = {TAKEOVER_S}
"""


class Fleet:
    """The three daemons as real processes, each on its broker (the phone's may be bridged to
    the others')."""

    def __init__(self, brokers: dict[str, MosquittoBroker], workdir: Path) -> None:
        self.brokers = brokers
        self.workdir = workdir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, device: str) -> None:
        (self.workdir / device).mkdir(parents=True, exist_ok=True)
        path = self.workdir / device / "agent.toml"
        path.write_text(config_text(device, self.brokers[device].port, self.workdir))
        with (self.workdir / device / "daemon.log").open("ab") as log:
            self.procs[device] = subprocess.Popen(
                [sys.executable, "-m", "agent", "run", "--config", str(path)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )

    def kill(self, device: str) -> None:
        proc = self.procs.pop(device)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)

    def stop_all(self) -> None:
        for proc in self.procs.values():
            proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(15)
        self.procs.clear()


def bridge_to(home: MosquittoBroker) -> list[str]:
    """A travel router's bridge home, as docs/bridge.md has it (loopback, no TLS here)."""
    return [
        "connection home",
        f"address {home.host}:{home.port}",
        "bridge_protocol_version mqttv50",
        "try_private true",
        "cleansession false",
        "notifications true",
        "notification_topic bridges/van/state",
        "restart_timeout 1 2",
        f"topic {BASE}/# both 1",
    ]


@pytest.fixture(params=["one broker", "bridged"])
async def brokers(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[dict[str, MosquittoBroker]]:
    """Which broker each device talks to; "van" is the phone's (and the van client's)."""
    home = ConfiguredMosquitto(tmp_path / "home", ["allow_anonymous true"])
    started = [home]
    try:
        home.workdir.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(home.start)
        van = home
        if request.param == "bridged":
            van = ConfiguredMosquitto(tmp_path / "van", ["allow_anonymous true", *bridge_to(home)])
            van.workdir.mkdir(parents=True, exist_ok=True)
            await asyncio.to_thread(van.start)
            started.append(van)
            # The bridge is up before anything is published (else it waits in its queue).
            async with Watcher(home, "bridges/#") as w:
                await w.wait_for("bridges/van/state", lambda p: p == b"1", STEP_S)
        yield {"phone": van, "van": van, "watch": home, "tablet": home}
    finally:
        for broker in started:
            await asyncio.to_thread(broker.close)


@pytest.fixture
async def fleet(
    brokers: dict[str, MosquittoBroker], tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[Fleet]:
    f = Fleet(brokers, tmp_path)
    yield f
    f.stop_all()
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        for device in DEVICES:
            log = tmp_path / device / "daemon.log"
            if log.exists():
                lines = log.read_text(errors="replace").splitlines()
                sys.stderr.write(f"--- {device} (last 40 of {len(lines)})\n")
                sys.stderr.write("\n".join(lines[-40:]) + "\n")


def event(
    device: str, kind: str, check: Callable[[dict[str, Any]], bool] = lambda _: True
) -> tuple[str, Callable[[Any], bool]]:
    def ok(e: Any) -> bool:
        return isinstance(e, dict) and e.get("type") == kind and check(e.get("data", {}))

    return f"{BASE}/{device}/events", ok


def pool_alerts(watcher: Watcher) -> list[tuple[str, int]]:
    """Every pool quota_alert seen, as (device that published it, threshold)."""
    out = []
    for topic, payload, _, _ in watcher.messages:
        parts = topic.split("/")
        if len(parts) != 3 or parts[2] != "events":
            continue
        e = json.loads(payload)
        if e.get("type") == "quota_alert" and e["data"]["subject"] == "pool:team":
            out.append((parts[1], int(e["data"]["threshold"])))
    return out


async def van_uses(client: aiomqtt.Client, used: int) -> None:
    share = {"period": period_of(time.time()), "local_bytes": used}
    await client.publish(
        f"{BASE}/van/usage/pool/team", json.dumps(share).encode(), qos=1, retain=True
    )


async def test_the_manager_announces_and_a_successor_takes_over_without_repeats(
    brokers: dict[str, MosquittoBroker], fleet: Fleet
) -> None:
    # Watched from the watch's broker: across the bridge, the phone's side arrives from afar.
    home, there = brokers["watch"], brokers["van"]
    async with (
        Watcher(home, f"{BASE}/#") as watcher,
        aiomqtt.Client(there.host, there.port, protocol=aiomqtt.ProtocolVersion.V5) as van,
    ):
        for device in DEVICES:
            fleet.start(device)
        await watcher.wait_json(*event("phone", "pool_manager_duty"), timeout=STEP_S)
        for device in DEVICES:
            await watcher.wait_for(f"{BASE}/{device}/availability", lambda p: p == b"online")

        # The manager announces each crossing once; the others see the same total and stay quiet.
        await van_uses(van, 5_500)
        await watcher.wait_json(
            *event("phone", "quota_alert", lambda d: d["threshold"] == 50), timeout=STEP_S
        )
        await van_uses(van, 7_600)
        await watcher.wait_json(
            *event("phone", "quota_alert", lambda d: d["threshold"] == 75), timeout=STEP_S
        )
        # Everyone counted the van's 7,600 (their shares say so) before the manager dies.
        for device in DEVICES:
            await watcher.wait_json(
                f"{BASE}/{device}/usage/pool/team",
                lambda p: p["remote_bytes"].get("van") == 7_600,
                STEP_S,
            )
        await watcher.wait_json(
            f"{BASE}/phone/usage/pool/team/alerts", lambda r: r["thresholds"] == [50, 75], STEP_S
        )

        # SIGKILL: the broker publishes the manager's Last Will.
        mark = len(watcher.messages)
        fleet.kill("phone")
        await watcher.wait_for(f"{BASE}/phone/availability", lambda p: p == b"offline", since=mark)
        died = time.monotonic()
        takeover = await watcher.wait_json(
            *event("watch", "pool_manager_takeover"), timeout=STEP_S, since=mark
        )
        # Not at once: the watch waited out the takeover period (a lower bound with room for a
        # loaded machine; the exact timing is in test_pool_plan.py).
        assert time.monotonic() - died >= TAKEOVER_S - 1.0
        assert takeover["data"]["offline"] == ["phone"]

        # A new crossing: the watch announces it once, and none of the phone's.
        await van_uses(van, 9_200)
        alert = await watcher.wait_json(
            *event("watch", "quota_alert", lambda d: d["threshold"] == 90), timeout=STEP_S
        )
        assert alert["data"]["by"] == "watch"
        assert alert["data"]["used_bytes"] == 9_200
        await watcher.wait_json(
            f"{BASE}/watch/usage/pool/team/alerts", lambda r: r["thresholds"] == [90], STEP_S
        )

        # The manager comes back (same state dir): the duty returns to it, and what the watch
        # announced is not repeated; the next crossing is the phone's again.
        mark = len(watcher.messages)
        fleet.start("phone")
        await watcher.wait_json(*event("phone", "pool_manager_duty"), timeout=STEP_S, since=mark)
        await van_uses(van, 10_000)
        await watcher.wait_json(
            *event("phone", "quota_alert", lambda d: d["threshold"] == 100), timeout=STEP_S
        )
        for device in DEVICES:
            await watcher.wait_json(
                f"{BASE}/{device}/usage/pool/team",
                lambda p: p["remote_bytes"].get("van") == 10_000,
                STEP_S,
            )

    # Each threshold exactly once across the whole fleet, by whoever held the duty then.
    assert pool_alerts(watcher) == [("phone", 50), ("phone", 75), ("watch", 90), ("phone", 100)]
