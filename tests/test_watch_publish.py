"""The daemon's retained last transition (agent/daemon/publish.py) across a change of broker.

Real MqttBridge objects, not connected: what they would send is their retained snapshot.
"""

from __future__ import annotations

from typing import Any

from agent.daemon.publish import StatePublisher
from agent.mqtt.bridge import MqttBridge, MqttSettings

RECORD: dict[str, Any] = {
    "id": "van-1",
    "kind": "failover",
    "outcome": "switched",
    "from_layer": "primary",
    "to_layer": "failover",
    "verified_at": "2026-12-06T03:04:59.212Z",
    "timings_ms": {"total": 812.0},
}


def bridge(port: int) -> MqttBridge:
    return MqttBridge(MqttSettings(host="127.0.0.1", port=port, discovery_prefix=None), "van")


def test_the_last_finished_transition_is_retained_and_follows_a_new_bridge() -> None:
    current: list[MqttBridge | None] = [None]
    publisher = StatePublisher(lambda: current[0])
    # A transition while MQTT is off (no bridge) is still the last one once it is on.
    publisher.event("transition", RECORD)
    current[0] = first = bridge(1883)
    publisher.forget()
    assert first.snapshot()["transition"] == RECORD

    later = {**RECORD, "id": "van-2", "kind": "failback"}
    publisher.event("transition_started", {**later, "outcome": "pending"})
    assert first.snapshot()["transition"] == RECORD  # a started one is not finished
    publisher.event("transition", later)
    assert first.snapshot()["transition"] == later

    # A reload points the daemon at another broker: the new bridge has it before any poll.
    current[0] = second = bridge(8883)
    publisher.forget()
    assert second.snapshot()["transition"] == later
