"""The watch's broker side: subscribe to every device's retained tree, feed a Fleet.

Two uses: `snapshot()` collects until the retained messages stop coming (a quiet period,
bounded by a timeout); `follow()` keeps the Fleet current and calls back on every change,
reconnecting with backoff when the broker goes away.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import aiomqtt
import structlog

from agent.backoff import backoff_delay
from agent.mqtt.bridge import MqttSettings
from agent.mqtt.reach import BrokerUnreachable, observer_client
from agent.watch.fleet import Fleet

log = structlog.get_logger(__name__)

# QoS 0 on purpose: Mosquitto queues at most `max_queued_messages` (default 1,000) QoS 1
# messages per client beyond those in flight and drops the rest, so a QoS 1 subscription to
# 1,000 devices' retained trees loses most of them. QoS 0 goes straight to the socket; a
# viewer loses nothing on a live TCP connection, and after a reconnect the retained state is
# sent again anyway.
QOS = 0
CONNECT_TIMEOUT_S = 10.0
# A viewer needs no MQTT 5 feature, and paho builds a Properties object for every v5 message:
# with 3.1.1 a 1,000-device retained burst is read in about half the time.
PROTOCOL = aiomqtt.ProtocolVersion.V311


async def _subscribe(client: aiomqtt.Client, fleet: Fleet) -> None:
    await client.subscribe([(f, QOS) for f in fleet.filters], timeout=CONNECT_TIMEOUT_S)


def _payload(message: aiomqtt.Message) -> bytes:
    value = message.payload
    return value if isinstance(value, bytes) else b""


async def snapshot(settings: MqttSettings, fleet: Fleet, *, quiet: float, timeout: float) -> bool:
    """Fill `fleet` from the broker; True when a quiet period was reached before `timeout`.

    The broker sends retained messages right after SUBACK, back to back: a gap of `quiet`
    seconds means they are all in. BrokerUnreachable when no session could be had.
    """
    where = f"{settings.host}:{settings.port}"
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last = [loop.time()]

    async def consume(client: aiomqtt.Client) -> None:
        # One plain `async for`: a per-message wait_for would cost a task per retained message.
        async for message in client.messages:
            fleet.ingest(message.topic.value, _payload(message))
            last[0] = loop.time()

    try:
        async with observer_client(
            settings, "watch", min(timeout, CONNECT_TIMEOUT_S), PROTOCOL
        ) as client:
            await _subscribe(client, fleet)
            last[0] = loop.time()
            consumer = asyncio.create_task(consume(client))
            try:
                while True:
                    now = loop.time()
                    # A starved process wakes with its timer and unread messages together:
                    # only an empty queue after the quiet period means the burst is over.
                    if now - last[0] >= quiet and not len(client.messages):
                        return True
                    if now >= deadline:
                        return False
                    # Wake when the quiet period would end if nothing else arrives.
                    wait_s = max(0.0, min(last[0] + quiet, deadline) - now)
                    await asyncio.wait({consumer}, timeout=wait_s)
                    if consumer.done():
                        consumer.result()  # the broker went away: raise its error
            finally:
                consumer.cancel()
                await asyncio.gather(consumer, return_exceptions=True)
    except aiomqtt.MqttCodeError as exc:
        raise BrokerUnreachable(f"{where} refused the connection: {exc}") from None
    except aiomqtt.MqttError as exc:
        raise BrokerUnreachable(f"{where}: {exc}") from None
    except OSError as exc:
        raise BrokerUnreachable(f"{where}: {exc.strerror or exc}") from None


async def follow(
    settings: MqttSettings,
    fleet: Fleet,
    on_change: Callable[[str | None], None],
    *,
    backoff_initial: float = 1.0,
    backoff_max: float = 30.0,
) -> None:
    """Keep `fleet` current until cancelled; `on_change(problem)` after each change, where
    `problem` is None while connected and the reason otherwise."""
    where = f"{settings.host}:{settings.port}"
    attempt = 0
    while True:
        try:
            async with observer_client(settings, "watch", CONNECT_TIMEOUT_S, PROTOCOL) as client:
                await _subscribe(client, fleet)
                attempt = 0
                on_change(None)
                async for message in client.messages:
                    if fleet.ingest(message.topic.value, _payload(message)):
                        on_change(None)
        except (aiomqtt.MqttError, OSError) as exc:
            problem = f"{where}: {exc}"
            log.warning("watch_broker_lost", broker=where, error=str(exc))
            on_change(problem)
        await asyncio.sleep(backoff_delay(attempt, backoff_initial, backoff_max))
        attempt += 1
