"""Trust between siblings: the shipped config/mosquitto/acl on a real Mosquitto.

Each device has its own credentials (made with the real mosquitto_passwd) and may publish only
under `esim-agent/<its username>/`. A forged state, availability or Last Will in another
device's tree never reaches anyone; the device's own tree, Will and the daemon's MqttBridge work.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiomqtt
import pytest

from agent.mqtt.bridge import MqttBridge, MqttSettings
from agent.mqtt.payloads import DeviceState
from tests.mosquitto import Watcher
from tests.mosquitto_lab import ConfiguredMosquitto, die_with_will, password_file

ROOT = Path(__file__).resolve().parent.parent
ACL = ROOT / "config" / "mosquitto" / "acl"
USERS = {"phone": "pw-phone", "watch": "pw-watch", "viewer": "pw-viewer", "home": "pw-home"}
BASE = "esim-agent"
WAIT_S = 10.0
WILL_ID = "esim-agent-watch-will"

pytestmark = pytest.mark.skipif(
    shutil.which("mosquitto_passwd") is None, reason="mosquitto_passwd is not installed"
)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[ConfiguredMosquitto]:
    pw = password_file(tmp_path / "passwd", USERS)
    acl = tmp_path / "acl"
    acl.write_text(ACL.read_text())  # the shipped file, verbatim
    lines = ["allow_anonymous false", f"password_file {pw}", f"acl_file {acl}"]
    with ConfiguredMosquitto(tmp_path, lines) as b:
        yield b


def client(broker: ConfiguredMosquitto, user: str) -> aiomqtt.Client:
    return aiomqtt.Client(
        broker.host,
        broker.port,
        username=user,
        password=USERS[user],
        protocol=aiomqtt.ProtocolVersion.V5,
        timeout=WAIT_S,
    )


@pytest.fixture
async def viewer(broker: ConfiguredMosquitto) -> AsyncIterator[Watcher]:
    async with Watcher(broker, f"{BASE}/#", username="viewer", password=USERS["viewer"]) as w:
        yield w


def seen(viewer: Watcher, topic: str, payload: bytes) -> bool:
    return any(t == topic and p == payload for t, p, _, _ in viewer.messages)


async def test_a_device_publishes_its_own_tree_but_not_a_siblings(
    broker: ConfiguredMosquitto, viewer: Watcher
) -> None:
    forged_state = json.dumps({"device_id": "phone", "connectivity": False}).encode()
    async with client(broker, "phone") as phone:
        await phone.publish(f"{BASE}/phone/availability", b"online", qos=1, retain=True)
    await viewer.wait_for(f"{BASE}/phone/availability", lambda p: p == b"online")
    async with client(broker, "watch") as watch:
        await watch.publish(f"{BASE}/phone/availability", b"offline", qos=1, retain=True)
        await watch.publish(f"{BASE}/phone/state", forged_state, qos=1, retain=True)
        await watch.publish(f"{BASE}/phone/cmd/status/response", b"{}", qos=1)
        await watch.publish("elsewhere/anything", b"x", qos=1)
        # Its own tree works; the broker handles one client's publishes in order, so once this
        # one is delivered the forged ones above would have been too.
        await watch.publish(f"{BASE}/watch/availability", b"online", qos=1, retain=True)
    await viewer.wait_for(f"{BASE}/watch/availability", lambda p: p == b"online")
    assert not seen(viewer, f"{BASE}/phone/availability", b"offline")
    assert not seen(viewer, f"{BASE}/phone/state", forged_state)
    assert viewer.latest(f"{BASE}/phone/cmd/status/response") is None
    # A late subscriber gets the phone's true retained availability, not the forgery.
    async with Watcher(
        broker, f"{BASE}/phone/#", username="viewer", password=USERS["viewer"]
    ) as late:
        await late.wait_for(f"{BASE}/phone/availability", lambda p: p == b"online")
        assert late.latest(f"{BASE}/phone/state") is None


async def test_a_forged_last_will_never_fires_but_a_devices_own_will_does(
    broker: ConfiguredMosquitto, viewer: Watcher
) -> None:
    async with client(broker, "phone") as phone:
        await phone.publish(f"{BASE}/phone/availability", b"online", qos=1, retain=True)
    await viewer.wait_for(f"{BASE}/phone/availability", lambda p: p == b"online")

    # The watch's Will names the phone's availability: the broker checks it at publish time.
    die_with_will(
        broker, WILL_ID, f"{BASE}/phone/availability", user="watch", password=USERS["watch"]
    )
    wait_log(broker, f"Client {WILL_ID} closed its connection")
    # The Will is sent as the connection is torn down, before anything the broker handles
    # later; a sentinel from the phone afterwards bounds the wait.
    async with client(broker, "phone") as phone:
        await phone.publish(f"{BASE}/phone/sentinel", b"1", qos=1)
    await viewer.wait_for(f"{BASE}/phone/sentinel")
    assert not seen(viewer, f"{BASE}/phone/availability", b"offline")

    # The same death with the watch's own Will is seen by everyone.
    die_with_will(
        broker, WILL_ID, f"{BASE}/watch/availability", user="watch", password=USERS["watch"]
    )
    await viewer.wait_for(f"{BASE}/watch/availability", lambda p: p == b"offline")


def wait_log(broker: ConfiguredMosquitto, text: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while text not in broker.log_path.read_text(errors="replace"):
        assert time.monotonic() < deadline, f"{text!r} not in the broker log"
        time.sleep(0.05)  # the broker's log file is all there is to wait on


async def test_the_daemons_bridge_works_under_the_acl_with_per_device_credentials(
    broker: ConfiguredMosquitto, viewer: Watcher
) -> None:
    settings = MqttSettings(
        host=broker.host,
        port=broker.port,
        username="phone",
        password=USERS["phone"],
        base_topic=BASE,
        discovery_prefix=None,
        commands_enabled=True,
        backoff_initial=0.05,
        backoff_max=0.2,
    )
    bridge = MqttBridge(settings, "phone")
    task = asyncio.create_task(bridge.run())
    try:
        await bridge.wait_connected(WAIT_S)
        bridge.publish_state("state", DeviceState(device_id="phone", connectivity=True))
        state = await viewer.wait_json(f"{BASE}/phone/state", timeout=WAIT_S)
        assert state["connectivity"] is True
        await viewer.wait_for(f"{BASE}/phone/availability", lambda p: p == b"online")
        # The controller may command it; the answer comes back on the device's own tree.
        async with client(broker, "home") as home:
            await home.publish(f"{BASE}/phone/cmd/status", b'{"request_id": "r1"}', qos=1)
        answer = await viewer.wait_json(f"{BASE}/phone/cmd/status/response", timeout=WAIT_S)
        assert answer["request_id"] == "r1"
    finally:
        await bridge.close()
        await asyncio.gather(task, return_exceptions=True)
    await viewer.wait_for(f"{BASE}/phone/availability", lambda p: p == b"offline")
