"""The shipped ACL lets a device send a sibling `profile_transfer_in` (and nothing else of its
commands): the one write outside its own tree a transfer needs."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import pytest

from tests.mosquitto import Watcher
from tests.mosquitto_lab import ConfiguredMosquitto, password_file

ROOT = Path(__file__).resolve().parent.parent
ACL = ROOT / "config" / "mosquitto" / "acl"
USERS = {"source": "pw-source", "target": "pw-target", "viewer": "pw-viewer"}

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


async def test_a_device_may_ask_a_sibling_for_a_transfer_but_send_it_nothing_else(
    broker: ConfiguredMosquitto,
) -> None:
    cmd = "esim-agent/target/cmd"
    async with Watcher(broker, f"{cmd}/#", username="viewer", password="pw-viewer") as viewer:
        async with aiomqtt.Client(
            broker.host,
            broker.port,
            username="source",
            password="pw-source",
            protocol=aiomqtt.ProtocolVersion.V5,
            timeout=10,
        ) as source:
            await source.publish(f"{cmd}/profile_enable", b'{"x": 1}', qos=1)
            await source.publish(f"{cmd}/switch_layer", b'{"x": 2}', qos=1)
            await source.publish(f"{cmd}/profile_transfer_in/response/forged", b"{}", qos=1)
            # One client's publishes are delivered in order: once this one arrives, the ones
            # above would have too.
            await source.publish(f"{cmd}/profile_transfer_in", b'{"x": 3}', qos=1)
        await viewer.wait_for(f"{cmd}/profile_transfer_in", timeout=10)
    assert [t for t, _, _, _ in viewer.messages] == [f"{cmd}/profile_transfer_in"]
