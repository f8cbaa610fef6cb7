"""Retained sibling trees for the watch tests and bench: what a daemon would publish."""

from __future__ import annotations

import json
import zlib
from typing import Any

import aiomqtt

BASE = "esim-agent"


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
