"""Home Assistant MQTT discovery configs for the agent's main entities; pure functions."""

from __future__ import annotations

from typing import Any

from agent import __version__
from agent.mqtt.topics import Topics, discovery_topic, object_id

DiscoveryConfig = tuple[str, dict[str, Any]]


def _device_block(topics: Topics) -> dict[str, Any]:
    """The `device` block shared by every entity so Home Assistant groups them."""
    return {
        "identifiers": [object_id("esim_agent", topics.device_id)],
        "name": f"esim-agent {topics.device_id}",
        "manufacturer": "esim-agent",
        "model": "connectivity agent",
        "sw_version": __version__,
    }


def _entity(
    topics: Topics,
    prefix: str,
    *,
    component: str,
    oid: str,
    name: str,
    state_topic: str,
    template: str,
    extra: dict[str, Any],
) -> DiscoveryConfig:
    """One discovery config with availability wired to our Last Will."""
    config: dict[str, Any] = {
        "name": name,
        "unique_id": oid,
        "object_id": oid,
        "device": _device_block(topics),
        "availability_topic": topics.availability,
        "payload_available": "online",
        "payload_not_available": "offline",
        "state_topic": state_topic,
        "value_template": template,
        **extra,
    }
    return discovery_topic(prefix, component, oid), config


def device_configs(topics: Topics, prefix: str) -> list[DiscoveryConfig]:
    """Configs for the device-wide entities: active layer, active profile, connectivity."""
    dev = topics.device_id
    return [
        _entity(
            topics,
            prefix,
            component="sensor",
            oid=object_id(dev, "active_layer"),
            name="Active layer",
            state_topic=topics.state,
            template="{{ value_json.active_layer }}",
            extra={"icon": "mdi:layers-triple"},
        ),
        _entity(
            topics,
            prefix,
            component="sensor",
            oid=object_id(dev, "active_profile"),
            name="Active profile",
            state_topic=topics.state,
            template="{{ value_json.active_profile }}",
            extra={"icon": "mdi:sim"},
        ),
        _entity(
            topics,
            prefix,
            component="binary_sensor",
            oid=object_id(dev, "connectivity"),
            name="Connectivity",
            state_topic=topics.state,
            template="{{ 'ON' if value_json.connectivity else 'OFF' }}",
            extra={"device_class": "connectivity"},
        ),
    ]


def modem_configs(topics: Topics, prefix: str, modem_id: str) -> list[DiscoveryConfig]:
    """Configs for one modem's signal (RSSI dBm) and registration sensors."""
    dev = topics.device_id
    return [
        _entity(
            topics,
            prefix,
            component="sensor",
            oid=object_id(dev, modem_id, "signal"),
            name=f"{modem_id} signal",
            state_topic=topics.modem(modem_id),
            template="{{ value_json.signal.rssi_dbm }}",
            extra={
                "device_class": "signal_strength",
                "unit_of_measurement": "dBm",
                "state_class": "measurement",
            },
        ),
        _entity(
            topics,
            prefix,
            component="sensor",
            oid=object_id(dev, modem_id, "registration"),
            name=f"{modem_id} registration",
            state_topic=topics.modem(modem_id),
            template="{{ value_json.registration.state }}",
            extra={"icon": "mdi:radio-tower"},
        ),
    ]
