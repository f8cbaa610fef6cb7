"""The MQTT session loop: retained state snapshot, events, Last Will, reconnect, command intake."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiomqtt
import msgspec
import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from agent.backoff import Backoff
from agent.mqtt import discovery
from agent.mqtt.commands import (
    CommandContext,
    CommandHandler,
    CommandPolicy,
    execute,
    rejected_at_intake,
)
from agent.mqtt.payloads import COMMANDS, MAX_COMMAND_BYTES, CommandResponse, ErrorBody, encode
from agent.mqtt.topics import Topics

log = structlog.get_logger(__name__)

QOS = 1
MAX_CONCURRENT_COMMANDS = 4
# MQTT v5 "don't send retained messages at subscribe": a stale retained command must never replay.
_RETAIN_HANDLING_NONE = 2
# The largest packet we accept (MQTT 5 CONNECT Maximum Packet Size): the broker drops anything
# bigger instead of sending it, so a hostile publish never reaches our memory. Requests are at
# most MAX_COMMAND_BYTES; the rest is room for the topic and properties.
MAX_PACKET_BYTES = MAX_COMMAND_BYTES + 8 * 1024


@dataclass(frozen=True, slots=True)
class MqttSettings:
    """Broker connection, topic layout and command policy; the daemon maps the TOML config here."""

    host: str = "127.0.0.1"
    port: int = 1883
    username: str | None = None
    password: str | None = None
    tls: bool = False
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_insecure: bool = False
    client_id: str | None = None
    base_topic: str = "esim-agent"
    keepalive: int = 30
    discovery_prefix: str | None = "homeassistant"
    commands_enabled: bool = False
    allowed_commands: frozenset[str] = field(default_factory=lambda: frozenset(COMMANDS))
    command_token: str | None = None
    allowed_senders: frozenset[str] = frozenset()
    redact: bool = False
    connect_timeout: float = 10.0
    publish_timeout: float = 10.0
    command_timeout: float = 300.0
    backoff_initial: float = 1.0
    backoff_max: float = 60.0
    event_queue_size: int = 1000


@dataclass(frozen=True, slots=True)
class _Outgoing:
    """A non-retained message waiting for the broker."""

    topic: str
    payload: bytes
    properties: Properties | None = None


class _Stop(Exception):
    """Ends a session's task group after a clean goodbye."""


class MqttBridge:
    """Publishes the agent's state to MQTT and serves commands; every public method but run/close is sync."""

    def __init__(
        self, settings: MqttSettings, device_id: str, command_handler: CommandHandler | None = None
    ) -> None:
        self.settings = settings
        self.topics = Topics(settings.base_topic, device_id)
        self._handler = command_handler
        self._policy = CommandPolicy(
            enabled=settings.commands_enabled,
            allowed=settings.allowed_commands,
            token=settings.command_token,
            allowed_senders=settings.allowed_senders,
        )
        # Latest retained payload per topic: the whole truth we re-publish after every reconnect.
        self._snapshot: dict[str, bytes] = {}
        self._watches: dict[str, list[Callable[[str, bytes], None]]] = {}
        self._session_up: list[Callable[[], None]] = []
        self._session_down: list[Callable[[], None]] = []
        #: The live session's client, for publish_raw (None between sessions).
        self._client_now: aiomqtt.Client | None = None
        self._dirty: dict[str, None] = {}
        self._outbox: deque[_Outgoing] = deque(maxlen=settings.event_queue_size)
        self._wake = asyncio.Event()
        self._connected = asyncio.Event()
        self._disconnected = asyncio.Event()
        self._disconnected.set()
        self._nudge = asyncio.Event()
        self._idle = asyncio.Event()
        self._closing = asyncio.Event()
        self._closed = asyncio.Event()
        self._known_modems: set[str] = set()
        self._command_tasks: set[asyncio.Task[None]] = set()
        self.dropped_events = 0
        self.connections = 0
        if settings.discovery_prefix:
            for topic, config in discovery.device_configs(self.topics, settings.discovery_prefix):
                self._set_retained(topic, encode(config))

    # ------------------------------------------------------------------ publishing (non-blocking)

    @property
    def connected(self) -> bool:
        """Whether a broker session is up right now."""
        return self._connected.is_set()

    async def wait_connected(self, timeout: float) -> None:
        """Wait until a broker session is up; TimeoutError after `timeout` seconds."""
        async with asyncio.timeout(timeout):
            await self._connected.wait()

    async def wait_disconnected(self, timeout: float) -> None:
        """Wait until no broker session is up; TimeoutError after `timeout` seconds."""
        async with asyncio.timeout(timeout):
            await self._disconnected.wait()

    async def wait_flushed(self, timeout: float) -> None:
        """Wait until the broker has acknowledged everything published so far."""
        async with asyncio.timeout(timeout):
            await self._idle.wait()

    def reconnect_now(self) -> None:
        """Cut a pending backoff wait short, e.g. when a new uplink has just come up."""
        self._nudge.set()

    def publish_state(self, key: str, payload: msgspec.Struct | Mapping[str, Any]) -> None:
        """Set the retained value of `<base>/<device>/<key>`; returns at once, sends when connected."""
        topic = self.topics.key(key)
        parts = key.split("/")
        if parts[0] == "modems" and len(parts) == 2:
            self._discover_modem(parts[1])
            online = _online(payload)
            if online is not None:
                # Home Assistant's per-modem availability (discovery.modem_configs).
                self._set_retained(
                    self.topics.modem_availability(parts[1]),
                    (discovery.ONLINE if online else discovery.OFFLINE).encode(),
                )
        self._set_retained(topic, encode(payload, redacted=self.settings.redact))

    def clear_state(self, key: str) -> None:
        """Delete the retained value of `<base>/<device>/<key>` (and a modem's discovery configs)."""
        parts = key.split("/")
        if parts[0] == "modems" and len(parts) == 2 and parts[1] in self._known_modems:
            self._known_modems.discard(parts[1])
            if self.settings.discovery_prefix:
                for topic, _ in discovery.modem_configs(
                    self.topics, self.settings.discovery_prefix, parts[1]
                ):
                    self._set_retained(topic, b"")
            self._set_retained(self.topics.modem_availability(parts[1]), b"")
        # An empty retained payload is MQTT's way to delete; re-sending it after reconnect is harmless.
        self._set_retained(self.topics.key(key), b"")

    def watch(self, topic_filter: str, callback: Callable[[str, bytes], None]) -> None:
        """Deliver messages on topic_filter (retained ones too) to callback(topic, payload);
        subscribed on every (re)connect. For state other devices publish, e.g. shared pools.
        Several callbacks may watch the same filter (each gets every message)."""
        self._watches.setdefault(topic_filter, []).append(callback)

    def on_session(self, up: Callable[[], None], down: Callable[[], None]) -> None:
        """Call up() once a session is subscribed to every watch (before any message of it is
        delivered), down() when that session is lost or closed. For parts that must know when
        their view of other devices is live (agent.daemon.siblings)."""
        self._session_up.append(up)
        self._session_down.append(down)

    async def publish_raw(
        self, topic: str, payload: bytes, retain: bool, expiry: float | None
    ) -> None:
        """Publish now on the live session (QoS 1), with an MQTT v5 message expiry in seconds
        when given; aiomqtt.MqttError when no session is up. Nothing is queued for a later
        session: the caller decides what a lost publish means (a group claim must not outlive
        the session that made it)."""
        client = self._client_now
        if client is None or not self._connected.is_set():
            raise aiomqtt.MqttError("no MQTT session")
        props: Properties | None = None
        if expiry is not None:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.MessageExpiryInterval = max(1, int(expiry))
        await client.publish(
            topic,
            payload,
            qos=QOS,
            retain=retain,
            properties=props,
            timeout=self.settings.publish_timeout,
        )

    def publish_event(self, payload: msgspec.Struct | Mapping[str, Any]) -> None:
        """Queue a non-retained event; when the queue is full the oldest event is dropped."""
        self._enqueue(_Outgoing(self.topics.events, encode(payload, redacted=self.settings.redact)))

    def snapshot(self) -> dict[str, Any]:
        """Current retained state as builtins keyed by state key (`state`, `modems/m1`, ...)."""
        prefix = self.topics.root + "/"
        return {
            topic[len(prefix) :]: _decoded(payload)
            for topic, payload in self._snapshot.items()
            if topic.startswith(prefix) and payload
        }

    def _discover_modem(self, modem_id: str) -> None:
        """Queue Home Assistant configs the first time a modem shows up."""
        if modem_id in self._known_modems:
            return
        self._known_modems.add(modem_id)
        if self.settings.discovery_prefix:
            for topic, config in discovery.modem_configs(
                self.topics, self.settings.discovery_prefix, modem_id
            ):
                self._set_retained(topic, encode(config))

    def _set_retained(self, topic: str, payload: bytes) -> None:
        """Record the latest value of a retained topic and wake the sender."""
        self._snapshot[topic] = payload
        self._dirty[topic] = None
        self._idle.clear()
        self._wake.set()

    def _enqueue(self, item: _Outgoing) -> None:
        """Queue a non-retained message, counting what the bounded queue pushes out."""
        if len(self._outbox) == self._outbox.maxlen:
            self.dropped_events += 1
            log.warning("mqtt_event_dropped", dropped=self.dropped_events)
        self._outbox.append(item)
        self._idle.clear()
        self._wake.set()

    # ------------------------------------------------------------------------------ session loop

    async def run(self) -> None:
        """Connect, publish, serve commands and reconnect with backoff until close() is called."""
        backoff = Backoff(self.settings.backoff_initial, self.settings.backoff_max)
        try:
            while not self._closing.is_set():
                before = self.connections
                try:
                    await self._session()
                except* (aiomqtt.MqttError, OSError) as group:
                    log.warning("mqtt_disconnected", error=str(group.exceptions[0]))
                if self._closing.is_set():
                    break
                if self.connections != before:
                    backoff.reset()
                delay = backoff.next()
                log.info("mqtt_reconnect_wait", delay_s=round(delay, 2), attempt=backoff.attempt)
                await self._backoff_wait(delay)
        finally:
            for task in list(self._command_tasks):
                task.cancel()
            if self._command_tasks:
                await asyncio.gather(*self._command_tasks, return_exceptions=True)
            self._connected.clear()
            self._closed.set()

    async def _backoff_wait(self, delay: float) -> None:
        """Sleep `delay` seconds unless close() or reconnect_now() comes first."""
        closing = asyncio.ensure_future(self._closing.wait())
        nudge = asyncio.ensure_future(self._nudge.wait())
        try:
            await asyncio.wait((closing, nudge), timeout=delay, return_when=asyncio.FIRST_COMPLETED)
        finally:
            closing.cancel()
            nudge.cancel()
            self._nudge.clear()

    async def close(self, timeout: float = 5.0) -> None:
        """Publish `offline`, disconnect cleanly and wait for run() to finish (at most `timeout` s)."""
        self._closing.set()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._closed.wait()

    def _client(self) -> aiomqtt.Client:
        """A fresh aiomqtt client for one session: MQTT v5, clean start, Last Will `offline`."""
        s = self.settings
        tls = None
        if s.tls or s.tls_ca or s.tls_cert or s.tls_insecure:
            tls = aiomqtt.TLSParameters(ca_certs=s.tls_ca, certfile=s.tls_cert, keyfile=s.tls_key)
        return aiomqtt.Client(
            s.host,
            s.port,
            username=s.username,
            password=s.password,
            identifier=s.client_id or f"esim-agent-{self.topics.device_id}",
            protocol=aiomqtt.ProtocolVersion.V5,
            will=aiomqtt.Will(self.topics.availability, b"offline", qos=QOS, retain=True),
            clean_start=True,
            properties=_connect_properties(),
            keepalive=s.keepalive,
            timeout=s.connect_timeout,
            tls_params=tls,
            tls_insecure=s.tls_insecure if tls is not None else None,
        )

    async def _session(self) -> None:
        """One broker connection from CONNECT to DISCONNECT or failure."""
        async with self._client() as client:
            timeout = self.settings.publish_timeout
            await client.publish(
                self.topics.availability, b"online", qos=QOS, retain=True, timeout=timeout
            )
            # Subscribed even when commands are disabled so callers get an answer, not a timeout.
            # Retain As Published: a request published with RETAIN while we are subscribed keeps
            # its flag, so the receiver can refuse it live as well as on replay.
            options = SubscribeOptions(
                qos=QOS, retainAsPublished=True, retainHandling=_RETAIN_HANDLING_NONE
            )
            await client.subscribe(self.topics.command_filter, options=options, timeout=timeout)
            for topic_filter in self._watches:
                await client.subscribe(topic_filter, qos=QOS, timeout=timeout)
            self.connections += 1
            self._dirty = dict.fromkeys(self._snapshot)
            self._idle.clear()
            self._wake.set()
            self._disconnected.clear()
            self._client_now = client
            self._connected.set()
            log.info("mqtt_connected", host=self.settings.host, port=self.settings.port)
            # Before the receiver starts: listeners hear "up" before the session's messages.
            self._notify(self._session_up)
            try:
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(self._sender(client), name="mqtt-sender")
                    tg.create_task(self._receiver(client), name="mqtt-receiver")
                    tg.create_task(self._goodbye(client), name="mqtt-goodbye")
            except* _Stop:
                log.info("mqtt_closed")
            finally:
                self._connected.clear()
                self._client_now = None
                self._disconnected.set()
                self._notify(self._session_down)

    @staticmethod
    def _notify(listeners: list[Callable[[], None]]) -> None:
        for listener in listeners:
            try:
                listener()
            except Exception:
                log.exception("mqtt_session_listener_failed")

    async def _goodbye(self, client: aiomqtt.Client) -> None:
        """On close(): flush what is pending, say `offline`, and end the session."""
        await self._closing.wait()
        with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
            async with asyncio.timeout(self.settings.publish_timeout):
                await self._flush(client)
            await client.publish(
                self.topics.availability,
                b"offline",
                qos=QOS,
                retain=True,
                timeout=self.settings.publish_timeout,
            )
        raise _Stop

    async def _sender(self, client: aiomqtt.Client) -> None:
        """Send dirty retained topics (latest value only) and queued messages whenever woken."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self._flush(client)

    async def _flush(self, client: aiomqtt.Client) -> None:
        """Send everything pending; on failure the item stays pending for the next session."""
        timeout = self.settings.publish_timeout
        while self._dirty or self._outbox:
            if self._dirty:
                topic = next(iter(self._dirty))
                del self._dirty[topic]
                try:
                    await client.publish(
                        topic, self._snapshot[topic], qos=QOS, retain=True, timeout=timeout
                    )
                except BaseException:
                    self._dirty.setdefault(topic, None)
                    raise
            else:
                item = self._outbox.popleft()
                try:
                    await client.publish(
                        item.topic,
                        item.payload,
                        qos=QOS,
                        properties=item.properties,
                        timeout=timeout,
                    )
                except BaseException:
                    self._outbox.appendleft(item)
                    raise
        self._idle.set()

    async def _receiver(self, client: aiomqtt.Client) -> None:
        """Turn each command request into a task; never lets a request end the session."""
        async for message in client.messages:
            command = self.topics.command_name(message.topic.value)
            if command is None:
                self._deliver_watched(message.topic, message.payload)
                continue
            if message.retain:
                log.warning("mqtt_command_retained_ignored", command=command[:64])
                continue
            payload = message.payload if isinstance(message.payload, bytes) else b""
            props = message.properties
            if not payload and getattr(props, "ResponseTopic", None) is None:
                # An empty publish with nowhere to answer is somebody deleting a retained
                # request (brokers forward deletions to live subscribers), not a request.
                log.info("mqtt_command_empty_ignored", command=command[:64])
                continue
            ctx = self._context(command, message)
            if len(self._command_tasks) >= MAX_CONCURRENT_COMMANDS:
                self._respond(ctx, _busy(command), self._fallback(command))
                continue
            task = asyncio.create_task(
                self._run_command(command, payload, ctx), name=f"mqtt-cmd-{command[:32]}"
            )
            self._command_tasks.add(task)
            task.add_done_callback(self._command_tasks.discard)

    def _deliver_watched(self, topic: aiomqtt.Topic, payload: object) -> None:
        data = bytes(payload) if isinstance(payload, bytes | bytearray) else b""
        for topic_filter, callbacks in self._watches.items():
            if topic.matches(topic_filter):
                for callback in callbacks:
                    try:
                        callback(topic.value, data)
                    except Exception:
                        log.exception("mqtt_watch_callback_failed", topic=topic.value)

    def _context(self, command: str, message: aiomqtt.Message) -> CommandContext:
        """Where to answer: the request's v5 response topic if usable, else the documented fallback."""
        props = message.properties
        response_topic = getattr(props, "ResponseTopic", None) if props is not None else None
        correlation = getattr(props, "CorrelationData", None) if props is not None else None
        if not isinstance(response_topic, str) or not self._usable_response_topic(response_topic):
            response_topic = self._fallback(command)
        return CommandContext(
            command=command,
            topic=message.topic.value,
            response_topic=response_topic,
            correlation_data=bytes(correlation)
            if isinstance(correlation, bytes | bytearray)
            else None,
            request_id=None,
            sender=None,
        )

    def _fallback(self, command: str) -> str:
        """The device's own response topic for a command (`unknown` for names we do not know)."""
        return self.topics.command_response(command if command in COMMANDS else "unknown")

    def _usable_response_topic(self, topic: str) -> bool:
        """A caller's response topic we may publish on: a plain topic outside every device's
        tree (ours included, but for replies under our own `cmd/<name>/`), outside Home
        Assistant discovery and outside the broker's `$` topics."""
        if not topic or len(topic.encode("utf-8")) > 1024 or any(ch in topic for ch in "+#\x00"):
            return False
        if topic.startswith("$"):
            return False
        prefix = self.settings.discovery_prefix
        if prefix and (topic == prefix or topic.startswith(prefix + "/")):
            return False
        base = self.topics.base
        if topic == base or topic.startswith(base + "/"):
            own = self.topics.root + "/cmd/"
            # <root>/cmd/<name> itself is a request topic: a reply there would be a request.
            return topic.startswith(own) and "/" in topic.removeprefix(own)
        return True

    async def _run_command(self, command: str, payload: bytes, ctx: CommandContext) -> None:
        """Execute one request and queue its response."""
        response = await execute(
            command,
            payload,
            ctx,
            policy=self._policy,
            handler=self._handler,
            timeout=self.settings.command_timeout,
        )
        # An unauthorised or malformed request chooses nothing, its response topic included.
        topic = self._fallback(command) if rejected_at_intake(response) else None
        self._respond(ctx, response, topic)

    def _respond(
        self, ctx: CommandContext, response: CommandResponse, topic: str | None = None
    ) -> None:
        """Queue a response with the request's correlation data (on topic, if given)."""
        props: Properties | None = None
        if ctx.correlation_data is not None:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.CorrelationData = ctx.correlation_data
        self._enqueue(_Outgoing(topic or ctx.response_topic, encode(response), props))


def _connect_properties() -> Properties:
    """CONNECT properties: the Maximum Packet Size the broker must respect towards us."""
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.MaximumPacketSize = MAX_PACKET_BYTES
    return props


def _decoded(payload: bytes) -> Any:
    """A retained payload as builtins: JSON, or the plain text of an availability topic."""
    try:
        return msgspec.json.decode(payload)
    except msgspec.DecodeError:
        return payload.decode("utf-8", errors="replace")


def _online(payload: msgspec.Struct | Mapping[str, Any]) -> bool | None:
    """The `online` field of a modem record, None when it has none."""
    value = (
        payload.get("online") if isinstance(payload, Mapping) else getattr(payload, "online", None)
    )
    return value if isinstance(value, bool) else None


def _busy(command: str) -> CommandResponse:
    """The answer when too many commands are already running."""
    known = command if command in COMMANDS else None
    return CommandResponse(
        ok=False, command=known, error=ErrorBody(code="busy", message="too many commands running")
    )
