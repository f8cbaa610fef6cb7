"""Retained sibling trees for the watch tests and bench (what a daemon would publish), and a
tmux server of the test's own for the live view in a real terminal."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import aiomqtt

BASE = "esim-agent"
DEADLINE_S = 20.0


def device_tree(
    device: str, *, rssi: int = -71, used: int = 600_000_000, quota: int = 1_000_000_000
) -> dict[str, bytes]:
    """Retained topic -> payload of one healthy device with a modem, two layers and usage."""
    iccid = "8944" + f"{zlib.crc32(device.encode()) % 10**14:014d}" + "12"
    percent = round(used * 100 / quota, 2)
    root = f"{BASE}/{device}"

    def js(value: Any) -> bytes:
        return json.dumps(value).encode()

    return {
        f"{root}/availability": b"online",
        f"{root}/state": js(
            {
                "device_id": device,
                "active_layer": "primary",
                "active_profile": iccid,
                "connectivity": True,
                "updated_at": "2026-12-06T03:00:00.000Z",
            }
        ),
        f"{root}/modems/m1": js(
            {
                "id": "m1",
                "port": "/dev/ttyUSB2",
                "online": True,
                "signal": {"rssi_dbm": rssi},
                "registration": {"state": "home", "act": "lte"},
                "operator": {"name": "Test Net", "mcc_mnc": "00101"},
            }
        ),
        f"{root}/layers": js(
            {
                "layers": [
                    {"name": "primary", "role": "primary", "health": "up", "active": True},
                    {"name": "backup", "role": "failover", "health": "down", "active": False},
                ],
                "active": "primary",
            }
        ),
        f"{root}/health/primary": js({"layer": "primary", "status": "up", "latency_ms": 41.5}),
        f"{root}/usage/{iccid}": js(
            {
                "iccid": iccid,
                "period": "2026-12",
                "rx_bytes": used,
                "tx_bytes": 0,
                "total_bytes": used,
                "quota_bytes": quota,
                "percent": percent,
            }
        ),
        f"{root}/usage/pool/family": js(
            {
                "name": "family",
                "period": "2026-12",
                "local_bytes": used,
                "remote_bytes": {},
                "total_bytes": used,
                "quota_bytes": 4 * quota,
                "percent": round(percent / 4, 2),
            }
        ),
    }


async def publish_retained(client: aiomqtt.Client, tree: dict[str, bytes]) -> None:
    """Publish every topic of `tree` retained, QoS 1 (each acknowledged)."""
    for topic, payload in tree.items():
        await client.publish(topic, payload, qos=1, retain=True, timeout=10)


class Broker(Protocol):
    host: str
    port: int


def publish(broker: Broker, *items: tuple[str, bytes]) -> None:
    """Publish each (topic, payload) retained, QoS 1, from one short-lived client."""

    async def go() -> None:
        async with aiomqtt.Client(broker.host, broker.port) as client:
            for topic, payload in items:
                await client.publish(topic, payload, qos=1, retain=True, timeout=10)

    asyncio.run(go())


#: The transition the seeded watch device shows.
SEEDED_TRANSITION = {
    "id": "watch-1",
    "kind": "failover",
    "outcome": "switched",
    "from_layer": "primary",
    "to_layer": "backup",
    "verified_at": "2026-12-06T03:04:59.212Z",
    "timings_ms": {
        "detect_to_decide": 12.0,
        "decide_to_switch": 800.0,
        "switch_to_verify": 300.0,
        "total": 1112.0,
    },
}


def seed(broker: Broker) -> None:
    """phone healthy, watch weak and near its quota with a transition, tablet dead (Last Will),
    plus hostile or broken siblings: none of these may crash the view or blank the others."""
    trees = {**device_tree("phone"), **device_tree("watch", rssi=-99, used=950_000_000)}
    trees[f"{BASE}/watch/transition"] = json.dumps(SEEDED_TRANSITION).encode()
    trees[f"{BASE}/tablet/availability"] = b"offline"
    trees[f"{BASE}/tablet/state"] = b"{not json"
    trees[f"{BASE}/phone/health/backup"] = b'{"layer": 7}'
    trees[f"{BASE}/forger/state"] = json.dumps(
        {"device_id": "phone", "connectivity": False}
    ).encode()
    trees[f"{BASE}/watch/modems/m2"] = b"\xff\xfe"
    publish(broker, *trees.items())


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

    def screen(self) -> str:
        """The pane's text as `tmux capture-pane -p` prints it."""
        return self("capture-pane", "-p", "-t", "w")

    def wait_screen(self, predicate: Callable[[str], bool], what: str) -> str:
        deadline = time.monotonic() + DEADLINE_S
        screen = ""
        while time.monotonic() < deadline:
            screen = self.screen()
            if predicate(screen):
                return screen
            # capture-pane has nothing to wait on: poll it briefly until the deadline.
            time.sleep(0.1)
        raise AssertionError(f"{what} never appeared; last screen:\n{screen}")
