"""The plan manager's intake: hostile or foreign messages are ignored (logged once), a sibling's
record is remembered in the ledger, and the duty follows availability and the clock."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from agent.config import Config, parse_config
from agent.daemon.planmanager import PlanManager, duty_filters
from agent.daemon.publish import StatePublisher
from agent.daemon.usage import UsageTracker
from agent.usage.store import UsageStore

ICCID = "89000000000000000011"
T0 = 1_717_200_000.0  # 2024-06-01T00:00:00Z


def config(tmp_path: Path) -> Config:
    data: dict[str, Any] = {
        "device_id": "watch",
        "state_dir": str(tmp_path),
        "mqtt": {"enabled": True},
        "usage": {
            "pools": [
                {
                    "name": "team",
                    "members": [ICCID],
                    "quota_bytes": 1000,
                    "devices": ["phone", "tablet"],
                    "manager": "phone",
                    "manager_takeover": 10,
                }
            ]
        },
    }
    return parse_config(data)


async def test_hostile_messages_change_nothing_and_records_are_remembered(
    tmp_path: Path,
) -> None:
    cfg = config(tmp_path)
    assert duty_filters(cfg) == [
        "esim-agent/phone/availability",
        "esim-agent/tablet/availability",
        "esim-agent/+/usage/pool/team/alerts",
    ]
    tracker = UsageTracker(UsageStore(tmp_path / "usage.db"), lambda _: None, clock=lambda: T0)
    tracker.apply_config(cfg.usage, cfg.device_id)
    now = [100.0]
    plan = PlanManager(cfg, tracker, StatePublisher(lambda: None), lambda: True, lambda: now[0])
    hostile = [
        ("esim-agent/phone/availability", b"maybe"),
        ("esim-agent/stranger/availability", b"offline"),
        ("esim-agent/stranger/usage/pool/team/alerts", b'{"pool":"team"}'),
        ("esim-agent/tablet/usage/pool/team/alerts", b"\xff" * 10_000),
        (
            "esim-agent/tablet/usage/pool/team/alerts",
            b'{"pool":"team","device":"phone","period":"2024-06","thresholds":[50]}',
        ),  # names another device than its topic
        ("esim-agent/tablet/usage/pool/other/alerts", b"{}"),
        ("esim-agent/tablet/usage/pool/team/alerts/x", b"{}"),
        ("elsewhere/tablet/usage/pool/team/alerts", b"{}"),
    ]
    for topic, payload in hostile:
        plan.on_message(topic, payload)
    assert await plan.step() is not None  # nothing heard of the phone: wait for the takeover
    assert plan.holders == {"team": "phone"}
    assert tracker.announcements("team", "2024-06") == {}

    plan.on_message(
        "esim-agent/phone/usage/pool/team/alerts",
        b'{"pool":"team","device":"phone","period":"2024-06","thresholds":[50,75]}',
    )
    pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    await asyncio.gather(*pending)
    assert tracker.announcements("team", "2024-06") == {50: ["phone"], 75: ["phone"]}

    # The phone's Last Will: the watch takes over only once the takeover period has passed.
    plan.on_message("esim-agent/phone/availability", b"offline")
    now[0] += 9.9
    await plan.step()
    assert plan.holders == {"team": "phone"}
    now[0] += 0.1
    await plan.step()
    assert plan.holders == {"team": "watch"}
    plan.on_message("esim-agent/phone/availability", b"online")
    await plan.step()
    assert plan.holders == {"team": "phone"}
    await tracker.close()


def test_without_mqtt_nobody_shares_the_duty(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    cfg.mqtt.enabled = False
    assert duty_filters(cfg) == []
