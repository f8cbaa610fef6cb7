"""The watch's broker side: subscribe to every device's retained tree, feed a Fleet.

Two uses: `snapshot()` collects until the retained messages stop coming (a quiet period,
bounded by a timeout); `follow()` keeps the Fleet current and calls back on every change,
reconnecting with backoff when the broker goes away.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import aiomqtt
import structlog

from agent.backoff import backoff_delay
from agent.mqtt.bridge import MqttSettings
from agent.mqtt.reach import BrokerUnreachable, observer_client
from agent.watch.fleet import Fleet

log = structlog.get_logger(__name__)

QOS = 1
CONNECT_TIMEOUT_S = 10.0


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
    deadline = time.monotonic() + timeout
    try:
        async with observer_client(settings, "watch", min(timeout, CONNECT_TIMEOUT_S)) as client:
            await _subscribe(client, fleet)
            messages = client.messages
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                try:
                    message = await asyncio.wait_for(anext(messages), min(quiet, left))
                except TimeoutError:
                    # Quiet only counts when the whole period fitted before the deadline.
                    return left >= quiet
                fleet.ingest(message.topic.value, _payload(message))
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
            async with observer_client(settings, "watch", CONNECT_TIMEOUT_S) as client:
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
