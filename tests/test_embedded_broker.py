"""The embedded demo broker against real aiomqtt clients and hand-built packets on raw sockets."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import sys
from collections.abc import AsyncIterator

import aiomqtt
import pytest
from hypothesis import given
from hypothesis import strategies as st
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from hw_fixtures.broker import (
    EmbeddedBroker,
    MqttProtocolError,
    decode_varint,
    encode_varint,
    topic_matches,
    valid_topic_filter,
)

DEADLINE = 5.0
V5 = aiomqtt.ProtocolVersion.V5
V311 = aiomqtt.ProtocolVersion.V311


@pytest.fixture
async def broker() -> AsyncIterator[EmbeddedBroker]:
    server = EmbeddedBroker(packet_timeout=1.0)
    await server.start()
    yield server
    await server.stop()


def client(
    broker: EmbeddedBroker, protocol: aiomqtt.ProtocolVersion = V5, **kwargs: object
) -> aiomqtt.Client:
    return aiomqtt.Client(
        "127.0.0.1",
        broker.port,
        protocol=protocol,
        timeout=DEADLINE,
        **kwargs,  # type: ignore[arg-type]
    )


async def collect_until(
    sub: aiomqtt.Client, last_topic: str, timeout: float = DEADLINE
) -> list[aiomqtt.Message]:
    """Messages up to and including the first one on last_topic (a sentinel published last)."""
    seen: list[aiomqtt.Message] = []
    async with asyncio.timeout(timeout):
        async for message in sub.messages:
            seen.append(message)
            if message.topic.value == last_topic:
                return seen
    raise AssertionError("message stream ended")


# ---------------------------------------------------------------- raw packet helpers


def utf8(text: str) -> bytes:
    raw = text.encode()
    return len(raw).to_bytes(2, "big") + raw


def packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + encode_varint(len(body)) + body


def raw_connect(
    client_id: str,
    *,
    version: int = 4,
    keepalive: int = 60,
    will: tuple[str, bytes] | None = None,
    will_retain: bool = False,
    will_props: bytes = b"\x00",
    props: bytes = b"\x00",
) -> bytes:
    flags = 0x02
    payload = utf8(client_id)
    if will is not None:
        flags |= 0x04 | (0x20 if will_retain else 0)
        payload += (will_props if version == 5 else b"") + utf8(will[0]) + utf8(will[1].decode())
    body = utf8("MQTT") + bytes([version, flags]) + keepalive.to_bytes(2, "big")
    body += (props if version == 5 else b"") + payload
    return packet(0x10, body)


async def raw_session(
    broker: EmbeddedBroker, connect: bytes
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    """Open a socket, send CONNECT, return the stream and the CONNACK bytes."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", broker.port), DEADLINE
    )
    writer.write(connect)
    async with asyncio.timeout(DEADLINE):
        first = await reader.readexactly(2)
        rest = await reader.readexactly(first[1])
    return reader, writer, first + rest


async def read_until_closed(reader: asyncio.StreamReader) -> bytes:
    """Everything the broker sends until it closes the socket."""
    async with asyncio.timeout(DEADLINE):
        return await reader.read()


# ---------------------------------------------------------------- pure codec


@given(st.integers(min_value=0, max_value=268_435_455))
def test_varint_round_trip(value: int) -> None:
    encoded = encode_varint(value)
    assert 1 <= len(encoded) <= 4
    assert decode_varint(encoded + b"\xff") == (value, len(encoded))


def test_varint_rejects_five_bytes() -> None:
    with pytest.raises(MqttProtocolError):
        decode_varint(b"\xff\xff\xff\xff\x01")


@pytest.mark.parametrize(
    ("topic_filter", "topic", "expected"),
    [
        ("a/+/c", "a/b/c", True),
        ("a/+/c", "a/b/d", False),
        ("a/#", "a", True),
        ("a/#", "a/b/c", True),
        ("+/+", "a/b", True),
        ("+", "a/b", False),
        ("#", "$SYS/x", False),
        ("+/x", "$SYS/x", False),
        ("$SYS/#", "$SYS/x", True),
        ("a/b", "a/b/", False),
        ("+/", "a/", True),
    ],
)
def test_topic_matching(topic_filter: str, topic: str, expected: bool) -> None:
    assert topic_matches(topic_filter, topic) is expected


@pytest.mark.parametrize(
    ("topic_filter", "ok"), [("a/#", True), ("a/#/b", False), ("a+", False), ("", False)]
)
def test_topic_filter_validation(topic_filter: str, ok: bool) -> None:
    assert valid_topic_filter(topic_filter) is ok


# ---------------------------------------------------------------- publish / subscribe


@pytest.mark.parametrize("protocol", [V5, V311])
async def test_wildcard_subscriptions_deliver_only_matching_topics(
    broker: EmbeddedBroker, protocol: aiomqtt.ProtocolVersion
) -> None:
    async with client(broker, protocol) as sub, client(broker, protocol) as pub:
        await sub.subscribe("a/+/c", qos=1, timeout=DEADLINE)
        await sub.subscribe("x/#", qos=0, timeout=DEADLINE)
        await sub.subscribe("done", timeout=DEADLINE)
        for topic in ("a/b/c", "a/b/d", "x", "x/y/z", "b/x", "$SYS/x", "done"):
            await pub.publish(topic, topic.encode(), qos=1, timeout=DEADLINE)
        seen = await collect_until(sub, "done")
    assert [m.topic.value for m in seen] == ["a/b/c", "x", "x/y/z", "done"]
    assert [m.payload for m in seen] == [b"a/b/c", b"x", b"x/y/z", b"done"]
    assert [m.qos for m in seen] == [1, 0, 0, 0]
    assert not any(m.retain for m in seen)


async def test_dollar_topics_need_an_explicit_first_level(broker: EmbeddedBroker) -> None:
    async with client(broker) as sub, client(broker) as pub:
        await sub.subscribe("#", timeout=DEADLINE)
        await sub.subscribe("$SYS/#", timeout=DEADLINE)
        await pub.publish("$SYS/uptime", b"1", timeout=DEADLINE)
        await pub.publish("plain", b"2", timeout=DEADLINE)
        seen = await collect_until(sub, "plain")
    # One copy each, although "#" and "$SYS/#" overlap on nothing and the sub holds both.
    assert [(m.topic.value, m.payload) for m in seen] == [("$SYS/uptime", b"1"), ("plain", b"2")]


async def test_v311_and_v5_clients_interoperate(broker: EmbeddedBroker) -> None:
    async with client(broker, V311) as old, client(broker, V5) as new:
        await old.subscribe("mix/#", qos=1, timeout=DEADLINE)
        await new.subscribe("mix/#", qos=1, timeout=DEADLINE)
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.UserProperty = [("k", "v")]
        await new.publish("mix/a", b"from5", qos=1, properties=props, timeout=DEADLINE)
        await old.publish("mix/b", b"from311", qos=1, timeout=DEADLINE)
        seen_old = await collect_until(old, "mix/b")
        seen_new = await collect_until(new, "mix/b")
    assert [(m.topic.value, m.payload) for m in seen_old] == [
        ("mix/a", b"from5"),
        ("mix/b", b"from311"),
    ]
    assert [(m.topic.value, m.payload) for m in seen_new] == [
        ("mix/a", b"from5"),
        ("mix/b", b"from311"),
    ]


async def test_qos1_is_acknowledged_and_qos2_completes(broker: EmbeddedBroker) -> None:
    async with client(broker) as sub, client(broker) as pub:
        await sub.subscribe("q/#", qos=2, timeout=DEADLINE)
        # publish() with QoS > 0 only returns once PUBACK / PUBCOMP came back.
        await pub.publish("q/one", b"1", qos=1, timeout=DEADLINE)
        await pub.publish("q/two", b"2", qos=2, timeout=DEADLINE)
        seen = await collect_until(sub, "q/two")
    assert [(m.topic.value, m.qos) for m in seen] == [("q/one", 1), ("q/two", 1)]


async def test_suback_grants_at_most_qos1_and_rejects_bad_filters(broker: EmbeddedBroker) -> None:
    # Hand-built: paho refuses to send invalid filters, real-world clients do not all refuse.
    reader, writer, _ = await raw_session(broker, raw_connect("suber", version=5))
    filters = utf8("ok/#") + b"\x02" + utf8("bad/#/x") + b"\x01" + utf8("$share/g/t") + b"\x01"
    writer.write(packet(0x82, b"\x00\x2a\x00" + filters))
    async with asyncio.timeout(DEADLINE):
        suback = await reader.readexactly(8)
    writer.close()
    assert suback == b"\x90\x06\x00\x2a\x00\x01\x8f\x9e"


async def test_v311_suback_reports_failure_for_bad_filters(broker: EmbeddedBroker) -> None:
    reader, writer, _ = await raw_session(broker, raw_connect("suber311"))
    writer.write(packet(0x82, b"\x00\x07" + utf8("a+") + b"\x00" + utf8("a/+") + b"\x01"))
    async with asyncio.timeout(DEADLINE):
        suback = await reader.readexactly(6)
    writer.close()
    assert suback == b"\x90\x04\x00\x07\x80\x01"


async def test_unsubscribe_stops_delivery(broker: EmbeddedBroker) -> None:
    async with client(broker) as sub, client(broker) as pub:
        await sub.subscribe("u/a", timeout=DEADLINE)
        await sub.subscribe("u/done", timeout=DEADLINE)
        await sub.unsubscribe("u/a", timeout=DEADLINE)
        await pub.publish("u/a", b"x", qos=1, timeout=DEADLINE)
        await pub.publish("u/done", b"", qos=1, timeout=DEADLINE)
        seen = await collect_until(sub, "u/done")
    assert [m.topic.value for m in seen] == ["u/done"]


# ---------------------------------------------------------------- retained messages


async def test_retained_message_is_delivered_on_subscribe_and_deleted_by_empty_payload(
    broker: EmbeddedBroker,
) -> None:
    async with client(broker) as pub:
        await pub.publish("r/keep", b"kept", qos=1, retain=True, timeout=DEADLINE)
        await pub.publish("r/gone", b"soon gone", qos=1, retain=True, timeout=DEADLINE)
        await pub.publish("r/gone", b"", qos=1, retain=True, timeout=DEADLINE)
        async with client(broker) as sub:
            await sub.subscribe("r/#", qos=1, timeout=DEADLINE)
            await pub.publish("r/live", b"live", qos=1, timeout=DEADLINE)
            seen = await collect_until(sub, "r/live")
    assert [(m.topic.value, m.payload, m.retain) for m in seen] == [
        ("r/keep", b"kept", True),
        ("r/live", b"live", False),
    ]


async def test_retain_handling_2_and_retain_as_published(broker: EmbeddedBroker) -> None:
    async with client(broker) as pub, client(broker) as sub:
        await pub.publish("rh/state", b"old", qos=1, retain=True, timeout=DEADLINE)
        await sub.subscribe(
            "rh/state", options=SubscribeOptions(qos=1, retainHandling=2), timeout=DEADLINE
        )
        await sub.subscribe(
            "rap/#", options=SubscribeOptions(qos=1, retainAsPublished=True), timeout=DEADLINE
        )
        await pub.publish("rh/state", b"new", qos=1, timeout=DEADLINE)
        await pub.publish("rap/x", b"r", qos=1, retain=True, timeout=DEADLINE)
        seen = await collect_until(sub, "rap/x")
    assert [(m.topic.value, m.payload, m.retain) for m in seen] == [
        ("rh/state", b"new", False),
        ("rap/x", b"r", True),
    ]


# ---------------------------------------------------------------- v5 properties


async def test_v5_request_response_properties_are_forwarded_intact(
    broker: EmbeddedBroker,
) -> None:
    correlation = bytes(range(256))[:40] + b"\x00\xff"
    async with client(broker) as sub, client(broker) as pub:
        await sub.subscribe("cmd/+", qos=1, timeout=DEADLINE)
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ResponseTopic = "reply/abc"
        props.CorrelationData = correlation
        props.ContentType = "application/json"
        props.PayloadFormatIndicator = 1
        props.MessageExpiryInterval = 600
        props.UserProperty = [("token", "s3cret"), ("token", "second"), ("sender", "ha")]
        await pub.publish("cmd/switch", b'{"x":1}', qos=1, properties=props, timeout=DEADLINE)
        (message,) = await collect_until(sub, "cmd/switch")
    got = message.properties
    assert got is not None
    assert got.ResponseTopic == "reply/abc"
    assert got.CorrelationData == correlation
    assert got.ContentType == "application/json"
    assert got.PayloadFormatIndicator == 1
    assert 590 <= got.MessageExpiryInterval <= 600
    assert got.UserProperty == [("token", "s3cret"), ("token", "second"), ("sender", "ha")]
    assert message.payload == b'{"x":1}'


async def test_topic_alias_is_resolved_for_subscribers(broker: EmbeddedBroker) -> None:
    async with client(broker) as sub:
        await sub.subscribe("alias/t", timeout=DEADLINE)
        _, writer, connack = await raw_session(broker, raw_connect("aliaser", version=5))
        assert connack[3] == 0
        alias_prop = b"\x03\x23\x00\x07"  # property section: topic alias 7
        writer.write(packet(0x30, utf8("alias/t") + alias_prop + b"first"))
        writer.write(packet(0x30, utf8("") + alias_prop + b"second"))
        await writer.drain()
        seen = [m async for m in _take(sub, 2)]
        writer.close()
    assert [(m.topic.value, m.payload) for m in seen] == [
        ("alias/t", b"first"),
        ("alias/t", b"second"),
    ]
    assert all(m.properties is None or "TopicAlias" not in m.properties.json() for m in seen)


async def _take(sub: aiomqtt.Client, count: int) -> AsyncIterator[aiomqtt.Message]:
    async with asyncio.timeout(DEADLINE):
        async for message in sub.messages:
            yield message
            count -= 1
            if not count:
                return


async def test_no_local_suppresses_own_messages(broker: EmbeddedBroker) -> None:
    async with client(broker) as me, client(broker) as other:
        await me.subscribe("nl/#", options=SubscribeOptions(qos=1, noLocal=True), timeout=DEADLINE)
        await me.publish("nl/mine", b"1", qos=1, timeout=DEADLINE)
        await other.publish("nl/theirs", b"2", qos=1, timeout=DEADLINE)
        seen = await collect_until(me, "nl/theirs")
    assert [m.topic.value for m in seen] == ["nl/theirs"]


# ---------------------------------------------------------------- Last Will


@pytest.mark.parametrize("version", [4, 5])
async def test_will_is_published_when_the_socket_dies(broker: EmbeddedBroker, version: int) -> None:
    async with client(broker) as sub:
        await sub.subscribe("will/#", qos=1, timeout=DEADLINE)
        # v5 will properties: content type "text/plain" and a user property.
        will_props = b"\x00"
        if version == 5:
            section = b"\x03" + utf8("text/plain") + b"\x26" + utf8("why") + utf8("crash")
            will_props = encode_varint(len(section)) + section
        _, writer, connack = await raw_session(
            broker,
            raw_connect(
                "doomed", version=version, will=("will/doomed", b"offline"), will_props=will_props
            ),
        )
        assert connack[0] == 0x20
        assert connack[3] == 0  # connect return / reason code: accepted
        writer.transport.abort()
        (message,) = await collect_until(sub, "will/doomed")
    assert message.payload == b"offline"
    if version == 5:
        assert message.properties is not None
        assert message.properties.ContentType == "text/plain"
        assert message.properties.UserProperty == [("why", "crash")]


async def test_retained_will_is_kept_for_later_subscribers(broker: EmbeddedBroker) -> None:
    async with client(broker) as early:
        await early.subscribe("avail/+", timeout=DEADLINE)
        _, writer, _ = await raw_session(
            broker, raw_connect("agent-1", will=("avail/agent-1", b"offline"), will_retain=True)
        )
        writer.transport.abort()
        # Once the early subscriber has it, the broker has stored it.
        await collect_until(early, "avail/agent-1")
    async with client(broker) as late:
        await late.subscribe("avail/+", timeout=DEADLINE)
        message = await _first(late)
    assert (message.topic.value, message.payload, message.retain) == (
        "avail/agent-1",
        b"offline",
        True,
    )


async def _first(sub: aiomqtt.Client) -> aiomqtt.Message:
    async for message in _take(sub, 1):
        return message
    raise AssertionError("no message")


async def test_no_will_after_a_clean_disconnect(broker: EmbeddedBroker) -> None:
    async with client(broker) as sub, client(broker) as pub:
        await sub.subscribe("w/#", qos=1, timeout=DEADLINE)
        reader, writer, _ = await raw_session(
            broker, raw_connect("polite", will=("w/polite", b"x"))
        )
        writer.write(b"\xe0\x00")
        assert await read_until_closed(reader) == b""
        await pub.publish("w/sentinel", b"", qos=1, timeout=DEADLINE)
        seen = await collect_until(sub, "w/sentinel")
    assert [m.topic.value for m in seen] == ["w/sentinel"]


async def test_v5_disconnect_with_will_message_sends_the_will(broker: EmbeddedBroker) -> None:
    async with client(broker) as sub:
        await sub.subscribe("w5/#", qos=1, timeout=DEADLINE)
        reader, writer, _ = await raw_session(
            broker, raw_connect("leaver", version=5, will=("w5/leaver", b"bye"))
        )
        writer.write(b"\xe0\x01\x04")
        assert await read_until_closed(reader) == b""
        (message,) = await collect_until(sub, "w5/leaver")
    assert message.payload == b"bye"


async def test_keepalive_expiry_publishes_the_will(broker: EmbeddedBroker) -> None:
    async with client(broker) as sub:
        await sub.subscribe("ka/#", timeout=DEADLINE)
        reader, writer, _ = await raw_session(
            broker, raw_connect("silent", keepalive=1, will=("ka/silent", b"lost"))
        )
        # Keepalive 1 s: the broker gives up after 1.5 s without a packet.
        assert await read_until_closed(reader) == b""
        writer.close()
        (message,) = await collect_until(sub, "ka/silent")
    assert message.payload == b"lost"


async def test_session_takeover_disconnects_the_first_connection(broker: EmbeddedBroker) -> None:
    async with client(broker) as sub:
        await sub.subscribe("to/#", timeout=DEADLINE)
        first_reader, first_writer, _ = await raw_session(
            broker, raw_connect("same", version=5, will=("to/same", b"first gone"))
        )
        second_reader, second_writer, connack = await raw_session(
            broker, raw_connect("same", version=5)
        )
        assert connack[3] == 0
        # v5 DISCONNECT with reason 0x8E "session taken over", then EOF.
        assert (await read_until_closed(first_reader))[:3] == b"\xe0\x02\x8e"
        first_writer.close()
        (message,) = await collect_until(sub, "to/same")
        assert message.payload == b"first gone"
        second_writer.write(b"\xc0\x00")
        async with asyncio.timeout(DEADLINE):
            assert await second_reader.readexactly(2) == b"\xd0\x00"
        second_writer.close()


# ---------------------------------------------------------------- hostile clients


async def _assert_dropped(broker: EmbeddedBroker, data: bytes) -> bytes:
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", broker.port), DEADLINE
    )
    writer.write(data)
    with contextlib.suppress(ConnectionResetError):
        await writer.drain()
    try:
        return await read_until_closed(reader)
    except ConnectionResetError:
        return b""
    finally:
        writer.close()


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", id="http"),
        pytest.param(b"\xff" * 64, id="garbage"),
        pytest.param(b"\x30" + encode_varint(2 * 1024 * 1024), id="huge-remaining-length"),
        pytest.param(b"\x10\xff\xff\xff\xff\x7f", id="varint-too-long"),
        pytest.param(raw_connect("half")[:9], id="half-connect"),
        pytest.param(
            raw_connect("badprop", version=5, props=b"\x02\x7f\x00"), id="unknown-property"
        ),
        pytest.param(
            raw_connect("x", version=4) + b"\x82\x03\x00\x01\x00", id="truncated-subscribe"
        ),
    ],
)
async def test_hostile_client_is_dropped_and_others_keep_working(
    broker: EmbeddedBroker, data: bytes
) -> None:
    async with client(broker) as sub, client(broker) as pub:
        await sub.subscribe("alive", timeout=DEADLINE)
        tail = await _assert_dropped(broker, data)
        # Never a SUBACK or PUBLISH back; at most a CONNACK and a v5 DISCONNECT.
        assert b"\x90" not in tail
        await pub.publish("alive", b"yes", qos=1, timeout=DEADLINE)
        (message,) = await collect_until(sub, "alive")
    assert message.payload == b"yes"


async def test_unsupported_protocol_level_is_refused(broker: EmbeddedBroker) -> None:
    body = utf8("MQTT") + bytes([9, 0x02, 0, 60]) + utf8("future")
    tail = await _assert_dropped(broker, packet(0x10, body))
    assert tail == b"\x20\x02\x00\x01"


async def test_credentials_are_checked_when_configured() -> None:
    server = EmbeddedBroker(users={"demo": "pw"})
    await server.start()
    try:
        async with client(server, username="demo", password="pw") as ok:
            await ok.publish("auth/ok", b"", qos=1, timeout=DEADLINE)
        with pytest.raises(aiomqtt.MqttError):
            async with client(server, username="demo", password="wrong"):
                pass
    finally:
        await server.stop()


async def test_stop_disconnects_clients(broker: EmbeddedBroker) -> None:
    # Keep the writer referenced: a collected StreamWriter closes its socket.
    reader, writer, _ = await raw_session(broker, raw_connect("stay", version=5))
    await broker.stop()
    assert (await read_until_closed(reader))[:3] == b"\xe0\x02\x8b"
    writer.close()
    assert broker.client_count == 0


# ---------------------------------------------------------------- command line


def test_module_prints_its_port_first_and_serves() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "hw_fixtures.broker", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        port = json.loads(proc.stdout.readline())["port"]
        assert isinstance(port, int)
        assert port > 0
        with socket.create_connection(("127.0.0.1", port), DEADLINE) as sock:
            sock.settimeout(DEADLINE)
            sock.sendall(raw_connect("cli") + b"\xc0\x00")
            received = b""
            while len(received) < 6:
                chunk = sock.recv(16)
                assert chunk
                received += chunk
        assert received[:6] == b"\x20\x02\x00\x00\xd0\x00"
    finally:
        proc.terminate()
        assert proc.wait(DEADLINE) == 0


async def test_persistent_session_receives_qos1_messages_sent_while_offline(
    broker: EmbeddedBroker,
) -> None:
    async with client(broker, V311, identifier="sleepy", clean_session=False) as sleepy:
        await sleepy.subscribe("mail/#", qos=1, timeout=DEADLINE)
    async with client(broker) as pub:
        await pub.publish("mail/1", b"while away", qos=1, timeout=DEADLINE)
        await pub.publish("mail/2", b"dropped: qos 0", qos=0, timeout=DEADLINE)
        await pub.publish("mail/3", b"also away", qos=1, timeout=DEADLINE)
    async with client(broker, V311, identifier="sleepy", clean_session=False) as sleepy:
        seen = await collect_until(sleepy, "mail/3")
    assert [(m.topic.value, m.payload) for m in seen] == [
        ("mail/1", b"while away"),
        ("mail/3", b"also away"),
    ]


async def test_clean_start_discards_the_old_session(broker: EmbeddedBroker) -> None:
    async with client(broker, V311, identifier="fresh", clean_session=False) as first:
        await first.subscribe("old/#", qos=1, timeout=DEADLINE)
    async with client(broker, V311, identifier="fresh", clean_session=True) as second:
        await second.subscribe("new", qos=1, timeout=DEADLINE)
        await second.publish("old/x", b"", qos=1, timeout=DEADLINE)
        await second.publish("new", b"", qos=1, timeout=DEADLINE)
        seen = await collect_until(second, "new")
    assert [m.topic.value for m in seen] == ["new"]


async def test_will_delay_lets_a_quick_reconnect_suppress_the_will(broker: EmbeddedBroker) -> None:
    will_delay_30s = b"\x05\x18\x00\x00\x00\x1e"
    session_expiry_60s = b"\x05\x11\x00\x00\x00\x3c"
    connect = raw_connect(
        "flaky",
        version=5,
        will=("wd/flaky", b"offline"),
        will_props=will_delay_30s,
        props=session_expiry_60s,
    )
    async with client(broker) as sub, client(broker) as pub:
        await sub.subscribe("wd/#", qos=1, timeout=DEADLINE)
        _, writer, _ = await raw_session(broker, connect)
        writer.transport.abort()
        _, again, connack = await raw_session(broker, raw_connect("flaky", version=5))
        assert connack[2] == 0  # clean start: no session carried over
        await pub.publish("wd/sentinel", b"", qos=1, timeout=DEADLINE)
        seen = await collect_until(sub, "wd/sentinel")
        again.close()
    assert [m.topic.value for m in seen] == ["wd/sentinel"]
