"""The claim protocol at the edge: turns MQTT messages into claim events and claim actions into
publishes. `ClaimDriver` owns no connection (the daemon's MQTT session feeds it and lends it a
publish function); `run_claim_client` gives it an aiomqtt connection of its own (tests, tools).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Awaitable, Callable

import aiomqtt
import msgspec
import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.siblings.claim import (
    BrokerDown,
    BrokerUp,
    ClaimAction,
    ClaimConfig,
    ClaimEvent,
    ClaimSeen,
    ClaimState,
    ClaimTick,
    LocalState,
    PublishClaim,
    ReleaseClaim,
    SiblingSeen,
    Sleep,
    Synced,
    Wake,
    initial_claim_state,
    step,
)
from agent.siblings.view import (
    SiblingAvailability,
    SiblingClaim,
    SiblingDecoder,
    SiblingState,
    claim_topic,
    encode_claim,
)

log = structlog.get_logger(__name__)

#: publish(topic, payload, retain, expiry_seconds or None)
Publish = Callable[[str, bytes, bool, float | None], Awaitable[None]]
PUBLISH_TIMEOUT_S = 5.0


class ClaimDriver:
    """Runs one `ClaimState` machine; every method is safe to call from one asyncio task."""

    def __init__(
        self,
        config: ClaimConfig,
        base: str,
        publish: Publish | None,
        on_wake: Callable[[bool], None],
        *,
        clock: Callable[[], float] = time.monotonic,
        seq: int | None = None,
        on_state: Callable[[ClaimState], None] | None = None,
    ) -> None:
        self.config = config
        self.base = base.rstrip("/")
        self.decoder = SiblingDecoder(self.base, config.group, (config.device, *config.others))
        self._publish = publish
        self._on_wake = on_wake
        self._clock = clock
        # Wall-clock milliseconds: grows across restarts, so an old retained claim is not ours.
        start_seq = seq if seq is not None else int(time.time() * 1000)
        self.state: ClaimState = initial_claim_state(config, clock(), seq=start_seq)
        self._sync_nonce = b""
        #: Called after every event with the new state (status views, tests).
        self.on_state = on_state

    def bind(self, publish: Publish) -> None:
        """Give the driver the publish function of the current MQTT session."""
        self._publish = publish

    @property
    def claim_topic(self) -> str:
        """`<base>/<device>/claim/<group>`: our retained claim."""
        return claim_topic(self.base, self.config.device, self.config.group)

    @property
    def sync_topic(self) -> str:
        """A non-retained marker we publish to ourselves after subscribing (see on_connected)."""
        return f"{self.claim_topic}/sync"

    def subscriptions(self) -> list[str]:
        """Every filter the driver needs: siblings' availability, state, claims, and the marker."""
        return [*self.decoder.subscriptions(), self.sync_topic]

    async def on_connected(self) -> None:
        """Call once subscribed. The marker comes back after the retained messages (one broker
        sends a subscription's retained messages before anything published later), so its
        arrival means the view is fresh."""
        await self._feed(BrokerUp(now=self._clock()))
        self._sync_nonce = secrets.token_hex(8).encode()
        await self._send(self.sync_topic, self._sync_nonce, False, None)

    async def on_disconnected(self) -> None:
        """Call when the session is lost: the group emergency sleeps at once."""
        self._sync_nonce = b""
        await self._feed(BrokerDown(now=self._clock()))

    async def on_message(self, topic: str, payload: bytes) -> None:
        """Hand every message of `subscriptions()` here; others are ignored."""
        now = self._clock()
        if topic == self.sync_topic:
            if self._sync_nonce and payload == self._sync_nonce:
                await self._feed(Synced(now=now))
            return
        msg = self.decoder.decode(topic, payload)
        if isinstance(msg, SiblingAvailability):
            await self._feed(SiblingSeen(device=msg.device, now=now, online=msg.online))
        elif isinstance(msg, SiblingState):
            await self._feed(SiblingSeen(device=msg.device, now=now, connectivity=msg.connectivity))
        elif isinstance(msg, SiblingClaim):
            await self._feed(ClaimSeen(device=msg.device, now=now, ttl=msg.ttl, seq=msg.seq))

    async def on_local(self, *, higher_up: bool, connected: bool) -> None:
        """This device's own policy changed: a non-emergency layer up, or connectivity at all."""
        await self._feed(LocalState(now=self._clock(), higher_up=higher_up, connected=connected))

    async def tick(self) -> None:
        """Call at least every ttl/6 seconds (claim refresh, expiry and timeouts)."""
        await self._feed(ClaimTick(now=self._clock()))

    async def _feed(self, event: ClaimEvent) -> None:
        before = self.state.phase
        self.state, actions = step(self.state, event)
        if self.state.phase is not before:
            log.info(
                "group_claim_phase",
                group=self.config.group,
                phase=self.state.phase.value,
                was=before.value,
            )
        for action in actions:
            await self._carry_out(action)
        if self.on_state is not None:
            self.on_state(self.state)

    async def _send(self, topic: str, payload: bytes, retain: bool, expiry: float | None) -> None:
        if self._publish is None:
            raise aiomqtt.MqttError("no MQTT session bound")
        await self._publish(topic, payload, retain, expiry)

    async def _carry_out(self, action: ClaimAction) -> None:
        cfg = self.config
        if isinstance(action, Wake | Sleep):
            # Wake/Sleep first in the machine's order: a Sleep happens before its ReleaseClaim.
            log.warning(
                "group_emergency_wake" if isinstance(action, Wake) else "group_emergency_sleep",
                group=cfg.group,
                reason=action.reason,
            )
            self._on_wake(isinstance(action, Wake))
            return
        try:
            if isinstance(action, PublishClaim):
                payload = encode_claim(cfg.group, cfg.device, action.ttl, action.seq)
                await self._send(self.claim_topic, payload, True, action.ttl)
            elif isinstance(action, ReleaseClaim):
                await self._send(self.claim_topic, b"", True, None)
        except (aiomqtt.MqttError, TimeoutError) as exc:
            # A lost publish is safe: a claim not echoed never wakes us, and a retained claim
            # expires at the broker (message expiry) and in every sibling's view after its ttl.
            log.warning("group_claim_publish_failed", group=cfg.group, error=str(exc))


def _expiry(seconds: float | None) -> Properties | None:
    if seconds is None:
        return None
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.MessageExpiryInterval = max(1, int(seconds))
    return props


async def run_claim_client(
    driver: ClaimDriver,
    host: str,
    port: int,
    *,
    stop: asyncio.Event,
    connected: Callable[[], bool] = lambda: False,
    tick_interval: float | None = None,
    keepalive: int = 10,
) -> None:
    """One aiomqtt session for `driver` with its own availability and state (tests and tools):
    publishes `online` (Last Will `offline`) and a retained state, then runs until `stop`."""
    cfg = driver.config
    root = f"{driver.base}/{cfg.device}"
    client = aiomqtt.Client(
        host,
        port,
        identifier=f"esim-agent-claim-{cfg.device}",
        protocol=aiomqtt.ProtocolVersion.V5,
        will=aiomqtt.Will(f"{root}/availability", b"offline", qos=1, retain=True),
        keepalive=keepalive,
        timeout=PUBLISH_TIMEOUT_S,
    )

    async def publish(topic: str, payload: bytes, retain: bool, expiry: float | None) -> None:
        await client.publish(
            topic,
            payload,
            qos=1,
            retain=retain,
            properties=_expiry(expiry),
            timeout=PUBLISH_TIMEOUT_S,
        )

    driver.bind(publish)
    interval = tick_interval if tick_interval is not None else cfg.ttl / 6
    async with client:
        try:
            await publish(f"{root}/availability", b"online", True, None)
            state = {"device_id": cfg.device, "connectivity": connected()}
            await publish(f"{root}/state", msgspec.json.encode(state), True, None)
            async with asyncio.timeout(PUBLISH_TIMEOUT_S):
                await client.subscribe([(t, 1) for t in driver.subscriptions()])
            await driver.on_connected()

            async def ticks() -> None:
                while not stop.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), interval)
                    await driver.tick()

            async def messages() -> None:
                async for message in client.messages:
                    payload = message.payload
                    if isinstance(payload, bytes | bytearray):
                        await driver.on_message(str(message.topic), bytes(payload))

            async with asyncio.TaskGroup() as tg:
                tick_task = tg.create_task(ticks())
                msg_task = tg.create_task(messages())
                await stop.wait()
                tick_task.cancel()
                msg_task.cancel()
        finally:
            await driver.on_disconnected()
