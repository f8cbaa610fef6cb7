"""One command to another device of the group: MQTT v5 request/response on a client of its own.

The request goes to `<base>/<target>/cmd/<command>` with a Response Topic under the target's own
`cmd/<command>/response/…` (the only place in another device's tree a daemon answers to, and a
topic the target may write under the shipped ACL) and Correlation Data to match the answer.
The connection is made for the one request and closed after it: a daemon's own session is never
borrowed, and a lost answer is simply asked for again by the caller. A target whose availability
says `offline` (retained, or its Last Will while we wait) ends the wait at once.
"""

from __future__ import annotations

import asyncio
import secrets
from typing import Any, Final

import aiomqtt
import msgspec
import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.errors import AgentError
from agent.mqtt.bridge import QOS, MqttSettings
from agent.mqtt.payloads import CommandResponse
from agent.mqtt.reach import observer_client
from agent.mqtt.topics import Topics

log = structlog.get_logger(__name__)

CONNECT_TIMEOUT_S: Final = 10.0


class RequestFailed(AgentError):
    """No answer: the broker could not be reached, or the target did not answer in time."""


def response_topic(settings: MqttSettings, target: str, command: str, sender: str) -> str:
    """A fresh response topic under the target's own `cmd/<command>/response/` tree."""
    base = Topics(settings.base_topic, target).command_response(command)
    return f"{base}/{sender}-{secrets.token_hex(6)}"


async def request(
    settings: MqttSettings,
    target: str,
    command: str,
    body: dict[str, Any],
    *,
    timeout: float,
    sender: str,
) -> CommandResponse:
    """Send one command to target and wait up to timeout for its answer; RequestFailed without
    one (the caller decides whether to ask again)."""
    topics = Topics(settings.base_topic, target)
    reply_to = response_topic(settings, target, command, sender)
    correlation = secrets.token_bytes(12)
    payload = {**body, "sender": sender}
    if settings.command_token is not None:
        payload["token"] = settings.command_token
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.ResponseTopic = reply_to
    props.CorrelationData = correlation
    try:
        async with asyncio.timeout(timeout):
            async with observer_client(settings, f"req-{sender}", CONNECT_TIMEOUT_S) as client:
                # Subscribed before the request goes out: the answer can never come first.
                await client.subscribe(reply_to, qos=QOS)
                # The target's availability (retained, and its Last Will): a target that is or
                # goes offline will not answer, so the caller hears of it now, not at the timeout.
                await client.subscribe(topics.availability, qos=QOS)
                await client.publish(
                    topics.command(command),
                    msgspec.json.encode(payload),
                    qos=QOS,
                    properties=props,
                )
                async for message in client.messages:
                    if message.topic.value == topics.availability:
                        if message.payload == b"offline":
                            raise RequestFailed(f"{target} is offline")
                        continue
                    got = getattr(message.properties, "CorrelationData", None)
                    if got is None or bytes(got) != correlation:
                        continue
                    raw = message.payload if isinstance(message.payload, bytes) else b""
                    try:
                        return msgspec.json.decode(raw, type=CommandResponse)
                    except msgspec.DecodeError as exc:
                        raise RequestFailed(f"{target}: unreadable answer: {exc}") from None
    except TimeoutError:
        raise RequestFailed(f"{target}: no answer to {command} within {timeout:g} s") from None
    except aiomqtt.MqttError as exc:
        raise RequestFailed(f"{target}: broker: {exc}") from None
    raise RequestFailed(f"{target}: the broker ended the session before the answer")
