"""Trust between siblings: the shipped config/mosquitto/acl on a real Mosquitto.

Each device has its own credentials (made with the real mosquitto_passwd) and may publish only
under `esim-agent/<its username>/`. A forged state, availability or Last Will in another
device's tree never reaches anyone; the device's own tree, Will and the daemon's MqttBridge work.
What does reach a device is still checked: a sibling message that fails its schema, or comes
from a device the group does not list, is ignored and logged once (SiblingDecoder). And
`esim-agent watch --json --config` connects with the daemon's TLS and per-user credentials.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiomqtt
import pytest
from structlog.testing import capture_logs

from agent.mqtt.bridge import MqttBridge, MqttSettings
from agent.mqtt.payloads import DeviceState
from agent.siblings.view import SiblingDecoder, SiblingState
from hw_fixtures import pki
from tests.mosquitto import Watcher
from tests.mosquitto_lab import ConfiguredMosquitto, die_with_will, password_file
from tests.watch_fleet import device_tree

ROOT = Path(__file__).resolve().parent.parent
ACL = ROOT / "config" / "mosquitto" / "acl"
USERS = {
    "phone": "pw-phone",
    "watch": "pw-watch",
    "tablet": "pw-tablet",
    "viewer": "pw-viewer",
    "home": "pw-home",
}
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
    b = ConfiguredMosquitto(tmp_path, lines)
    with b:
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


def state(device: str, connectivity: bool) -> bytes:
    return json.dumps({"device_id": device, "connectivity": connectivity}).encode()


async def test_what_reaches_a_device_is_decoded_strictly_and_each_fault_logged_once(
    broker: ConfiguredMosquitto,
) -> None:
    """The watch (group: phone, watch) listens as a device does; the tablet is not in its group."""
    decoder = SiblingDecoder(BASE, "family", ["phone", "watch"])
    async with Watcher(
        broker,
        f"{BASE}/+/state",
        f"{BASE}/+/availability",
        username="watch",
        password=USERS["watch"],
    ) as heard:
        async with client(broker, "phone") as phone:
            await phone.publish(f"{BASE}/phone/state", state("phone", True), qos=1)
            for _ in range(3):  # its own tree, so the broker passes it: the schema must not
                await phone.publish(f"{BASE}/phone/state", b'{"device_id": "phone"}', qos=1)
            await phone.publish(f"{BASE}/phone/state", b"\xff not json", qos=1)
            await phone.publish(f"{BASE}/phone/availability", b"online", qos=1)
        async with client(broker, "tablet") as tablet:
            for _ in range(3):  # well-formed, but the group does not list the tablet
                await tablet.publish(f"{BASE}/tablet/state", state("tablet", False), qos=1)
            await tablet.publish(f"{BASE}/tablet/availability", b"offline", qos=1)
        async with client(broker, "watch") as watch:
            # The forgery the ACL stops: the watch's own decoder would believe it.
            await watch.publish(f"{BASE}/phone/state", state("phone", False), qos=1)
            await watch.publish(f"{BASE}/watch/availability", b"online", qos=1)
        # One publisher's messages arrive in order: each last one bounds the wait for the rest.
        await heard.wait_for(f"{BASE}/phone/availability", lambda p: p == b"online")
        await heard.wait_for(f"{BASE}/tablet/availability", lambda p: p == b"offline")
        await heard.wait_for(f"{BASE}/watch/availability", lambda p: p == b"online")
        with capture_logs() as logs:
            decoded = [decoder.decode(t, p) for t, p, _, _ in heard.messages]
    states = [m for m in decoded if isinstance(m, SiblingState)]
    # Only the phone's true state survives: never the forged offline, never the tablet's.
    assert states == [SiblingState(device="phone", connectivity=True)]
    ignored = [(e["device"], e["reason"]) for e in logs if e["event"] == "sibling_message_ignored"]
    assert sorted(ignored) == [
        ("phone", "state fails its schema"),
        ("tablet", "device not listed in [group] devices"),
    ]


# --------------------------------------------------------- watch with the daemon's TLS and user


@pytest.fixture
def tls_broker(tmp_path: Path) -> Iterator[tuple[ConfiguredMosquitto, Path]]:
    """The shipped ACL and per-device passwords behind TLS (a test CA, certificate for 127.0.0.1)."""
    certs = tmp_path / "pki"
    pki.generate(smdp_host="127.0.0.1").write(certs)
    pw = password_file(tmp_path / "passwd", USERS)
    acl = tmp_path / "acl"
    acl.write_text(ACL.read_text())
    lines = [
        f"certfile {certs / 'dp_tls.pem'}",
        f"keyfile {certs / 'dp_tls.key.pem'}",
        "allow_anonymous false",
        f"password_file {pw}",
        f"acl_file {acl}",
    ]
    (tmp_path / "mq").mkdir()
    b = ConfiguredMosquitto(tmp_path / "mq", lines)
    with b:
        yield b, certs / "ci.pem"


def tls_client(broker: ConfiguredMosquitto, ca: Path, user: str) -> aiomqtt.Client:
    return aiomqtt.Client(
        broker.host,
        broker.port,
        username=user,
        password=USERS[user],
        tls_params=aiomqtt.TLSParameters(ca_certs=str(ca)),
        timeout=WAIT_S,
    )


def viewer_config(tmp_path: Path, broker: ConfiguredMosquitto, ca: Path, password: str) -> Path:
    """A daemon config whose [mqtt] names the broker, TLS CA, user and password file."""
    (tmp_path / "viewer.pw").write_text(password + "\n")
    config = tmp_path / "watch.toml"
    config.write_text(
        f"""
device_id = "viewer"
state_dir = "{tmp_path / "state"}"

[[modems]]
id = "m0"
port = "/dev/ttyUSB2"

[[layers]]
name = "primary"
modem = "m0"
profile = "89000000000000000011"
role = "primary"

[mqtt]
enabled = true
host = "127.0.0.1"
port = {broker.port}
username = "viewer"
password_file = "viewer.pw"

[mqtt.tls]
ca_file = "{ca}"
"""
    )
    return config


def watch_json(config: Path) -> tuple[int, dict[str, object]]:
    proc = subprocess.run(
        [sys.executable, "-m", "agent", "watch", "--json", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )
    return proc.returncode, json.loads(proc.stdout)


async def test_watch_json_uses_the_configs_tls_and_credentials_and_shows_no_forgery(
    tls_broker: tuple[ConfiguredMosquitto, Path], tmp_path: Path
) -> None:
    broker, ca = tls_broker
    async with tls_client(broker, ca, "phone") as phone:
        for topic, payload in device_tree("phone").items():
            await phone.publish(topic, payload, qos=1, retain=True)
    async with tls_client(broker, ca, "watch") as watch:
        await watch.publish(f"{BASE}/phone/state", state("phone", False), qos=1, retain=True)
        await watch.publish(f"{BASE}/phone/availability", b"offline", qos=1, retain=True)
        await watch.publish(f"{BASE}/watch/availability", b"online", qos=1, retain=True)

    code, snap = await asyncio.to_thread(
        watch_json, viewer_config(tmp_path, broker, ca, USERS["viewer"])
    )
    assert code == 0, snap
    # The viewer may write its marker under its own tree, so it knew the snapshot was whole.
    assert (snap["complete"], snap["settled"]) == (True, "marker")
    devices = {d["device_id"]: d for d in snap["devices"]}  # type: ignore[attr-defined]
    assert sorted(devices) == ["phone", "watch"]
    assert (devices["phone"]["availability"], devices["phone"]["connectivity"]) == ("online", True)

    # The listener speaks only TLS: the same watch without the config's TLS gets nowhere.
    proc = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "agent", "watch", "--json", "--timeout", "3",
         "--broker", f"mqtt://viewer:{USERS['viewer']}@{broker.host}:{broker.port}"],
        capture_output=True, text=True, timeout=60, check=False, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 1
    assert json.loads(proc.stdout)["error"]["code"] == "broker"

    # A wrong password is the broker's refusal, reported as such.
    code, snap = await asyncio.to_thread(
        watch_json, viewer_config(tmp_path, broker, ca, "not-the-password")
    )
    assert code == 1
    assert snap["error"]["code"] == "broker"  # type: ignore[index]
    assert "refused" in snap["error"]["message"]  # type: ignore[index]


async def test_watch_json_falls_back_to_a_quiet_gap_when_its_marker_is_refused(
    tmp_path: Path,
) -> None:
    """A stricter ACL than the shipped one: the viewer may read but write nothing, so its marker
    never comes back; the snapshot still ends (a quiet gap) and says how it ended."""
    pw = password_file(tmp_path / "passwd", USERS)
    acl = tmp_path / "acl"
    acl.write_text(
        f"user phone\ntopic readwrite {BASE}/phone/#\nuser viewer\ntopic read {BASE}/#\n"
    )
    lines = ["allow_anonymous false", f"password_file {pw}", f"acl_file {acl}"]
    b = ConfiguredMosquitto(tmp_path, lines)
    with b:
        async with client(b, "phone") as phone:
            for topic, payload in device_tree("phone").items():
                await phone.publish(topic, payload, qos=1, retain=True)
        url = f"mqtt://viewer:{USERS['viewer']}@{b.host}:{b.port}"
        proc = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "agent", "watch", "--json", "--broker", url,
             "--quiet-period", "0.5"],
            capture_output=True, text=True, timeout=60, check=False, cwd=ROOT,
        )  # fmt: skip
    assert proc.returncode == 0, proc.stdout
    snap = json.loads(proc.stdout)
    assert (snap["complete"], snap["settled"]) == (True, "quiet")
    (phone_view,) = snap["devices"]
    assert (phone_view["device_id"], phone_view["connectivity"]) == ("phone", True)
