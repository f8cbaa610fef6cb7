"""The MQTT bridge's hooks for the sibling side, against a real Mosquitto: session up/down in
order with the session's messages, and a raw publish with retain and message expiry."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import pytest

from agent.mqtt.bridge import MqttBridge, MqttSettings
from tests.mosquitto import MosquittoBroker, Watcher


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    with MosquittoBroker(tmp_path) as b:
        yield b


def settings_for(broker: MosquittoBroker, base: str) -> MqttSettings:
    return MqttSettings(
        host=broker.host,
        port=broker.port,
        base_topic=base,
        discovery_prefix=None,
        backoff_initial=0.05,
        backoff_max=0.2,
        connect_timeout=5.0,
        publish_timeout=5.0,
    )


async def test_session_up_comes_before_the_sessions_retained_messages_and_down_after(
    own_broker: MosquittoBroker,
) -> None:
    base = f"test/{uuid.uuid4().hex[:8]}"
    # A sibling's retained state, published before our session exists.
    async with aiomqtt.Client(own_broker.host, own_broker.port) as c:
        await c.publish(f"{base}/phone/state", b'{"x":1}', qos=1, retain=True)
    seen: list[str] = []
    bridge = MqttBridge(settings_for(own_broker, base), "watch")
    bridge.watch(f"{base}/phone/state", lambda topic, payload: seen.append(f"msg {topic}"))
    bridge.on_session(lambda: seen.append("up"), lambda: seen.append("down"))
    task = asyncio.create_task(bridge.run())
    try:
        await bridge.wait_connected(10)
        async with asyncio.timeout(10):
            while len(seen) < 2:  # noqa: ASYNC110 - delivered by the bridge's receiver task
                await asyncio.sleep(0.02)
        assert seen == ["up", f"msg {base}/phone/state"]
        # The broker dies: "down"; it comes back: "up" again, and the retained state again.
        await asyncio.to_thread(own_broker.kill)
        await bridge.wait_disconnected(10)
        assert seen[-1] == "down"
        await asyncio.to_thread(own_broker.start)
        await bridge.wait_connected(15)
        assert seen[3] == "up"
    finally:
        await bridge.close()
        await asyncio.wait_for(task, 10)
    assert seen[-1] == "down"


async def test_publish_raw_is_retained_with_expiry_and_refused_without_a_session(
    own_broker: MosquittoBroker,
) -> None:
    base = f"test/{uuid.uuid4().hex[:8]}"
    bridge = MqttBridge(settings_for(own_broker, base), "tablet")
    with pytest.raises(aiomqtt.MqttError):
        await bridge.publish_raw(f"{base}/tablet/claim/family", b"c", True, 60)
    task = asyncio.create_task(bridge.run())
    try:
        await bridge.wait_connected(10)
        topic = f"{base}/tablet/claim/family"
        await bridge.publish_raw(topic, b'{"claim":1}', True, 1)
        # A late subscriber still gets it while it lives, with the remaining expiry.
        async with Watcher(own_broker, topic) as w:
            _, payload, retained, props = await w.wait_for(topic, timeout=5)
        assert (payload, retained) == (b'{"claim":1}', True)
        assert getattr(props, "MessageExpiryInterval", None) in (0, 1)

        # Once expired, the broker keeps it no longer: a new subscriber sees nothing.
        async def still_retained() -> bool:
            async with Watcher(own_broker, topic) as w:
                try:
                    await w.wait_for(topic, timeout=0.5)
                except TimeoutError:
                    return False
                return True

        async with asyncio.timeout(10):
            while await still_retained():
                pass
    finally:
        await bridge.close()
        await asyncio.wait_for(task, 10)
