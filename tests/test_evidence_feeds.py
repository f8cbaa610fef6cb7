"""Passive evidence reaching a layer monitor: netlink carrier loss on a real veth, and URCs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable, Iterator

import pytest

from agent.daemon.evidence import EvidenceFeeds, interface_of
from agent.health.layer import LayerHealth, Thresholds
from agent.health.monitor import LayerMonitor
from agent.health.probes import HttpProbe, ProbeResult
from tests.vethpair import NEAR_IF, VethPair, needs_root, veth_pair

DEADLINE = 10.0
HOUR = 3600.0


@pytest.fixture
def veth() -> Iterator[VethPair]:
    with veth_pair() as pair:
        yield pair


class Always204:
    """A loopback HTTP server that always answers: the probes alone would never see an outage."""

    def __init__(self) -> None:
        self.port = 0
        self.requests = 0
        self._server: asyncio.Server | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        self.requests += 1
        writer.write(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    async def __aenter__(self) -> Always204:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()


@pytest.fixture
async def server() -> AsyncIterator[Always204]:
    async with Always204() as srv:
        yield srv


class Changes:
    def __init__(self) -> None:
        self.seen: list[LayerHealth] = []
        self._event = asyncio.Event()

    def __call__(self, _name: str, health: LayerHealth) -> None:
        self.seen.append(health)
        self._event.set()

    async def wait_for(self, state: str) -> LayerHealth:
        async with asyncio.timeout(DEADLINE):
            while True:
                for health in self.seen:
                    if health.state == state:
                        return health
                self._event.clear()
                await self._event.wait()


def monitor_on(server: Always204, changes: Changes) -> LayerMonitor:
    return LayerMonitor(
        "primary",
        [("http0", HttpProbe(f"http://127.0.0.1:{server.port}/", 1.0), HOUR)],
        None,
        Thresholds(down_after=3, up_after=2),
        changes,
        failure_interval=0.05,
    )


@needs_root
async def test_carrier_loss_on_the_interface_takes_the_layer_down_without_probes(
    veth: VethPair, server: Always204
) -> None:
    changes = Changes()
    monitor = monitor_on(server, changes)
    feeds = EvidenceFeeds(lambda modem: [monitor] if modem == "m0" else [])
    async with asyncio.TaskGroup() as tg:
        tasks = [
            tg.create_task(monitor.run()),
            tg.create_task(feeds.link_task("m0", NEAR_IF, veth.near)()),
        ]
        await changes.wait_for("up")
        sent = server.requests
        await asyncio.to_thread(veth.set_far_up, False)  # the modem's side of the link drops
        down = await changes.wait_for("down")
        assert down.reason == "carrier_lost"
        assert server.requests == sent  # confirmed without a single probe
        for task in tasks:
            task.cancel()
    feeds.close()


async def test_urcs_from_the_modem_reach_the_monitor(server: Always204) -> None:
    changes = Changes()
    monitor = monitor_on(server, changes)
    feeds = EvidenceFeeds(lambda modem: [monitor] if modem == "m0" else [])

    class Channel:
        """The subscribe() half of AtChannel: keeps the callback to play URC lines into."""

        def __init__(self) -> None:
            self.prefixes: tuple[str, ...] = ()
            self.callback: Callable[[str], None] | None = None

        def subscribe(
            self, prefixes: str | Iterable[str], callback: Callable[[str], None]
        ) -> Callable[[], None]:
            self.prefixes = tuple([prefixes] if isinstance(prefixes, str) else prefixes)
            self.callback = callback
            return lambda: None

    channel = Channel()
    feeds.watch_channel("m0", channel)
    feeds.watch_channel("m0", channel)  # the same channel again: subscribed once
    assert "+CGEV" in channel.prefixes
    assert "+CEREG" in channel.prefixes
    assert channel.callback is not None
    results: list[ProbeResult] = []
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(monitor.run())
        await changes.wait_for("up")
        channel.callback("+CGEV: NW PDN DEACT 1")
        assert monitor.detection.strikes == 1
        channel.callback("+CEREG: 1")  # registered again: says nothing about the data path
        assert monitor.detection.strikes == 1
        # The confirmation round answers (the context came back): no outage.
        while monitor.detection.strikes:
            await monitor.wait_round()
        results = [p.last for p in monitor.snapshot().probes if p.last is not None]
        task.cancel()
    assert all(r.ok for r in results)
    assert [h.state for h in changes.seen] == ["up"]


def test_interface_of_config() -> None:
    class Cfg:
        def __init__(self, interface: object) -> None:
            self.interface = interface

    assert interface_of(Cfg("wwan0")) == "wwan0"
    assert interface_of(Cfg("none")) is None
    assert interface_of(Cfg("auto")) is None
    assert interface_of(Cfg(None)) is None
    assert interface_of(object()) is None
