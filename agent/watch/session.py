"""The watch's broker side: subscribe to every device's retained tree, feed a Fleet.

Two uses: `snapshot()` collects the retained state once and knows when it has all of it (a
marker echo, below); `follow()` keeps the Fleet current and calls back on every change,
reconnecting with backoff when the broker goes away.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import aiomqtt
import structlog

from agent.backoff import backoff_delay
from agent.mqtt.bridge import MqttSettings
from agent.mqtt.reach import BrokerUnreachable, observer_client
from agent.mqtt.topics import check_segment
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
#: The marker's level under the viewer's own `<base>/<username>/` tree (the shipped ACL lets
#: every user write there); `_watch` stands in without a username (no device id starts with `_`).
SYNC_LEVEL = "watch-sync"
ANONYMOUS = "_watch"

Settled = Literal["marker", "quiet", "timeout"]


@dataclass(slots=True)
class SnapshotRun:
    """How one snapshot went: how it ended and where the time went (seconds)."""

    settled: Settled = "timeout"
    connect_s: float = 0.0
    subscribe_s: float = 0.0
    #: SUBACK to the marker's echo (or the quiet period's end): the retained flood.
    flood_s: float = 0.0
    #: Of flood_s, the time spent folding messages into the Fleet.
    ingest_s: float = 0.0
    #: Of flood_s, from the last retained message to knowing it was the last (marker or quiet).
    settle_s: float = 0.0
    messages: int = 0

    @property
    def complete(self) -> bool:
        """Whether the snapshot saw the whole retained state (not cut off by the timeout)."""
        return self.settled != "timeout"


def sync_topic(settings: MqttSettings, nonce: str) -> str:
    """Where a snapshot sends its marker: under the viewer's own tree, on no fleet topic."""
    user = settings.username or ANONYMOUS
    try:
        check_segment(user)
    except ValueError:
        user = ANONYMOUS
    return f"{settings.base_topic}/{user}/{SYNC_LEVEL}/{nonce}"


async def _subscribe(client: aiomqtt.Client, filters: list[str]) -> None:
    await client.subscribe([(f, QOS) for f in filters], timeout=CONNECT_TIMEOUT_S)


def _payload(message: aiomqtt.Message) -> bytes:
    value = message.payload
    return value if isinstance(value, bytes) else b""


async def snapshot(
    settings: MqttSettings, fleet: Fleet, *, quiet: float, timeout: float
) -> SnapshotRun:
    """Fill `fleet` with the broker's retained state; BrokerUnreachable without a session.

    The broker sends a subscription's retained messages before anything published after the
    SUBSCRIBE (one client's packets are handled in order, and one session's QoS 0 messages
    are delivered in order). So after SUBACK we publish a random marker to a topic we also
    subscribed to: its echo means every retained message is in, however slow the machine or
    the link (through a bridge too: the retained state is the local broker's). When the marker
    cannot come back (an ACL that lets us read but not write) a gap of `quiet` seconds ends it.
    """
    where = f"{settings.host}:{settings.port}"
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    run = SnapshotRun()
    nonce = secrets.token_hex(8)
    marker, marker_payload = sync_topic(settings, nonce), nonce.encode()
    last = [loop.time()]
    echoed = asyncio.Event()
    ingest, clock = fleet.ingest, time.perf_counter

    def on_message(message: aiomqtt.Message) -> None:
        topic = message.topic.value
        if topic == marker:
            if message.payload == marker_payload:
                echoed.set()
            return
        t0 = clock()
        ingest(topic, _payload(message))
        run.ingest_s += clock() - t0
        run.messages += 1
        last[0] = loop.time()

    t0 = time.perf_counter()
    try:
        async with observer_client(
            settings, "watch", min(timeout, CONNECT_TIMEOUT_S), PROTOCOL, _folding(on_message)
        ) as client:
            t1 = time.perf_counter()
            run.connect_s = t1 - t0
            await _subscribe(client, [*fleet.filters, marker])
            await client.publish(marker, marker_payload, qos=QOS, timeout=CONNECT_TIMEOUT_S)
            t2 = time.perf_counter()
            run.subscribe_s = t2 - t1
            last[0] = loop.time()
            # Nothing is ever queued, so this only waits: it raises when the broker goes away.
            lost = asyncio.create_task(_until_lost(client))
            try:
                run.settled = await _settle(lost, echoed, last, quiet, deadline)
            finally:
                lost.cancel()
                await asyncio.gather(lost, return_exceptions=True)
            run.flood_s = time.perf_counter() - t2
            run.settle_s = max(0.0, loop.time() - last[0])
    except aiomqtt.MqttCodeError as exc:
        raise BrokerUnreachable(f"{where} refused the connection: {exc}") from None
    except aiomqtt.MqttError as exc:
        raise BrokerUnreachable(f"{where}: {exc}") from None
    except OSError as exc:
        raise BrokerUnreachable(f"{where}: {exc.strerror or exc}") from None
    log.debug(
        "watch_snapshot",
        settled=run.settled,
        messages=run.messages,
        connect_s=round(run.connect_s, 3),
        subscribe_s=round(run.subscribe_s, 3),
        flood_s=round(run.flood_s, 3),
        ingest_s=round(run.ingest_s, 3),
        settle_s=round(run.settle_s, 3),
    )
    return run


def _folding(
    on_message: Callable[[aiomqtt.Message], None],
) -> type[asyncio.Queue[aiomqtt.Message]]:
    """An aiomqtt incoming queue (its `queue_type`) that hands each message to `on_message` as
    aiomqtt puts it in, instead of storing it: a retained flood then costs no task and no wait
    per message (about a quarter of the reading time for 7,000 messages)."""

    class Folding(asyncio.Queue[aiomqtt.Message]):
        def put_nowait(self, item: aiomqtt.Message) -> None:
            on_message(item)

    return Folding


async def _until_lost(client: aiomqtt.Client) -> None:
    async for _ in client.messages:
        pass  # never reached: the folding queue keeps nothing
    raise aiomqtt.MqttError("the message stream ended")


async def _settle(
    lost: asyncio.Task[None],
    echoed: asyncio.Event,
    last: list[float],
    quiet: float,
    deadline: float,
) -> Settled:
    """Wait for the marker's echo, else a quiet gap, else the deadline; raise if the broker
    went away."""
    loop = asyncio.get_running_loop()
    echo = asyncio.create_task(echoed.wait())
    try:
        while True:
            if lost.done():
                lost.result()  # the broker went away: raise its error
            if echoed.is_set():
                return "marker"
            now = loop.time()
            # Messages are folded in the socket's reader callbacks, which a starved process runs
            # before the timer that wakes us: a quiet gap measured here is real.
            if now - last[0] >= quiet:
                return "quiet"
            if now >= deadline:
                return "timeout"
            wait_s = max(0.0, min(last[0] + quiet, deadline) - now)
            await asyncio.wait({lost, echo}, timeout=wait_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        echo.cancel()


async def follow(
    settings: MqttSettings,
    fleet: Fleet,
    on_change: Callable[[str | None], None],
    *,
    backoff_initial: float = 1.0,
    backoff_max: float = 30.0,
) -> None:
    """Keep `fleet` current until cancelled; `on_change(problem)` after each change of the
    fleet or of the connection, where `problem` is None while connected and the reason
    otherwise. A message that changes nothing, or a retry failing the same way, is no change."""
    where = f"{settings.host}:{settings.port}"
    attempt = 0
    reported: str | None = None
    while True:
        try:
            async with observer_client(settings, "watch", CONNECT_TIMEOUT_S, PROTOCOL) as client:
                await _subscribe(client, fleet.filters)
                attempt = 0
                if reported is not None:
                    reported = None
                    on_change(None)
                async for message in client.messages:
                    if fleet.ingest(message.topic.value, _payload(message)):
                        on_change(None)
        except (aiomqtt.MqttError, OSError) as exc:
            problem = f"{where}: {exc}"
            log.warning("watch_broker_lost", broker=where, error=str(exc))
            if problem != reported:
                reported = problem
                on_change(problem)
        await asyncio.sleep(backoff_delay(attempt, backoff_initial, backoff_max))
        attempt += 1
