"""Beyond one broker: two real Mosquittos bridged with the shipped config/mosquitto/bridge.conf.

"van" is the travel router's local broker (devices in the van), "home" the remote one (family at
home). Retained state, a Last Will, a claim and a command request/response cross the bridge,
and `esim-agent watch --json` on either side sees the agents of both.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.mqtt.bridge import MqttBridge, MqttSettings
from agent.mqtt.commands import CommandContext
from agent.mqtt.payloads import DeviceState
from tests.mosquitto import MosquittoBroker, Watcher
from tests.mosquitto_lab import ConfiguredMosquitto, die_with_will

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "config" / "mosquitto" / "bridge.conf"
BASE = "esim-agent"
WAIT_S = 15.0
WATCH = [sys.executable, "-m", "agent", "watch", "--json"]


def bridge_lines(remote: MosquittoBroker) -> list[str]:
    """The shipped bridge config, pointed at `remote` on loopback without TLS or credentials."""
    drop = ("address", "remote_username", "remote_password", "bridge_cafile", "bridge_insecure")
    lines = [
        line
        for line in SHIPPED.read_text().splitlines()
        if line.strip() and not line.startswith("#") and not line.startswith(drop)
    ]
    at = lines.index("connection home") + 1
    lines.insert(at, f"address {remote.host}:{remote.port}")
    # Reconnect fast in tests (the shipped 2..30 s backoff is for real links).
    return [("restart_timeout 1 2" if x.startswith("restart_timeout") else x) for x in lines]


@pytest.fixture
def brokers(tmp_path: Path) -> Iterator[tuple[ConfiguredMosquitto, ConfiguredMosquitto]]:
    (tmp_path / "home").mkdir()
    (tmp_path / "van").mkdir()
    with ConfiguredMosquitto(tmp_path / "home", ["allow_anonymous true"]) as home:
        lines = ["allow_anonymous true", *bridge_lines(home)]
        with ConfiguredMosquitto(tmp_path / "van", lines) as van:
            yield van, home


@pytest.fixture
async def at_home(
    brokers: tuple[ConfiguredMosquitto, ConfiguredMosquitto],
) -> AsyncIterator[Watcher]:
    """A subscriber at home, returned once the bridge reports itself up."""
    _, home = brokers
    async with Watcher(home, f"{BASE}/#", "bridges/#") as w:
        await w.wait_for("bridges/van/state", lambda p: p == b"1", timeout=WAIT_S)
        yield w


def watch_json(broker: MosquittoBroker) -> dict[str, Any]:
    proc = subprocess.run(
        [*WATCH, "--broker", f"mqtt://{broker.host}:{broker.port}"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=True,
    )
    snap: dict[str, Any] = json.loads(proc.stdout)
    return snap


async def status(command: str, args: dict[str, Any], ctx: CommandContext) -> object:
    return {"device": "phone", "command": command, "active_layer": "primary"}


@pytest.fixture
async def phone(
    brokers: tuple[ConfiguredMosquitto, ConfiguredMosquitto],
) -> AsyncIterator[MqttBridge]:
    """The phone's real MqttBridge, on the van's broker, answering `status`."""
    van, _ = brokers
    settings = MqttSettings(
        host=van.host,
        port=van.port,
        base_topic=BASE,
        discovery_prefix=None,
        commands_enabled=True,
        backoff_initial=0.05,
        backoff_max=0.2,
    )
    bridge = MqttBridge(settings, "phone", status)
    task = asyncio.create_task(bridge.run())
    await bridge.wait_connected(WAIT_S)
    try:
        yield bridge
    finally:
        await bridge.close()
        await asyncio.gather(task, return_exceptions=True)


async def test_retained_state_and_claims_cross_both_ways_and_watch_sees_both_sides(
    brokers: tuple[ConfiguredMosquitto, ConfiguredMosquitto], at_home: Watcher, phone: MqttBridge
) -> None:
    van, home = brokers
    phone.publish_state(
        "state", DeviceState(device_id="phone", active_layer="primary", connectivity=True)
    )
    await at_home.wait_json(f"{BASE}/phone/state", lambda s: s["connectivity"], timeout=WAIT_S)
    # A device at home publishes its state and a retained claim; the van sees both.
    claim = {"device": "tablet", "layer": "emergency", "expires_at": "2026-12-06T04:00:00Z"}
    async with aiomqtt.Client(home.host, home.port) as tablet:
        state = {"device_id": "tablet", "active_layer": None, "connectivity": False}
        await tablet.publish(f"{BASE}/tablet/state", json.dumps(state), qos=1, retain=True)
        await tablet.publish(f"{BASE}/tablet/claim", json.dumps(claim), qos=1, retain=True)
    async with Watcher(van, f"{BASE}/tablet/#") as in_van:
        got = await in_van.wait_json(f"{BASE}/tablet/claim", timeout=WAIT_S)
        assert got == claim
        await in_van.wait_for(f"{BASE}/tablet/state", timeout=WAIT_S)
    # Retained on the van's broker itself: a late subscriber there is handed both.
    async with Watcher(van, f"{BASE}/tablet/#") as late:
        for key in ("state", "claim"):
            _, _, retained, _ = await late.wait_for(f"{BASE}/tablet/{key}", timeout=WAIT_S)
            assert retained is True

    for side in (home, van):
        snap = watch_json(side)
        assert snap["settled"] == "marker", side  # its own marker came back over this broker
        devices = {d["device_id"]: d for d in snap["devices"]}
        assert sorted(devices) == ["phone", "tablet"], side
        assert devices["phone"]["availability"] == "online"
        assert devices["phone"]["connectivity"] is True
        assert devices["tablet"]["connectivity"] is False


async def test_a_last_will_in_the_van_reaches_home(
    brokers: tuple[ConfiguredMosquitto, ConfiguredMosquitto], at_home: Watcher
) -> None:
    van, home = brokers
    async with aiomqtt.Client(van.host, van.port) as watch:
        await watch.publish(f"{BASE}/watch/availability", b"online", qos=1, retain=True)
    await at_home.wait_for(f"{BASE}/watch/availability", lambda p: p == b"online")
    die_with_will(van, "esim-agent-watch", f"{BASE}/watch/availability")
    await at_home.wait_for(f"{BASE}/watch/availability", lambda p: p == b"offline", WAIT_S)
    snap = watch_json(home)
    (watch,) = (d for d in snap["devices"] if d["device_id"] == "watch")
    assert watch["availability"] == "offline"
    assert {"kind": "offline", "subject": "watch", "detail": "Last Will"} in watch["alerts"]


async def test_a_command_from_home_is_answered_by_a_device_in_the_van(
    brokers: tuple[ConfiguredMosquitto, ConfiguredMosquitto], at_home: Watcher, phone: MqttBridge
) -> None:
    _, home = brokers
    # Wait until the phone's subscription has crossed: its online state is at home.
    await at_home.wait_for(f"{BASE}/phone/availability", lambda p: p == b"online", WAIT_S)
    reply_to = f"{BASE}/phone/cmd/status/home-1"
    async with aiomqtt.Client(home.host, home.port, protocol=aiomqtt.ProtocolVersion.V5) as caller:
        await caller.subscribe(reply_to, qos=1, timeout=WAIT_S)
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ResponseTopic = reply_to
        props.CorrelationData = b"corr-7"
        await caller.publish(
            f"{BASE}/phone/cmd/status", b'{"request_id": "r-7"}', qos=1, properties=props
        )
        async with asyncio.timeout(WAIT_S):
            message = await anext(caller.messages)
    assert message.topic.value == reply_to
    assert message.properties is not None
    assert message.properties.CorrelationData == b"corr-7"
    assert isinstance(message.payload, bytes)
    answer = json.loads(message.payload)
    assert answer["ok"] is True
    assert answer["request_id"] == "r-7"
    assert answer["result"]["device"] == "phone"
