"""A minimal MQTT 3.1.1 / 5.0 broker on asyncio (stdlib only) for the demo when Mosquitto is absent."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import structlog

from agent.errors import ParseError

log = structlog.get_logger(__name__)

# Packet types (MQTT 3.1.1 §2.2.1, MQTT 5.0 §2.1.2).
CONNECT = 1
CONNACK = 2
PUBLISH = 3
PUBACK = 4
PUBREC = 5
PUBREL = 6
PUBCOMP = 7
SUBSCRIBE = 8
SUBACK = 9
UNSUBSCRIBE = 10
UNSUBACK = 11
PINGREQ = 12
PINGRESP = 13
DISCONNECT = 14
AUTH = 15

V311 = 4
V5 = 5

# Reason codes (MQTT 5.0 §2.4) we emit.
RC_SUCCESS = 0x00
RC_DISCONNECT_WITH_WILL = 0x04
RC_NO_SUBSCRIPTION_EXISTED = 0x11
RC_UNSPECIFIED = 0x80
RC_MALFORMED = 0x81
RC_PROTOCOL_ERROR = 0x82
RC_UNSUPPORTED_VERSION = 0x84
RC_CLIENT_ID_INVALID = 0x85
RC_BAD_CREDENTIALS = 0x86
RC_NOT_AUTHORIZED = 0x87
RC_SERVER_SHUTTING_DOWN = 0x8B
RC_BAD_AUTH_METHOD = 0x8C
RC_KEEPALIVE_TIMEOUT = 0x8D
RC_SESSION_TAKEN_OVER = 0x8E
RC_TOPIC_FILTER_INVALID = 0x8F
RC_PACKET_ID_NOT_FOUND = 0x92
RC_TOPIC_ALIAS_INVALID = 0x94
RC_PACKET_TOO_LARGE = 0x95
RC_SHARED_NOT_SUPPORTED = 0x9E

# Property identifiers (MQTT 5.0 §2.2.2.2) that the broker itself reads or writes.
P_PAYLOAD_FORMAT = 0x01
P_MESSAGE_EXPIRY = 0x02
P_SUBSCRIPTION_ID = 0x0B
P_SESSION_EXPIRY = 0x11
P_ASSIGNED_CLIENT_ID = 0x12
P_AUTH_METHOD = 0x15
P_WILL_DELAY = 0x18
P_RECEIVE_MAXIMUM = 0x21
P_TOPIC_ALIAS_MAXIMUM = 0x22
P_TOPIC_ALIAS = 0x23
P_MAXIMUM_PACKET_SIZE = 0x27
P_SHARED_SUB_AVAILABLE = 0x2A

_BYTE_PROPS = frozenset({0x01, 0x17, 0x19, 0x24, 0x25, 0x28, 0x29, 0x2A})
_U16_PROPS = frozenset({0x13, 0x21, 0x22, 0x23})
_U32_PROPS = frozenset({0x02, 0x11, 0x18, 0x27})
_VARINT_PROPS = frozenset({0x0B})
_UTF8_PROPS = frozenset({0x03, 0x08, 0x12, 0x15, 0x1A, 0x1C, 0x1F})
_BINARY_PROPS = frozenset({0x09, 0x16})
_PAIR_PROPS = frozenset({0x26})
# Routing concerns of one hop; everything else in a PUBLISH travels to subscribers unchanged.
_HOP_PROPS = frozenset({P_TOPIC_ALIAS, P_SUBSCRIPTION_ID, P_MESSAGE_EXPIRY})

MAX_VARINT = 268_435_455
DEFAULT_MAX_PACKET = 1024 * 1024
SESSION_NEVER_EXPIRES = 0xFFFFFFFF
TOPIC_ALIAS_MAXIMUM = 16
CLOSE_GRACE_S = 1.0

PropValue = int | str | bytes | tuple[str, str]
Properties = tuple[tuple[int, PropValue], ...]


class MqttProtocolError(ParseError):
    """A client broke MQTT framing or rules; reason_code is the MQTT 5 code sent before closing."""

    def __init__(self, message: str, reason_code: int = RC_MALFORMED, text: bytes | None = None):
        super().__init__(message, text)
        self.reason_code = reason_code


# --------------------------------------------------------------------------- codec (pure)


def encode_varint(value: int) -> bytes:
    """The MQTT variable byte integer for 0..268435455."""
    if not 0 <= value <= MAX_VARINT:
        raise ValueError(f"varint out of range: {value}")
    out = bytearray()
    while True:
        byte, value = value % 128, value // 128
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def decode_varint(data: bytes, pos: int = 0) -> tuple[int, int]:
    """Decode a variable byte integer at pos; returns (value, next position)."""
    value = 0
    for i in range(4):
        if pos + i >= len(data):
            raise MqttProtocolError("truncated variable byte integer")
        byte = data[pos + i]
        value += (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            return value, pos + i + 1
    raise MqttProtocolError("variable byte integer longer than 4 bytes")


def encode_utf8(text: str) -> bytes:
    """A length-prefixed UTF-8 string."""
    raw = text.encode()
    if len(raw) > 0xFFFF:
        raise ValueError("string longer than 65535 bytes")
    return len(raw).to_bytes(2, "big") + raw


def encode_binary(data: bytes) -> bytes:
    """Length-prefixed binary data."""
    if len(data) > 0xFFFF:
        raise ValueError("binary data longer than 65535 bytes")
    return len(data).to_bytes(2, "big") + data


def encode_properties(props: Iterable[tuple[int, PropValue]]) -> bytes:
    """An MQTT 5 property section: length varint then each identifier and typed value."""
    body = bytearray()
    for pid, value in props:
        body += encode_varint(pid)
        if pid in _BYTE_PROPS and isinstance(value, int):
            body.append(value)
        elif pid in _U16_PROPS and isinstance(value, int):
            body += value.to_bytes(2, "big")
        elif pid in _U32_PROPS and isinstance(value, int):
            body += value.to_bytes(4, "big")
        elif pid in _VARINT_PROPS and isinstance(value, int):
            body += encode_varint(value)
        elif pid in _UTF8_PROPS and isinstance(value, str):
            body += encode_utf8(value)
        elif pid in _BINARY_PROPS and isinstance(value, bytes):
            body += encode_binary(value)
        elif pid in _PAIR_PROPS and isinstance(value, tuple):
            body += encode_utf8(value[0]) + encode_utf8(value[1])
        else:
            raise ValueError(f"property 0x{pid:02x} cannot hold {value!r}")
    return encode_varint(len(body)) + bytes(body)


def encode_packet(first_byte: int, body: bytes) -> bytes:
    """Fixed header (type and flags byte, remaining length) followed by body."""
    return bytes([first_byte]) + encode_varint(len(body)) + body


class Cursor:
    """Reads MQTT data types from one packet body; every read past the end is malformed."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    @property
    def remaining(self) -> int:
        """Bytes not yet consumed."""
        return len(self.data) - self.pos

    def take(self, count: int) -> bytes:
        """The next count bytes."""
        if count > self.remaining:
            raise MqttProtocolError("packet body truncated", text=self.data)
        chunk = self.data[self.pos : self.pos + count]
        self.pos += count
        return chunk

    def u8(self) -> int:
        """One byte."""
        return self.take(1)[0]

    def u16(self) -> int:
        """Two-byte big-endian integer."""
        return int.from_bytes(self.take(2), "big")

    def u32(self) -> int:
        """Four-byte big-endian integer."""
        return int.from_bytes(self.take(4), "big")

    def varint(self) -> int:
        """Variable byte integer."""
        value, self.pos = decode_varint(self.data, self.pos)
        return value

    def binary(self) -> bytes:
        """Length-prefixed binary data."""
        return self.take(self.u16())

    def utf8(self) -> str:
        """Length-prefixed UTF-8 string; ill-formed UTF-8 or U+0000 is malformed (§1.5.4)."""
        raw = self.binary()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MqttProtocolError("ill-formed UTF-8 string", text=raw) from exc
        if "\x00" in text:
            raise MqttProtocolError("UTF-8 string contains U+0000", text=raw)
        return text

    def rest(self) -> bytes:
        """Everything left."""
        return self.take(self.remaining)

    def properties(self) -> Properties:
        """An MQTT 5 property section, every identifier decoded by its type so none can desync us."""
        length = self.varint()
        section = Cursor(self.take(length))
        props: list[tuple[int, PropValue]] = []
        while section.remaining:
            pid = section.varint()
            value: PropValue
            if pid in _BYTE_PROPS:
                value = section.u8()
            elif pid in _U16_PROPS:
                value = section.u16()
            elif pid in _U32_PROPS:
                value = section.u32()
            elif pid in _VARINT_PROPS:
                value = section.varint()
            elif pid in _UTF8_PROPS:
                value = section.utf8()
            elif pid in _BINARY_PROPS:
                value = section.binary()
            elif pid in _PAIR_PROPS:
                value = (section.utf8(), section.utf8())
            else:
                raise MqttProtocolError(f"unknown property identifier 0x{pid:02x}")
            props.append((pid, value))
        return tuple(props)


def prop(props: Properties, pid: int) -> PropValue | None:
    """The first value of property pid, or None."""
    for key, value in props:
        if key == pid:
            return value
    return None


def int_prop(props: Properties, pid: int, default: int) -> int:
    """An integer property's value, or default when absent."""
    value = prop(props, pid)
    return value if isinstance(value, int) else default


# --------------------------------------------------------------------------- topics (pure)


def valid_topic_name(topic: str) -> bool:
    """A PUBLISH topic: non-empty, no wildcards."""
    return bool(topic) and "+" not in topic and "#" not in topic


def valid_topic_filter(topic_filter: str) -> bool:
    """A SUBSCRIBE filter: `#` only as the whole last level, `+` only as a whole level."""
    if not topic_filter:
        return False
    levels = topic_filter.split("/")
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != len(levels) - 1):
            return False
        if "+" in level and level != "+":
            return False
    return True


def topic_matches(topic_filter: str, topic: str) -> bool:
    """Whether topic matches filter; wildcards in the first level never match `$` topics (§4.7.2)."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    filter_levels = topic_filter.split("/")
    topic_levels = topic.split("/")
    for index, level in enumerate(filter_levels):
        if level == "#":
            return True
        if index >= len(topic_levels):
            return False
        if level != "+" and level != topic_levels[index]:
            return False
    return len(filter_levels) == len(topic_levels)


# --------------------------------------------------------------------------- packets (pure)


@dataclass(frozen=True, slots=True)
class WillSpec:
    """The Last Will carried in CONNECT."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    properties: Properties


@dataclass(frozen=True, slots=True)
class ConnectPacket:
    """A decoded CONNECT."""

    version: int
    client_id: str
    clean_start: bool
    keepalive: int
    properties: Properties
    will: WillSpec | None
    username: str | None
    password: bytes | None


def parse_connect(body: bytes) -> ConnectPacket:
    """Decode a CONNECT body (3.1, 3.1.1 or 5.0); raises MqttProtocolError (reason 0x84 for versions)."""
    cur = Cursor(body)
    name = cur.utf8()
    level = cur.u8()
    if (name, level) not in (("MQTT", V311), ("MQTT", V5), ("MQIsdp", 3)):
        raise MqttProtocolError(
            f"unsupported protocol {name!r} level {level}", RC_UNSUPPORTED_VERSION
        )
    version = V5 if level == V5 else V311
    flags = cur.u8()
    if flags & 0x01:
        raise MqttProtocolError("CONNECT reserved flag set")
    keepalive = cur.u16()
    props = cur.properties() if version == V5 else ()
    client_id = cur.utf8()
    will: WillSpec | None = None
    will_qos = (flags >> 3) & 0x03
    if flags & 0x04:
        if will_qos == 3:
            raise MqttProtocolError("will QoS 3")
        will_props = cur.properties() if version == V5 else ()
        will_topic = cur.utf8()
        if not valid_topic_name(will_topic):
            raise MqttProtocolError("invalid will topic", RC_PROTOCOL_ERROR)
        will = WillSpec(will_topic, cur.binary(), will_qos, bool(flags & 0x20), will_props)
    elif will_qos or flags & 0x20:
        raise MqttProtocolError("will QoS/retain without will flag")
    username = cur.utf8() if flags & 0x80 else None
    password = cur.binary() if flags & 0x40 else None
    return ConnectPacket(
        version, client_id, bool(flags & 0x02), keepalive, props, will, username, password
    )


@dataclass(frozen=True, slots=True)
class PublishPacket:
    """A decoded PUBLISH (topic may be empty when a v5 topic alias stands in for it)."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    dup: bool
    packet_id: int | None
    properties: Properties


def parse_publish(flags: int, body: bytes, version: int) -> PublishPacket:
    """Decode a PUBLISH body given the fixed-header flags."""
    qos = (flags >> 1) & 0x03
    if qos == 3:
        raise MqttProtocolError("PUBLISH QoS 3")
    cur = Cursor(body)
    topic = cur.utf8()
    packet_id = cur.u16() if qos else None
    if packet_id == 0:
        raise MqttProtocolError("PUBLISH packet id 0", RC_PROTOCOL_ERROR)
    props = cur.properties() if version == V5 else ()
    return PublishPacket(
        topic, cur.rest(), qos, bool(flags & 0x01), bool(flags & 0x08), packet_id, props
    )


@dataclass(frozen=True, slots=True)
class SubscriptionRequest:
    """One filter of a SUBSCRIBE with its options (v3.1.1 carries only the QoS)."""

    topic_filter: str
    qos: int
    no_local: bool = False
    retain_as_published: bool = False
    retain_handling: int = 0


def parse_subscribe(body: bytes, version: int) -> tuple[int, Properties, list[SubscriptionRequest]]:
    """Decode a SUBSCRIBE body into (packet id, properties, requests)."""
    cur = Cursor(body)
    packet_id = cur.u16()
    props = cur.properties() if version == V5 else ()
    requests: list[SubscriptionRequest] = []
    while cur.remaining:
        topic_filter = cur.utf8()
        options = cur.u8()
        reserved = 0xC0 if version == V5 else 0xFC
        if options & reserved or options & 0x03 == 3 or (options >> 4) & 0x03 == 3:
            raise MqttProtocolError("invalid subscription options")
        requests.append(
            SubscriptionRequest(
                topic_filter,
                options & 0x03,
                bool(options & 0x04),
                bool(options & 0x08),
                (options >> 4) & 0x03,
            )
        )
    if not requests:
        raise MqttProtocolError("SUBSCRIBE without filters", RC_PROTOCOL_ERROR)
    return packet_id, props, requests


def parse_unsubscribe(body: bytes, version: int) -> tuple[int, list[str]]:
    """Decode an UNSUBSCRIBE body into (packet id, filters)."""
    cur = Cursor(body)
    packet_id = cur.u16()
    if version == V5:
        cur.properties()
    filters: list[str] = []
    while cur.remaining:
        filters.append(cur.utf8())
    if not filters:
        raise MqttProtocolError("UNSUBSCRIBE without filters", RC_PROTOCOL_ERROR)
    return packet_id, filters


def parse_ack(body: bytes, version: int) -> tuple[int, int]:
    """Decode PUBACK/PUBREC/PUBREL/PUBCOMP into (packet id, reason code)."""
    cur = Cursor(body)
    packet_id = cur.u16()
    reason = cur.u8() if version == V5 and cur.remaining else RC_SUCCESS
    if version == V5 and cur.remaining:
        cur.properties()
    return packet_id, reason


def parse_disconnect(body: bytes, version: int) -> tuple[int, Properties]:
    """Decode a DISCONNECT body into (reason code, properties); v3.1.1 bodies are empty."""
    if version != V5 or not body:
        return RC_SUCCESS, ()
    cur = Cursor(body)
    reason = cur.u8()
    props = cur.properties() if cur.remaining else ()
    return reason, props


def encode_connack(
    version: int, session_present: bool, code: int, props: Sequence[tuple[int, PropValue]] = ()
) -> bytes:
    """CONNACK; v3.1.1 codes are the 0..5 return codes, v5 codes are reason codes."""
    body = bytes([1 if session_present else 0, code])
    if version == V5:
        body += encode_properties(props)
    return encode_packet(CONNACK << 4, body)


def encode_publish(
    topic: str,
    payload: bytes,
    qos: int,
    *,
    retain: bool,
    dup: bool,
    packet_id: int | None,
    props: Sequence[tuple[int, PropValue]] | None,
) -> bytes:
    """PUBLISH; props None means a v3.1.1 receiver (no property section)."""
    first = (PUBLISH << 4) | (0x08 if dup else 0) | (qos << 1) | (0x01 if retain else 0)
    body = encode_utf8(topic)
    if qos:
        assert packet_id is not None
        body += packet_id.to_bytes(2, "big")
    if props is not None:
        body += encode_properties(props)
    return encode_packet(first, body + payload)


def encode_ack(ptype: int, packet_id: int, version: int, reason: int = RC_SUCCESS) -> bytes:
    """PUBACK/PUBREC/PUBREL/PUBCOMP; v5 omits a success reason code as allowed."""
    first = (ptype << 4) | (0x02 if ptype == PUBREL else 0)
    body = packet_id.to_bytes(2, "big")
    if version == V5 and reason != RC_SUCCESS:
        body += bytes([reason])
    return encode_packet(first, body)


def encode_suback(packet_id: int, codes: Sequence[int], version: int, ptype: int = SUBACK) -> bytes:
    """SUBACK or UNSUBACK with one code per filter (v3.1.1 UNSUBACK carries no codes)."""
    body = packet_id.to_bytes(2, "big")
    if version == V5:
        body += encode_properties(())
    if version == V5 or ptype == SUBACK:
        body += bytes(codes)
    return encode_packet(ptype << 4, body)


def encode_disconnect(reason: int) -> bytes:
    """A v5 server DISCONNECT."""
    return encode_packet(DISCONNECT << 4, bytes([reason, 0]))


# --------------------------------------------------------------------------- broker state


@dataclass(frozen=True, slots=True)
class Message:
    """An application message in the broker; expires_at is on the monotonic clock."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    properties: Properties
    expires_at: float | None
    origin: str


def make_message(
    topic: str, payload: bytes, qos: int, retain: bool, props: Properties, *, origin: str
) -> Message:
    """A Message with hop-only properties stripped and the expiry turned into a deadline."""
    expiry = prop(props, P_MESSAGE_EXPIRY)
    expires_at = time.monotonic() + expiry if isinstance(expiry, int) else None
    kept = tuple((k, v) for k, v in props if k not in _HOP_PROPS)
    return Message(topic, payload, qos, retain, kept, expires_at, origin)


@dataclass(slots=True)
class _Subscription:
    qos: int
    no_local: bool
    retain_as_published: bool
    subscription_id: int | None


@dataclass(slots=True)
class _Outgoing:
    message: Message
    qos: int
    retain: bool
    subscription_ids: tuple[int, ...]


@dataclass(eq=False)
class _Session:
    client_id: str
    expiry: float
    subscriptions: dict[str, _Subscription] = field(default_factory=dict)
    queue: deque[_Outgoing] = field(default_factory=deque)
    inflight: dict[int, _Outgoing] = field(default_factory=dict)
    next_packet_id: int = 1
    connection: _Connection | None = None
    expiry_timer: asyncio.TimerHandle | None = None

    def allocate_packet_id(self) -> int:
        while self.next_packet_id in self.inflight:
            self.next_packet_id = self.next_packet_id % 0xFFFF + 1
        packet_id = self.next_packet_id
        self.next_packet_id = self.next_packet_id % 0xFFFF + 1
        return packet_id


@dataclass(eq=False)
class _Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    peer: str
    version: int = V311
    client_id: str = ""
    keepalive: int = 0
    will: WillSpec | None = None
    session: _Session | None = None
    receive_maximum: int = 0xFFFF
    max_packet_out: int = MAX_VARINT + 5
    aliases: dict[int, str] = field(default_factory=dict)
    qos2_pending: set[int] = field(default_factory=set)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    sender: asyncio.Task[None] | None = None
    send_will: bool = True
    ended: bool = False


async def _close(writer: asyncio.StreamWriter) -> None:
    """Flush and close a client socket; a peer that will not take the last bytes gets a reset."""
    writer.close()
    try:
        async with asyncio.timeout(CLOSE_GRACE_S):
            await writer.wait_closed()
    except (TimeoutError, OSError):
        writer.transport.abort()


class _Disconnect(Exception):
    """The client sent DISCONNECT; with_will mirrors v5 reason 0x04."""

    def __init__(self, with_will: bool) -> None:
        super().__init__("client disconnected")
        self.with_will = with_will


class EmbeddedBroker:
    """In-process MQTT broker: start(), .port, stop(); users, when given, are checked on CONNECT."""

    def __init__(
        self,
        *,
        users: Mapping[str, str] | None = None,
        max_packet_size: int = DEFAULT_MAX_PACKET,
        connect_timeout: float = 10.0,
        packet_timeout: float = 30.0,
        write_timeout: float = 30.0,
        max_queued: int = 1000,
    ) -> None:
        self.host = "127.0.0.1"
        self.port = 0
        self._users = dict(users) if users is not None else None
        self._max_packet_size = max_packet_size
        self._connect_timeout = connect_timeout
        self._packet_timeout = packet_timeout
        self._write_timeout = write_timeout
        self._max_queued = max_queued
        self._server: asyncio.Server | None = None
        self._connections: dict[str, _Connection] = {}
        self._sessions: dict[str, _Session] = {}
        self._retained: dict[str, Message] = {}
        self._will_timers: dict[str, asyncio.TimerHandle] = {}
        self._handlers: set[asyncio.Task[None]] = set()
        self._assigned = 0

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Listen on host:port (0 picks a free port, then readable as .port)."""
        self._server = await asyncio.wait_for(
            asyncio.start_server(self._on_client, host, port), timeout=self._connect_timeout
        )
        self.host = host
        self.port = int(self._server.sockets[0].getsockname()[1])
        log.info("broker_started", host=host, port=self.port)

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop listening and drop every client (no wills: the broker is going away)."""
        if self._server is not None:
            self._server.close()
        for conn in list(self._connections.values()):
            conn.send_will = False
            if conn.version == V5:
                with contextlib.suppress(Exception):
                    conn.writer.write(encode_disconnect(RC_SERVER_SHUTTING_DOWN))
            conn.writer.close()
        for task in list(self._handlers):
            task.cancel()
        if self._handlers:
            await asyncio.wait(list(self._handlers), timeout=timeout)
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), timeout=timeout)
            self._server = None
        for handle in self._will_timers.values():
            handle.cancel()
        self._will_timers.clear()
        for session in self._sessions.values():
            if session.expiry_timer is not None:
                session.expiry_timer.cancel()
        self._sessions.clear()
        log.info("broker_stopped", port=self.port)

    async def __aenter__(self) -> EmbeddedBroker:
        await self.start(self.host, self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def client_count(self) -> int:
        """How many clients are connected right now."""
        return len(self._connections)

    # ----------------------------------------------------------------- connection life cycle

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        peername = writer.get_extra_info("peername")
        conn = _Connection(reader, writer, str(peername))
        try:
            await self._serve(conn)
        except asyncio.CancelledError:
            conn.send_will = False
        except Exception:
            log.exception("client_crashed", peer=conn.peer, client_id=conn.client_id)
        finally:
            self._end(conn)
            await _close(writer)
            self._handlers.discard(task)

    async def _serve(self, conn: _Connection) -> None:
        try:
            try:
                ptype, _, body = await self._read_packet(conn, self._connect_timeout)
                if ptype != CONNECT:
                    raise MqttProtocolError("first packet is not CONNECT", RC_PROTOCOL_ERROR)
                if not await self._accept(conn, parse_connect(body)):
                    return
            except TimeoutError:
                log.info("client_connect_timeout", peer=conn.peer)
                return
            except MqttProtocolError as exc:
                log.info("client_rejected", peer=conn.peer, reason=str(exc))
                if exc.reason_code == RC_UNSUPPORTED_VERSION:
                    # The CONNACK format of the version we do not speak is unknowable; 3.1.1's is the safe bet.
                    conn.writer.write(encode_connack(V311, False, 0x01))
                return
            idle = conn.keepalive * 1.5 if conn.keepalive else None
            while True:
                ptype, flags, body = await self._read_packet(conn, idle)
                await self._dispatch(conn, ptype, flags, body)
        except _Disconnect as exc:
            conn.send_will = exc.with_will
        except MqttProtocolError as exc:
            log.info(
                "client_protocol_error",
                peer=conn.peer,
                client_id=conn.client_id,
                reason=str(exc),
                reason_code=exc.reason_code,
            )
            self._say_goodbye(conn, exc.reason_code)
        except TimeoutError:
            log.info("client_keepalive_expired", peer=conn.peer, client_id=conn.client_id)
            self._say_goodbye(conn, RC_KEEPALIVE_TIMEOUT)
        except (ConnectionError, asyncio.IncompleteReadError, OSError):
            log.info("client_connection_lost", peer=conn.peer, client_id=conn.client_id)

    def _say_goodbye(self, conn: _Connection, reason: int) -> None:
        if conn.version == V5 and conn.session is not None and not conn.writer.is_closing():
            conn.writer.write(encode_disconnect(reason))

    async def _read_packet(self, conn: _Connection, idle: float | None) -> tuple[int, int, bytes]:
        """One packet: the first byte may take `idle` seconds, the rest must follow promptly."""
        async with asyncio.timeout(idle):
            first = await conn.reader.readexactly(1)
        try:
            return await self._read_rest(conn, first[0])
        except TimeoutError:
            raise MqttProtocolError("incomplete packet", RC_MALFORMED) from None

    async def _read_rest(self, conn: _Connection, first: int) -> tuple[int, int, bytes]:
        async with asyncio.timeout(self._packet_timeout):
            length = 0
            for shift in range(4):
                byte = (await conn.reader.readexactly(1))[0]
                length += (byte & 0x7F) << (7 * shift)
                if not byte & 0x80:
                    break
            else:
                raise MqttProtocolError("remaining length longer than 4 bytes")
            if length > self._max_packet_size:
                raise MqttProtocolError(f"packet of {length} bytes", RC_PACKET_TOO_LARGE)
            body = await conn.reader.readexactly(length)
        return first >> 4, first & 0x0F, body

    async def _accept(self, conn: _Connection, connect: ConnectPacket) -> bool:
        """Answer CONNECT; True when the client is in, False after a refusal CONNACK."""
        conn.version = connect.version
        v5 = connect.version == V5
        client_id = connect.client_id
        ack_props: list[tuple[int, PropValue]] = []
        refusal: int | None = None
        if not client_id:
            if not v5 and not connect.clean_start:
                refusal = 0x02
            else:
                self._assigned += 1
                client_id = f"embedded-{self.port}-{self._assigned}"
                if v5:
                    ack_props.append((P_ASSIGNED_CLIENT_ID, client_id))
        if refusal is None and prop(connect.properties, P_AUTH_METHOD) is not None:
            refusal = RC_BAD_AUTH_METHOD
        if refusal is None and self._users is not None:
            password = (connect.password or b"").decode(errors="replace")
            if connect.username is None or self._users.get(connect.username) != password:
                refusal = RC_BAD_CREDENTIALS if v5 else 0x04
        if refusal is not None:
            if refusal == RC_BAD_AUTH_METHOD and not v5:
                refusal = 0x05
            log.info("client_refused", peer=conn.peer, client_id=client_id, code=refusal)
            conn.writer.write(encode_connack(connect.version, False, refusal))
            return False

        conn.client_id = client_id
        conn.keepalive = connect.keepalive
        conn.will = connect.will
        conn.receive_maximum = int_prop(connect.properties, P_RECEIVE_MAXIMUM, 0xFFFF) or 0xFFFF
        conn.max_packet_out = (
            int_prop(connect.properties, P_MAXIMUM_PACKET_SIZE, MAX_VARINT + 5) or MAX_VARINT + 5
        )
        if v5:
            expiry = int_prop(connect.properties, P_SESSION_EXPIRY, 0)
            session_expiry = math.inf if expiry == SESSION_NEVER_EXPIRES else float(expiry)
        else:
            session_expiry = 0.0 if connect.clean_start else math.inf

        old = self._connections.get(client_id)
        if old is not None:
            log.info("session_taken_over", client_id=client_id, old_peer=old.peer, peer=conn.peer)
            self._say_goodbye(old, RC_SESSION_TAKEN_OVER)
            self._end(old, keep_session=True)
            old.writer.close()
        pending_will = self._will_timers.pop(client_id, None)
        if pending_will is not None:
            pending_will.cancel()

        session = self._sessions.get(client_id)
        if session is not None and connect.clean_start:
            self._drop_session(session)
            session = None
        session_present = session is not None
        if session is None:
            session = _Session(client_id, session_expiry)
            self._sessions[client_id] = session
        if session.expiry_timer is not None:
            session.expiry_timer.cancel()
            session.expiry_timer = None
        session.expiry = session_expiry
        session.connection = conn
        conn.session = session
        self._connections[client_id] = conn

        if v5:
            ack_props += [
                (P_TOPIC_ALIAS_MAXIMUM, TOPIC_ALIAS_MAXIMUM),
                (P_MAXIMUM_PACKET_SIZE, self._max_packet_size),
                (P_SHARED_SUB_AVAILABLE, 0),
            ]
        conn.writer.write(encode_connack(connect.version, session_present, 0, ack_props))
        conn.sender = asyncio.create_task(self._send_loop(conn), name=f"mqtt-send-{client_id}")
        log.info(
            "client_connected",
            peer=conn.peer,
            client_id=client_id,
            version=connect.version,
            clean_start=connect.clean_start,
            session_present=session_present,
            keepalive=connect.keepalive,
            will=connect.will is not None,
        )
        return True

    def _end(self, conn: _Connection, *, keep_session: bool = False) -> None:
        """Detach a finished connection: session bookkeeping and the will (once)."""
        if conn.ended or conn.session is None:
            conn.ended = True
            return
        conn.ended = True
        if conn.sender is not None:
            conn.sender.cancel()
        if self._connections.get(conn.client_id) is conn:
            del self._connections[conn.client_id]
        session = conn.session
        if session.connection is conn:
            session.connection = None
            if not keep_session:
                self._expire_later(session)
        log.info(
            "client_disconnected",
            peer=conn.peer,
            client_id=conn.client_id,
            will=conn.send_will and conn.will is not None,
        )
        if conn.send_will and conn.will is not None:
            will = conn.will
            delay = min(float(int_prop(will.properties, P_WILL_DELAY, 0)), session.expiry)
            if delay <= 0 or conn.version != V5:
                self._publish_will(conn.client_id, will)
            else:
                loop = asyncio.get_running_loop()
                self._will_timers[conn.client_id] = loop.call_later(
                    delay, self._publish_will, conn.client_id, will
                )

    def _expire_later(self, session: _Session) -> None:
        if session.expiry <= 0:
            self._drop_session(session)
        elif session.expiry != math.inf:
            session.expiry_timer = asyncio.get_running_loop().call_later(
                session.expiry, self._drop_session, session
            )

    def _drop_session(self, session: _Session) -> None:
        if session.expiry_timer is not None:
            session.expiry_timer.cancel()
            session.expiry_timer = None
        if self._sessions.get(session.client_id) is session:
            del self._sessions[session.client_id]

    def _publish_will(self, client_id: str, will: WillSpec) -> None:
        self._will_timers.pop(client_id, None)
        log.info("will_published", client_id=client_id, topic=will.topic)
        self._route(
            make_message(
                will.topic, will.payload, will.qos, will.retain, will.properties, origin=client_id
            )
        )

    # ----------------------------------------------------------------- inbound packets

    async def _dispatch(self, conn: _Connection, ptype: int, flags: int, body: bytes) -> None:
        expected_flags = 0x02 if ptype in (PUBREL, SUBSCRIBE, UNSUBSCRIBE) else 0
        if ptype != PUBLISH and flags != expected_flags:
            raise MqttProtocolError(f"packet type {ptype} with flags {flags:#x}")
        if ptype == PUBLISH:
            await self._on_publish(conn, parse_publish(flags, body, conn.version))
        elif ptype == PUBACK:
            packet_id, _ = parse_ack(body, conn.version)
            assert conn.session is not None
            if conn.session.inflight.pop(packet_id, None) is not None:
                conn.wake.set()
        elif ptype == PUBREL:
            packet_id, _ = parse_ack(body, conn.version)
            known = packet_id in conn.qos2_pending
            conn.qos2_pending.discard(packet_id)
            reason = RC_SUCCESS if known else RC_PACKET_ID_NOT_FOUND
            await self._send(conn, encode_ack(PUBCOMP, packet_id, conn.version, reason))
        elif ptype in (PUBREC, PUBCOMP):
            # We never send QoS 2, so these can only be stale; accepting them costs nothing.
            parse_ack(body, conn.version)
        elif ptype == SUBSCRIBE:
            await self._on_subscribe(conn, body)
        elif ptype == UNSUBSCRIBE:
            await self._on_unsubscribe(conn, body)
        elif ptype == PINGREQ:
            await self._send(conn, encode_packet(PINGRESP << 4, b""))
        elif ptype == DISCONNECT:
            reason, props = parse_disconnect(body, conn.version)
            assert conn.session is not None
            expiry = prop(props, P_SESSION_EXPIRY)
            if isinstance(expiry, int) and conn.session.expiry > 0:
                conn.session.expiry = math.inf if expiry == SESSION_NEVER_EXPIRES else float(expiry)
            raise _Disconnect(with_will=reason == RC_DISCONNECT_WITH_WILL)
        elif ptype == CONNECT:
            raise MqttProtocolError("second CONNECT", RC_PROTOCOL_ERROR)
        else:
            raise MqttProtocolError(f"unexpected packet type {ptype}", RC_PROTOCOL_ERROR)

    async def _on_publish(self, conn: _Connection, packet: PublishPacket) -> None:
        topic = packet.topic
        alias = prop(packet.properties, P_TOPIC_ALIAS)
        if isinstance(alias, int):
            if not 0 < alias <= TOPIC_ALIAS_MAXIMUM:
                raise MqttProtocolError(f"topic alias {alias}", RC_TOPIC_ALIAS_INVALID)
            if topic:
                conn.aliases[alias] = topic
            elif alias in conn.aliases:
                topic = conn.aliases[alias]
            else:
                raise MqttProtocolError(f"unknown topic alias {alias}", RC_PROTOCOL_ERROR)
        if not valid_topic_name(topic):
            raise MqttProtocolError(f"invalid topic name {topic!r}", RC_PROTOCOL_ERROR)
        message = make_message(
            topic,
            packet.payload,
            packet.qos,
            packet.retain,
            packet.properties,
            origin=conn.client_id,
        )
        if packet.qos == 2:
            assert packet.packet_id is not None
            # Deliver on first receipt and remember the id until PUBREL so a DUP is not delivered twice.
            if packet.packet_id not in conn.qos2_pending:
                conn.qos2_pending.add(packet.packet_id)
                self._route(message)
            await self._send(conn, encode_ack(PUBREC, packet.packet_id, conn.version))
            return
        self._route(message)
        if packet.qos == 1:
            assert packet.packet_id is not None
            await self._send(conn, encode_ack(PUBACK, packet.packet_id, conn.version))

    async def _on_subscribe(self, conn: _Connection, body: bytes) -> None:
        packet_id, props, requests = parse_subscribe(body, conn.version)
        session = conn.session
        assert session is not None
        sub_id = prop(props, P_SUBSCRIPTION_ID)
        if sub_id == 0:
            raise MqttProtocolError("subscription identifier 0", RC_PROTOCOL_ERROR)
        codes: list[int] = []
        replays: list[tuple[SubscriptionRequest, _Subscription]] = []
        for request in requests:
            if not valid_topic_filter(request.topic_filter):
                codes.append(RC_TOPIC_FILTER_INVALID if conn.version == V5 else RC_UNSPECIFIED)
                continue
            if conn.version == V5 and request.topic_filter.startswith("$share/"):
                codes.append(RC_SHARED_NOT_SUPPORTED)
                continue
            granted = min(request.qos, 1)
            existed = request.topic_filter in session.subscriptions
            subscription = _Subscription(
                granted,
                request.no_local,
                request.retain_as_published,
                sub_id if isinstance(sub_id, int) else None,
            )
            session.subscriptions[request.topic_filter] = subscription
            codes.append(granted)
            if request.retain_handling == 0 or (request.retain_handling == 1 and not existed):
                replays.append((request, subscription))
        log.debug(
            "client_subscribed",
            client_id=conn.client_id,
            filters=[r.topic_filter for r in requests],
        )
        await self._send(conn, encode_suback(packet_id, codes, conn.version))
        now = time.monotonic()
        for request, subscription in replays:
            for topic, message in list(self._retained.items()):
                if message.expires_at is not None and message.expires_at <= now:
                    del self._retained[topic]
                    continue
                if topic_matches(request.topic_filter, topic):
                    ids = (subscription.subscription_id,) if subscription.subscription_id else ()
                    self._enqueue(
                        session, _Outgoing(message, min(message.qos, subscription.qos), True, ids)
                    )

    async def _on_unsubscribe(self, conn: _Connection, body: bytes) -> None:
        packet_id, filters = parse_unsubscribe(body, conn.version)
        session = conn.session
        assert session is not None
        codes = [
            RC_SUCCESS
            if session.subscriptions.pop(topic_filter, None) is not None
            else RC_NO_SUBSCRIPTION_EXISTED
            for topic_filter in filters
        ]
        await self._send(conn, encode_suback(packet_id, codes, conn.version, UNSUBACK))

    # ----------------------------------------------------------------- routing and delivery

    def _route(self, message: Message) -> None:
        """Store a retained message and queue it for every session with a matching subscription."""
        if message.retain:
            if message.payload:
                self._retained[message.topic] = message
            else:
                self._retained.pop(message.topic, None)
        for session in list(self._sessions.values()):
            qos = -1
            retain = False
            ids: list[int] = []
            for topic_filter, sub in session.subscriptions.items():
                if not topic_matches(topic_filter, message.topic):
                    continue
                if sub.no_local and session.client_id == message.origin:
                    continue
                qos = max(qos, min(message.qos, sub.qos))
                retain = retain or (sub.retain_as_published and message.retain)
                if sub.subscription_id is not None:
                    ids.append(sub.subscription_id)
            if qos < 0:
                continue
            if session.connection is None and qos == 0:
                continue
            self._enqueue(session, _Outgoing(message, qos, retain, tuple(ids)))

    def _enqueue(self, session: _Session, out: _Outgoing) -> None:
        if len(session.queue) >= self._max_queued:
            dropped = session.queue.popleft()
            log.warning("message_dropped", client_id=session.client_id, topic=dropped.message.topic)
        session.queue.append(out)
        if session.connection is not None:
            session.connection.wake.set()

    async def _send(self, conn: _Connection, data: bytes) -> None:
        if conn.writer.is_closing():
            raise ConnectionResetError("connection closing")
        conn.writer.write(data)
        try:
            async with asyncio.timeout(self._write_timeout):
                await conn.writer.drain()
        except TimeoutError:
            raise ConnectionResetError("client does not read") from None

    async def _send_loop(self, conn: _Connection) -> None:
        """Feed queued messages to one client, holding QoS 1 ones to its receive maximum."""
        session = conn.session
        assert session is not None
        try:
            for resend_id, out in list(session.inflight.items()):
                await self._send_publish(conn, out, resend_id, dup=True)
            # A resumed session may already hold messages queued while the client was away.
            conn.wake.set()
            while True:
                await conn.wake.wait()
                conn.wake.clear()
                while session.queue:
                    head = session.queue[0]
                    if head.qos and len(session.inflight) >= conn.receive_maximum:
                        break
                    session.queue.popleft()
                    expires_at = head.message.expires_at
                    if expires_at is not None and expires_at <= time.monotonic():
                        continue
                    packet_id = session.allocate_packet_id() if head.qos else None
                    if packet_id is not None:
                        session.inflight[packet_id] = head
                    await self._send_publish(conn, head, packet_id, dup=False)
        except (TimeoutError, ConnectionError, OSError) as exc:
            log.info("client_write_failed", client_id=conn.client_id, error=repr(exc))
            conn.writer.transport.abort()

    async def _send_publish(
        self, conn: _Connection, out: _Outgoing, packet_id: int | None, *, dup: bool
    ) -> None:
        message = out.message
        props: list[tuple[int, PropValue]] | None = None
        if conn.version == V5:
            props = list(message.properties)
            if message.expires_at is not None:
                remaining = max(1, math.ceil(message.expires_at - time.monotonic()))
                props.append((P_MESSAGE_EXPIRY, remaining))
            props += [(P_SUBSCRIPTION_ID, sub_id) for sub_id in out.subscription_ids]
        data = encode_publish(
            message.topic,
            message.payload,
            out.qos,
            retain=out.retain,
            dup=dup,
            packet_id=packet_id,
            props=props,
        )
        if len(data) > conn.max_packet_out:
            # MQTT 5 §3.1.2.11.4: a message too large for the client is discarded, not truncated.
            log.warning("message_too_large_for_client", client_id=conn.client_id, size=len(data))
            if packet_id is not None:
                session = conn.session
                assert session is not None
                session.inflight.pop(packet_id, None)
            return
        await self._send(conn, data)


async def run_broker(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    ready: Callable[[int], None] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve until cancelled or until stop is set; ready(port) is called once listening."""
    broker = EmbeddedBroker()
    await broker.start(host, port)
    try:
        if ready is not None:
            ready(broker.port)
        await (stop or asyncio.Event()).wait()
    finally:
        await broker.stop()


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m hw_fixtures.broker --port N`: prints {"port": N} first, serves until SIGINT/SIGTERM."""
    parser = argparse.ArgumentParser(prog="python -m hw_fixtures.broker", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)

    from agent.log import configure

    configure(args.log_level)

    def announce(port: int) -> None:
        sys.stdout.write(json.dumps({"port": port}) + "\n")
        sys.stdout.flush()

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await run_broker(args.host, args.port, ready=announce, stop=stop)

    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
