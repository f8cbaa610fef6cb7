"""The MQTT bridge against a real Mosquitto: retained state, Last Will, discovery, outage, reconnect."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from agent.models import ModemInfo, Registration, Signal, SimStatus
from agent.mqtt.bridge import MqttBridge, MqttSettings
from agent.mqtt.payloads import (
    DeviceState,
    Event,
    HealthState,
    LayerEntry,
    LayersState,
    ModemState,
    ProfileEntry,
    ProfilesState,
)
from tests.mosquitto import MosquittoBroker, Watcher

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def broker() -> Iterator[MosquittoBroker]:
    with MosquittoBroker() as b:
        yield b


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    with MosquittoBroker(tmp_path) as b:
        yield b


@pytest.fixture
def base() -> str:
    return f"test/{uuid.uuid4().hex[:12]}"


def settings_for(broker: MosquittoBroker, base: str, **kw: object) -> MqttSettings:
    values: dict[str, object] = {
        "host": broker.host,
        "port": broker.port,
        "base_topic": base,
        "discovery_prefix": f"{base}/ha",
        "backoff_initial": 0.05,
        "backoff_max": 0.2,
        "connect_timeout": 5.0,
        "publish_timeout": 5.0,
    }
    values.update(kw)
    return MqttSettings(**values)  # type: ignore[arg-type]


async def running(bridge: MqttBridge) -> AsyncIterator[MqttBridge]:
    task = asyncio.create_task(bridge.run())
    try:
        await bridge.wait_connected(10)
        yield bridge
    finally:
        await bridge.close()
        await asyncio.wait_for(task, 10)


def modem_state() -> ModemState:
    info = ModemInfo(
        sim=SimStatus(state="ready", iccid="8944000000000000012"),
        signal=Signal(rssi_dbm=-71),
        registration=Registration(state="home", act="lte"),
    )
    info.identity.imei = "356938035643809"
    return ModemState.from_info(
        "m1", info, port="/dev/pts/3", online=True, eid="89049032" + "0" * 24
    )


async def test_retained_state_is_seen_by_a_later_subscriber(
    broker: MosquittoBroker, base: str
) -> None:
    bridge = MqttBridge(settings_for(broker, base), "dev1")
    root = f"{base}/dev1"
    async for _ in running(bridge):
        bridge.publish_state(
            "state", DeviceState(device_id="dev1", active_layer="primary", connectivity=True)
        )
        bridge.publish_state("modems/m1", modem_state())
        bridge.publish_state(
            "profiles/m1",
            ProfilesState(
                modem="m1", profiles=[ProfileEntry(iccid="8944000000000000012", state="enabled")]
            ),
        )
        bridge.publish_state(
            "layers",
            LayersState(
                layers=[
                    LayerEntry(name="primary", role="primary", modem="m1", health="up", active=True)
                ],
                active="primary",
            ),
        )
        bridge.publish_state(
            "health/primary", HealthState(layer="primary", status="up", latency_ms=41.5)
        )
        await bridge.wait_flushed(10)
        # A subscriber that connects afterwards only sees what the broker retained.
        async with Watcher(broker, f"{root}/#") as w:
            assert (await w.wait_for(f"{root}/availability"))[1] == b"online"
            state = await w.wait_json(f"{root}/state")
            assert state["active_layer"] == "primary"
            assert state["connectivity"] is True
            modem = await w.wait_json(f"{root}/modems/m1")
            assert modem["id"] == "m1"
            assert modem["online"] is True
            assert modem["signal"]["rssi_dbm"] == -71
            assert modem["identity"]["imei"] == "356938035643809"
            profiles = await w.wait_json(f"{root}/profiles/m1")
            assert profiles["profiles"][0]["iccid"] == "8944000000000000012"
            assert set(profiles["profiles"][0]) == {
                "iccid", "isdp_aid", "state", "nickname",
                "service_provider_name", "profile_name", "profile_class",
            }  # fmt: skip
            layers = await w.wait_json(f"{root}/layers")
            assert layers["active"] == "primary"
            assert layers["layers"][0]["active"] is True
            health = await w.wait_json(f"{root}/health/primary")
            assert health["latency_ms"] == 41.5
            assert all(retained for topic, _, retained, _ in w.messages if "/ha/" not in topic)
    async with Watcher(broker, f"{root}/availability") as w:
        assert (await w.wait_for(f"{root}/availability"))[1] == b"offline"


async def test_events_are_not_retained(broker: MosquittoBroker, base: str) -> None:
    bridge = MqttBridge(settings_for(broker, base), "dev1")
    topic = f"{base}/dev1/events"
    async for _ in running(bridge):
        async with Watcher(broker, topic) as w:
            bridge.publish_event(Event(type="layer_switched", data={"from": "a", "to": "b"}))
            event = await w.wait_json(topic)
            assert event["type"] == "layer_switched"
            assert event["data"] == {"from": "a", "to": "b"}
            assert w.messages[0][2] is False
        async with Watcher(broker, f"{base}/dev1/#") as w2:
            await w2.wait_for(f"{base}/dev1/availability")
            assert w2.latest(topic) is None


async def test_redaction_masks_identifiers_when_configured(
    broker: MosquittoBroker, base: str
) -> None:
    bridge = MqttBridge(settings_for(broker, base, redact=True), "dev1")
    async for _ in running(bridge):
        bridge.publish_state("modems/m1", modem_state())
        async with Watcher(broker, f"{base}/dev1/modems/m1") as w:
            modem = await w.wait_json(f"{base}/dev1/modems/m1")
    assert modem["identity"]["imei"] == "***********3809"
    assert modem["sim"]["iccid"] == "***************0012"
    assert modem["eid"] == "*" * 28 + "0000"
    assert modem["signal"]["rssi_dbm"] == -71


async def test_home_assistant_discovery(broker: MosquittoBroker, base: str) -> None:
    bridge = MqttBridge(settings_for(broker, base), "dev1")
    ha = f"{base}/ha"
    async for _ in running(bridge):
        bridge.publish_state(
            "state", DeviceState(device_id="dev1", active_profile="8944000000000000012")
        )
        bridge.publish_state("modems/m1", modem_state())
        await bridge.wait_flushed(10)
        async with Watcher(broker, f"{ha}/#") as w:
            signal_cfg = await w.wait_json(f"{ha}/sensor/dev1_m1_signal/config")
            reg_cfg = await w.wait_json(f"{ha}/sensor/dev1_m1_registration/config")
            layer_cfg = await w.wait_json(f"{ha}/sensor/dev1_active_layer/config")
            profile_cfg = await w.wait_json(f"{ha}/sensor/dev1_active_profile/config")
            conn_cfg = await w.wait_json(f"{ha}/binary_sensor/dev1_connectivity/config")
        configs = [signal_cfg, reg_cfg, layer_cfg, profile_cfg, conn_cfg]
        assert len({c["unique_id"] for c in configs}) == 5
        device_availability = {
            "topic": f"{base}/dev1/availability",
            "payload_available": "online",
            "payload_not_available": "offline",
        }
        assert all(c["availability"][0] == device_availability for c in configs)
        assert all(c["availability_mode"] == "all" for c in configs)
        # A modem's entities also follow that modem's own availability.
        for cfg in (signal_cfg, reg_cfg):
            assert cfg["availability"][1]["topic"] == f"{base}/dev1/modems/m1/availability"
            assert cfg["entity_category"] == "diagnostic"
        assert len(layer_cfg["availability"]) == 1
        assert "entity_category" not in layer_cfg
        # HA >= 2025.10 reads default_entity_id; older releases still read object_id.
        assert signal_cfg["default_entity_id"] == "sensor.dev1_m1_signal"
        assert conn_cfg["default_entity_id"] == "binary_sensor.dev1_connectivity"
        assert signal_cfg["object_id"] == "dev1_m1_signal"
        assert all(
            c["origin"]["name"] == "esim-agent" and c["origin"]["sw_version"] for c in configs
        )
        assert all(c["device"] == signal_cfg["device"] for c in configs)
        assert signal_cfg["state_topic"] == f"{base}/dev1/modems/m1"
        assert signal_cfg["unit_of_measurement"] == "dBm"
        assert conn_cfg["device_class"] == "connectivity"
        # Each template's path must exist in the retained JSON it reads.
        modem = bridge.snapshot()["modems/m1"]
        assert "value_json.signal.rssi_dbm" in signal_cfg["value_template"]
        assert modem["signal"]["rssi_dbm"] == -71
        assert "value_json.registration.state" in reg_cfg["value_template"]
        assert "active_profile" in bridge.snapshot()["state"]

        bridge.clear_state("modems/m1")
        await bridge.wait_flushed(10)
        async with Watcher(broker, f"{ha}/#", f"{base}/dev1/modems/#") as w:
            await w.wait_for(f"{ha}/sensor/dev1_active_layer/config")
            assert w.latest(f"{ha}/sensor/dev1_m1_signal/config") is None
            assert w.latest(f"{base}/dev1/modems/m1") is None
            assert w.latest(f"{base}/dev1/modems/m1/availability") is None


_CHILD = """
import asyncio, os, sys
from agent.mqtt.bridge import MqttBridge, MqttSettings
from agent.mqtt.payloads import DeviceState

async def main():
    s = MqttSettings(host="127.0.0.1", port=int(sys.argv[1]), base_topic=sys.argv[2], discovery_prefix=None)
    bridge = MqttBridge(s, "child")
    bridge.publish_state("state", DeviceState(device_id="child", connectivity=True))
    await bridge.run()

asyncio.run(main())
"""


async def test_last_will_marks_device_offline_when_the_agent_dies(
    broker: MosquittoBroker, base: str
) -> None:
    topic = f"{base}/child/availability"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _CHILD, str(broker.port), base, env=env
    )
    try:
        async with Watcher(broker, topic, f"{base}/child/state") as w:
            await w.wait_for(topic, lambda p: p == b"online", timeout=20)
            await w.wait_json(f"{base}/child/state", lambda s: s["connectivity"] is True)
            proc.send_signal(signal.SIGKILL)
            await asyncio.wait_for(proc.wait(), 10)
            await w.wait_for(topic, lambda p: p == b"offline")
    finally:
        if proc.returncode is None:
            proc.kill()
            await asyncio.wait_for(proc.wait(), 10)
    async with Watcher(broker, topic) as w:
        _, payload, retained, _ = await w.wait_for(topic)
        assert (payload, retained) == (b"offline", True)


async def test_broker_outage_never_blocks_and_state_is_republished(
    own_broker: MosquittoBroker, base: str
) -> None:
    bridge = MqttBridge(settings_for(own_broker, base), "dev1")
    root = f"{base}/dev1"
    async for _ in running(bridge):
        bridge.publish_state("state", DeviceState(device_id="dev1", active_layer="primary"))
        bridge.publish_state("modems/m1", modem_state())
        async with Watcher(own_broker, f"{root}/state") as w:
            await w.wait_json(f"{root}/state", lambda s: s["active_layer"] == "primary")

        own_broker.kill()
        await bridge.wait_disconnected(10)
        started = time.perf_counter()
        for i in range(200):
            bridge.publish_state("state", DeviceState(device_id="dev1", active_layer=f"layer{i}"))
            bridge.publish_event(Event(type="tick", data={"i": i}))
        elapsed = time.perf_counter() - started
        assert elapsed < 0.5, f"publishing 400 messages offline took {elapsed:.3f}s"
        assert not bridge.connected

        # Without persistence the restarted broker knows nothing: everything must come from us.
        await asyncio.to_thread(own_broker.restart)
        async with Watcher(own_broker, f"{root}/#") as w:
            await w.wait_json(
                f"{root}/state", lambda s: s["active_layer"] == "layer199", timeout=15
            )
            modem = await w.wait_json(f"{root}/modems/m1")
            assert modem["id"] == "m1"
            assert (await w.wait_for(f"{root}/availability"))[1] == b"online"
            states = [json.loads(p) for t, p, _, _ in w.messages if t == f"{root}/state"]
            assert [s["active_layer"] for s in states] == ["layer199"]
        assert bridge.connections == 2


async def test_events_queued_during_an_outage_arrive_in_order_after_reconnect(
    own_broker: MosquittoBroker, base: str
) -> None:
    # A long backoff keeps the bridge away until the watcher is ready; reconnect_now() ends it.
    settings = settings_for(
        own_broker, base, backoff_initial=60.0, backoff_max=60.0, event_queue_size=50
    )
    bridge = MqttBridge(settings, "dev1")
    topic = f"{base}/dev1/events"
    async for _ in running(bridge):
        own_broker.kill()
        await bridge.wait_disconnected(10)
        for i in range(80):
            bridge.publish_event({"type": "tick", "data": {"i": i}})
        assert bridge.dropped_events == 30
        await asyncio.to_thread(own_broker.restart)
        async with Watcher(own_broker, topic) as w:
            bridge.reconnect_now()
            await w.wait_json(topic, lambda e: e["data"]["i"] == 79, timeout=15)
            seen = [json.loads(p)["data"]["i"] for _, p, _, _ in w.messages]
        assert seen == list(range(30, 80))


async def test_broker_credentials(tmp_path: Path, base: str) -> None:
    with MosquittoBroker(tmp_path, users={"agent": "pa55"}) as secured:
        good = MqttBridge(settings_for(secured, base, username="agent", password="pa55"), "dev1")
        async for _ in running(good):
            assert good.connected
        bad = MqttBridge(settings_for(secured, base, username="agent", password="nope"), "dev2")
        task = asyncio.create_task(bad.run())
        # A refused login is just another outage: the loop keeps retrying and never raises.
        with pytest.raises(TimeoutError):
            await bad.wait_connected(0.5)
        assert not task.done()
        await bad.close()
        await asyncio.wait_for(task, 10)
