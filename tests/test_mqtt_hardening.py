"""MQTT intake against a real Mosquitto: oversized publishes, response topics, retained requests."""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiomqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.mqtt.bridge import MAX_PACKET_BYTES, MqttBridge, MqttSettings
from agent.mqtt.commands import CommandContext
from tests.mosquitto import MosquittoBroker, Watcher

TOKEN = "t0ken"


@pytest.fixture(scope="module")
def broker() -> Iterator[MosquittoBroker]:
    with MosquittoBroker() as b:
        yield b


class Handler:
    def __init__(self) -> None:
        self.calls: list[str] = []

    async def __call__(self, command: str, args: dict[str, Any], ctx: CommandContext) -> object:
        self.calls.append(command)
        return {"ran": command}


class Rig:
    def __init__(self, broker: MosquittoBroker, bridge: MqttBridge, handler: Handler) -> None:
        self.broker = broker
        self.bridge = bridge
        self.handler = handler
        self.base = bridge.topics.base
        self.root = bridge.topics.root

    async def publish(
        self,
        command: str,
        payload: bytes,
        *,
        response_topic: str | None = None,
        retain: bool = False,
        correlation: bytes = b"c",
    ) -> None:
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        if response_topic is not None:
            props.ResponseTopic = response_topic
        props.CorrelationData = correlation
        async with aiomqtt.Client(
            self.broker.host, self.broker.port, protocol=aiomqtt.ProtocolVersion.V5, timeout=30
        ) as c:
            await c.publish(
                f"{self.root}/cmd/{command}",
                payload,
                qos=1,
                retain=retain,
                properties=props,
                timeout=60,
            )

    async def answered(self, watcher: Watcher, correlation: bytes) -> tuple[str, dict[str, Any]]:
        """The (topic, response) carrying this correlation data, waiting for it."""
        index = 0
        async with asyncio.timeout(20):
            while True:
                topic, raw, _, props = await watcher.message_at(index)
                index += 1
                if getattr(props, "CorrelationData", None) == correlation:
                    return topic, json.loads(raw)


@pytest.fixture
async def rig(broker: MosquittoBroker) -> AsyncIterator[Rig]:
    base = f"test/{uuid.uuid4().hex[:12]}"
    handler = Handler()
    settings = MqttSettings(
        host=broker.host,
        port=broker.port,
        base_topic=base,
        discovery_prefix=f"ha-{uuid.uuid4().hex[:8]}",
        client_id=f"bridge-{uuid.uuid4().hex[:8]}",
        commands_enabled=True,
        command_token=TOKEN,
    )
    bridge = MqttBridge(settings, "dev1", handler)
    task = asyncio.create_task(bridge.run())
    await bridge.wait_connected(10)
    yield Rig(broker, bridge, handler)
    await bridge.close()
    await asyncio.wait_for(task, 10)


def rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def test_oversized_publish_never_reaches_the_agent(rig: Rig) -> None:
    fallback = f"{rig.root}/cmd/status/response"
    huge = b"{" + b" " * (48 * 1024 * 1024) + b"}"
    async with Watcher(rig.broker, fallback) as w:
        before = rss_bytes()
        await rig.publish("status", huge, correlation=b"huge")
        del huge
        # A normal request after it: once it is answered, the huge one has been dealt with.
        await rig.publish("status", json.dumps({"token": TOKEN}).encode(), correlation=b"ok")
        _, response = await rig.answered(w, b"ok")
        growth = rss_bytes() - before
    assert response["ok"] is True
    assert rig.handler.calls == ["status"]
    assert [p for _, _, _, p in w.messages if getattr(p, "CorrelationData", None) == b"huge"] == []
    assert rig.bridge.connected
    # The 48 MB payload was never copied into this process by the bridge.
    assert growth < 16 * 1024 * 1024, growth


def test_max_packet_size_fits_every_valid_request() -> None:
    from agent.mqtt.payloads import MAX_COMMAND_BYTES

    assert MAX_COMMAND_BYTES < MAX_PACKET_BYTES <= 64 * 1024


@pytest.mark.parametrize(
    "target",
    ["{prefix}/sensor/dev1_connectivity/config", "{base}/dev2/cmd/drill", "{root}/state"],
    ids=["discovery", "other-device-cmd", "own-state"],
)
@pytest.mark.parametrize("authorised", [False, True], ids=["unauthenticated", "authorised"])
async def test_caller_chosen_topics_outside_the_device_get_nothing(
    rig: Rig, target: str, authorised: bool
) -> None:
    topic = target.format(prefix=rig.bridge.settings.discovery_prefix, base=rig.base, root=rig.root)
    fallback = f"{rig.root}/cmd/status/response"
    body = {"token": TOKEN} if authorised else {"token": "wrong"}
    async with Watcher(rig.broker, topic, fallback) as w:
        await rig.publish("status", json.dumps(body).encode(), response_topic=topic)
        answered_on, response = await rig.answered(w, b"c")
    assert answered_on == fallback
    assert response["ok"] is authorised
    assert [t for t, _, _, _ in w.messages if t == topic] == []


async def test_authorised_request_is_answered_on_its_own_response_topic(rig: Rig) -> None:
    reply = f"replies/{uuid.uuid4().hex[:12]}"
    async with Watcher(rig.broker, reply) as w:
        await rig.publish("status", json.dumps({"token": TOKEN}).encode(), response_topic=reply)
        answered_on, response = await rig.answered(w, b"c")
    assert (answered_on, response["ok"]) == (reply, True)


async def test_a_request_published_retained_while_we_listen_is_not_executed(rig: Rig) -> None:
    fallback = f"{rig.root}/cmd/+/response"
    try:
        async with Watcher(rig.broker, fallback) as w:
            await rig.publish(
                "drill", json.dumps({"token": TOKEN}).encode(), retain=True, correlation=b"r"
            )
            await rig.publish("status", json.dumps({"token": TOKEN}).encode(), correlation=b"s")
            _, response = await rig.answered(w, b"s")
    finally:
        async with aiomqtt.Client(
            rig.broker.host, rig.broker.port, protocol=aiomqtt.ProtocolVersion.V5
        ) as c:
            await c.publish(f"{rig.root}/cmd/drill", b"", qos=1, retain=True, timeout=10)
    assert response["ok"] is True
    assert rig.handler.calls == ["status"]
    assert [p for _, _, _, p in w.messages if getattr(p, "CorrelationData", None) == b"r"] == []
