"""Command request/response over a real Mosquitto: correlation data, authorisation, hostile payloads."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiomqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.errors import Es10Error
from agent.mqtt.bridge import MqttBridge, MqttSettings
from agent.mqtt.commands import CommandContext, CommandRejected
from agent.mqtt.payloads import DeviceState
from tests.mosquitto import MosquittoBroker, Watcher

TOKEN = "s3cret-token"
ICCID = "8944000000000000012"


@pytest.fixture(scope="module")
def broker() -> Iterator[MosquittoBroker]:
    with MosquittoBroker() as b:
        yield b


class Daemon:
    """A stand-in for the daemon's handler: a small profile table and a record of what ran."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any], CommandContext]] = []
        self.profiles = {("m1", ICCID): {"nickname": None, "state": "disabled"}}

    async def __call__(self, command: str, args: dict[str, Any], ctx: CommandContext) -> object:
        self.calls.append((command, args, ctx))
        if command == "status":
            return {"active_layer": "primary"}
        if command == "switch_layer":
            if args["layer"] != "backup":
                raise CommandRejected("unknown_layer", f"no layer {args['layer']}")
            return {"active_layer": "backup"}
        if command in {"profile_enable", "profile_disable", "profile_nickname"}:
            key = (args["modem"], args["iccid"])
            if key not in self.profiles:
                raise CommandRejected(
                    "iccid_not_found", f"{args['iccid']} is not on {args['modem']}"
                )
            if command == "profile_nickname":
                self.profiles[key]["nickname"] = args["nickname"]
                return {"iccid": args["iccid"], "nickname": args["nickname"]}
            if command == "profile_enable":
                raise Es10Error("EnableProfile", 3, "disallowedByPolicy")
            return {"iccid": args["iccid"], "state": "disabled"}
        raise RuntimeError("drill exploded")  # an unexpected bug in the handler


class Session:
    """A bridge with commands, plus a caller client that sends v5 requests."""

    def __init__(self, broker: MosquittoBroker, bridge: MqttBridge, caller: aiomqtt.Client) -> None:
        self.broker = broker
        self.bridge = bridge
        self.caller = caller
        # Outside every device's tree: a topic an authorised caller may choose.
        self.reply_topic = f"replies/{uuid.uuid4().hex[:12]}"
        self.last_topic: str | None = None

    def cmd_topic(self, name: str) -> str:
        return self.bridge.topics.command(name)

    async def request(
        self, name: str, payload: bytes | dict[str, Any], *, correlation: bytes | None = None
    ) -> tuple[dict[str, Any], object]:
        """Send one request with a response topic and wait for the answer with matching correlation.

        Refused requests are answered on the device's fallback topic instead: both are watched,
        and last_topic says where the answer came.
        """
        corr = correlation if correlation is not None else uuid.uuid4().bytes
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        fallback = f"{self.bridge.topics.root}/cmd/+/response"
        async with Watcher(self.broker, self.reply_topic, fallback) as w:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.ResponseTopic = self.reply_topic
            props.CorrelationData = corr
            await self.caller.publish(
                self.cmd_topic(name), body, qos=1, properties=props, timeout=10
            )

            index = 0
            async with asyncio.timeout(10):
                while True:
                    topic, raw, _, props_seen = await w.message_at(index)
                    index += 1
                    if getattr(props_seen, "CorrelationData", None) == corr:
                        self.last_topic = topic
                        return json.loads(raw), props_seen
        raise AssertionError("unreachable")


@pytest.fixture
async def session_factory(
    broker: MosquittoBroker,
) -> AsyncIterator[Any]:
    started: list[tuple[MqttBridge, asyncio.Task[None]]] = []
    callers: list[aiomqtt.Client] = []

    async def make(handler: Any = None, base: str | None = None, **kw: Any) -> Session:
        base = base or f"test/{uuid.uuid4().hex[:12]}"
        settings = MqttSettings(
            host=broker.host,
            port=broker.port,
            base_topic=base,
            discovery_prefix=None,
            client_id=f"bridge-{uuid.uuid4().hex[:8]}",
            **kw,
        )
        bridge = MqttBridge(settings, "dev1", handler)
        task = asyncio.create_task(bridge.run())
        started.append((bridge, task))
        await bridge.wait_connected(10)
        caller = aiomqtt.Client(
            broker.host, broker.port, protocol=aiomqtt.ProtocolVersion.V5, timeout=10
        )
        await caller.__aenter__()
        callers.append(caller)
        return Session(broker, bridge, caller)

    yield make
    for caller in callers:
        await caller.__aexit__(None, None, None)
    for bridge, task in started:
        await bridge.close()
        await asyncio.wait_for(task, 10)


async def test_request_response_carries_correlation_data(session_factory: Any) -> None:
    daemon = Daemon()
    s = await session_factory(daemon, commands_enabled=True, command_token=TOKEN)
    response, props = await s.request(
        "switch_layer",
        {"layer": "backup", "token": TOKEN, "request_id": "r-1"},
        correlation=b"\x00corr\xff",
    )
    assert response == {
        "ok": True,
        "command": "switch_layer",
        "request_id": "r-1",
        "result": {"active_layer": "backup"},
    }
    assert getattr(props, "CorrelationData", None) == b"\x00corr\xff"
    command, args, ctx = daemon.calls[-1]
    assert (command, args) == (
        "switch_layer",
        {"layer": "backup"},
    )  # the token never reaches the handler
    assert ctx.correlation_data == b"\x00corr\xff"


async def test_every_command_reaches_the_handler(session_factory: Any) -> None:
    daemon = Daemon()
    s = await session_factory(daemon, commands_enabled=True, command_token=TOKEN)
    status, _ = await s.request("status", {"token": TOKEN})
    assert status["result"] == {"active_layer": "primary"}
    nick, _ = await s.request(
        "profile_nickname", {"token": TOKEN, "modem": "m1", "iccid": ICCID, "nickname": "Travel ✈"}
    )
    assert nick["ok"] is True
    assert daemon.profiles[("m1", ICCID)]["nickname"] == "Travel ✈"
    disable, _ = await s.request("profile_disable", {"token": TOKEN, "modem": "m1", "iccid": ICCID})
    assert disable["result"]["state"] == "disabled"
    # The handler's own typed errors become error responses.
    missing, _ = await s.request(
        "profile_disable", {"token": TOKEN, "modem": "m1", "iccid": "8944000000000000099"}
    )
    assert missing["error"]["code"] == "iccid_not_found"
    enable, _ = await s.request("profile_enable", {"token": TOKEN, "modem": "m1", "iccid": ICCID})
    assert enable["ok"] is False
    assert enable["error"]["code"] == "euicc_error"
    assert "disallowedByPolicy" in enable["error"]["message"]
    # A crash inside the handler is reported without internals and the bridge keeps serving.
    drill, _ = await s.request("drill", {"token": TOKEN})
    assert drill["error"] == {"code": "internal_error", "message": "internal error"}
    again, _ = await s.request("status", {"token": TOKEN})
    assert again["ok"] is True


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        ({"layer": "backup"}, "unauthorized"),
        ({"layer": "backup", "token": "wrong"}, "unauthorized"),
        ({"layer": "backup", "token": None}, "unauthorized"),
        (b"{not json", "invalid_json"),
        (b"\xff\xfe\x00garbage", "invalid_json"),
        (b"[1, 2, 3]", "invalid_payload"),
        ({"layer": 42, "token": TOKEN}, "invalid_payload"),
        ({"token": TOKEN}, "invalid_payload"),
        ({"layer": "backup", "token": TOKEN, "rm": "-rf"}, "invalid_payload"),
        ({"layer": "", "token": TOKEN}, "invalid_payload"),
        (b'{"layer": "' + b"x" * 20000 + b'"}', "payload_too_large"),
    ],
    ids=[
        "no-token", "wrong-token", "null-token", "bad-json", "binary", "array", "wrong-type",
        "missing-field", "unknown-field", "empty-name", "huge",
    ],
)  # fmt: skip
async def test_hostile_requests_get_error_responses(
    session_factory: Any, payload: bytes | dict[str, Any], code: str
) -> None:
    daemon = Daemon()
    s = await session_factory(daemon, commands_enabled=True, command_token=TOKEN)
    response, _ = await s.request("switch_layer", payload)
    assert response["ok"] is False
    assert response["error"]["code"] == code
    # Refused at intake: answered on the device's own topic, never on the one the caller named.
    assert s.last_topic == f"{s.bridge.topics.root}/cmd/switch_layer/response"
    assert daemon.calls == []
    status, _ = await s.request("status", {"token": TOKEN})
    assert status["ok"] is True


async def test_profile_arguments_are_validated(session_factory: Any) -> None:
    daemon = Daemon()
    s = await session_factory(daemon, commands_enabled=True)
    bad_iccid, _ = await s.request("profile_enable", {"modem": "m1", "iccid": "89-44"})
    assert bad_iccid["error"]["code"] == "invalid_payload"
    # 40 characters but 80 UTF-8 bytes: over the eUICC's 64-byte limit.
    long_nick, _ = await s.request(
        "profile_nickname", {"modem": "m1", "iccid": ICCID, "nickname": "é" * 40}
    )
    assert long_nick["error"]["code"] == "invalid_payload"
    assert "64" in long_nick["error"]["message"]
    assert daemon.calls == []


async def test_unknown_and_disallowed_commands(session_factory: Any) -> None:
    daemon = Daemon()
    s = await session_factory(daemon, commands_enabled=True, allowed_commands=frozenset({"status"}))
    unknown, _ = await s.request("format_disk", {})
    assert unknown == {
        "ok": False,
        "error": {"code": "unknown_command", "message": "no command named 'format_disk'"},
    }
    denied, _ = await s.request("drill", {})
    assert denied["error"]["code"] == "command_not_allowed"
    ok, _ = await s.request("status", b"")
    assert ok["ok"] is True
    assert [c for c, _, _ in daemon.calls] == ["status"]


async def test_commands_disabled_runs_nothing(session_factory: Any) -> None:
    daemon = Daemon()
    s = await session_factory(daemon, commands_enabled=False, command_token=TOKEN)
    response, _ = await s.request("switch_layer", {"layer": "backup", "token": TOKEN})
    assert response["ok"] is False
    assert response["error"]["code"] == "commands_disabled"
    assert daemon.calls == []


async def test_allowed_senders(session_factory: Any) -> None:
    daemon = Daemon()
    s = await session_factory(daemon, commands_enabled=True, allowed_senders=frozenset({"ha"}))
    anonymous, _ = await s.request("status", {})
    assert anonymous["error"]["code"] == "unauthorized"
    named, _ = await s.request("status", {"sender": "ha"})
    assert named["ok"] is True
    assert daemon.calls[-1][2].sender == "ha"


async def test_requests_without_response_topic_use_the_fallback(session_factory: Any) -> None:
    daemon = Daemon()
    s = await session_factory(daemon, commands_enabled=True)
    fallback = f"{s.bridge.topics.root}/cmd/status/response"
    async with Watcher(s.broker, fallback) as w:
        # An MQTT 3.1.1 caller: no properties at all, so the request_id is its only correlation.
        async with aiomqtt.Client(
            s.broker.host, s.broker.port, protocol=aiomqtt.ProtocolVersion.V311
        ) as v3:
            await v3.publish(s.cmd_topic("status"), b'{"request_id": "v3-7"}', qos=1, timeout=10)
        response = await w.wait_json(fallback)
    assert response["request_id"] == "v3-7"
    assert response["ok"] is True


async def test_response_topic_cannot_overwrite_state(session_factory: Any) -> None:
    daemon = Daemon()
    s = await session_factory(daemon, commands_enabled=True)
    s.bridge.publish_state("state", DeviceState(device_id="dev1", active_layer="primary"))
    await s.bridge.wait_flushed(10)
    state_topic = s.bridge.topics.state
    s.reply_topic = state_topic
    fallback = f"{s.bridge.topics.root}/cmd/status/response"
    async with Watcher(s.broker, fallback) as w:
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ResponseTopic = state_topic
        props.CorrelationData = b"x"
        await s.caller.publish(s.cmd_topic("status"), b"{}", qos=1, properties=props, timeout=10)
        await w.wait_json(fallback)
    async with Watcher(s.broker, state_topic) as w:
        state = await w.wait_json(state_topic)
    assert state["active_layer"] == "primary"


async def test_retained_commands_are_never_replayed(
    broker: MosquittoBroker, session_factory: Any
) -> None:
    daemon = Daemon()
    base = f"test/{uuid.uuid4().hex[:12]}"
    stale = f"{base}/dev1/cmd/drill"
    # A stale retained request sits on the broker before the bridge subscribes.
    async with aiomqtt.Client(broker.host, broker.port, protocol=aiomqtt.ProtocolVersion.V5) as c:
        await c.publish(stale, b"{}", qos=1, retain=True, timeout=10)
    try:
        s = await session_factory(daemon, base=base, commands_enabled=True)
        status, _ = await s.request("status", {})
        assert status["ok"] is True
    finally:
        async with aiomqtt.Client(
            broker.host, broker.port, protocol=aiomqtt.ProtocolVersion.V5
        ) as c:
            await c.publish(stale, b"", qos=1, retain=True, timeout=10)
    assert [c for c, _, _ in daemon.calls] == ["status"]


async def test_too_many_concurrent_commands_are_refused_not_queued(session_factory: Any) -> None:
    release = asyncio.Event()
    running = asyncio.Condition()
    started: list[str] = []

    async def slow(command: str, args: dict[str, Any], ctx: CommandContext) -> object:
        async with running:
            started.append(command)
            running.notify_all()
        await release.wait()
        return {"done": True}

    s = await session_factory(slow, commands_enabled=True)
    pending = [asyncio.create_task(s.request("drill", {})) for _ in range(4)]
    async with asyncio.timeout(10), running:
        await running.wait_for(lambda: len(started) == 4)
    busy, _ = await s.request("status", {})
    assert busy["error"]["code"] == "busy"
    assert s.last_topic == f"{s.bridge.topics.root}/cmd/status/response"
    release.set()
    results = await asyncio.wait_for(asyncio.gather(*pending), 10)
    assert all(r["ok"] for r, _ in results)
