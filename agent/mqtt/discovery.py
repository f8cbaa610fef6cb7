"""Home Assistant MQTT discovery configs for the agent's main entities; pure functions.

Entity ids: `default_entity_id` (`<component>.<object id>`) is what Home Assistant 2025.10 and
later read (`object_id` stops working in 2026.4); `object_id` stays beside it for releases
before 2025.10, whose discovery schemas drop keys they do not know. With both present 2025.10+
uses `default_entity_id` and logs no deprecation warning.

Availability: every entity follows the agent's Last Will (`<base>/<device>/availability`); a
modem's entities also follow `<base>/<device>/modems/<id>/availability` with
`availability_mode: all`, so an unplugged modem's signal shows as unavailable, not as its
last value.
"""

from __future__ import annotations

from typing import Any

from agent import __version__
from agent.mqtt.topics import Topics, discovery_topic, object_id

DiscoveryConfig = tuple[str, dict[str, Any]]

ONLINE = "online"
OFFLINE = "offline"
#: Who published the configs (Home Assistant shows it and logs it with discovery problems).
ORIGIN = {"name": "esim-agent", "sw_version": __version__}


def _device_block(topics: Topics) -> dict[str, Any]:
    """The `device` block shared by every entity so Home Assistant groups them."""
    return {
        "identifiers": [object_id("esim_agent", topics.device_id)],
        "name": f"esim-agent {topics.device_id}",
        "manufacturer": "esim-agent",
        "model": "connectivity agent",
        "sw_version": __version__,
    }


def _availability(*topics: str) -> dict[str, Any]:
    """Availability on every topic given (all must say online)."""
    return {
        "availability": [
            {"topic": t, "payload_available": ONLINE, "payload_not_available": OFFLINE}
            for t in topics
        ],
        "availability_mode": "all",
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
    availability: tuple[str, ...] = (),
) -> DiscoveryConfig:
    """One discovery config with availability wired to our Last Will (and any further topics)."""
    config: dict[str, Any] = {
        "name": name,
        "unique_id": oid,
        "default_entity_id": f"{component}.{oid}",
        "object_id": oid,
        "device": _device_block(topics),
        "origin": ORIGIN,
        **_availability(topics.availability, *availability),
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
    """Configs for one modem's signal (RSSI dBm) and registration sensors (diagnostics)."""
    dev = topics.device_id
    modem_availability = (topics.modem_availability(modem_id),)
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
                "entity_category": "diagnostic",
            },
            availability=modem_availability,
        ),
        _entity(
            topics,
            prefix,
            component="sensor",
            oid=object_id(dev, modem_id, "registration"),
            name=f"{modem_id} registration",
            state_topic=topics.modem(modem_id),
            template="{{ value_json.registration.state }}",
            extra={"icon": "mdi:radio-tower", "entity_category": "diagnostic"},
            availability=modem_availability,
        ),
    ]
