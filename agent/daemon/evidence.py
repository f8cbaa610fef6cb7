"""Passive evidence for the layer monitors: modem URCs and netlink link events, without probes.

The daemon owns one EvidenceFeeds; each modem's evidence goes to the monitors of the layers on
that modem (inactive ones are reported "profile_inactive" by the daemon anyway).

    feeds = EvidenceFeeds(monitors_of)                    # monitors_of(modem_id) -> monitors
    feeds.watch_channel("m0", session.modem.channel)      # +CGEV / registration URCs
    supervisor.start("links-m0", feeds.link_task("m0", "wwan0"))   # carrier / address
    LayerMonitor(..., counters=feeds.counters_source("wwan0"))  # traffic-aware rounds, rx stall
    feeds.close()                                         # at shutdown
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Protocol

import structlog

from agent.backoff import Backoff
from agent.health.detect import Evidence
from agent.health.monitor import CountersSource, LayerMonitor
from agent.health.urc import URC_PREFIXES, evidence_from_urc
from agent.net.linkwatch import CounterReader, LinkError, LinkWatcher, to_evidence

log = structlog.get_logger(__name__)

RECONNECT_INITIAL_S = 1.0
RECONNECT_MAX_S = 30.0
MonitorsOf = Callable[[str], Iterable[LayerMonitor]]


class Subscribable(Protocol):
    """What watch_channel needs from an AT channel (agent.at.channel.AtChannel fits)."""

    def subscribe(
        self, prefixes: str | Iterable[str], callback: Callable[[str], None]
    ) -> Callable[[], None]:
        """Call callback(line) for URCs with one of the prefixes; returns an unsubscribe."""
        ...


class EvidenceFeeds:
    """Routes passive evidence from modems and their interfaces to the layer monitors."""

    def __init__(self, monitors_of: MonitorsOf) -> None:
        self._monitors_of = monitors_of
        self._channels: dict[str, object] = {}
        self._readers: list[CounterReader] = []
        #: Also told every piece of evidence with its modem (the data path checks the context).
        self.listeners: list[Callable[[str, Evidence], None]] = []

    def counters_source(
        self, ifname: str | Callable[[], str | None], netns: str | None = None
    ) -> CountersSource:
        """A LayerMonitor `counters` source reading the interface over one netlink socket
        (released by close()). `ifname` may be a callable for an interface discovery names
        later (DataPath.interface); while it gives None there is no reading."""
        reader = CounterReader(netns)
        self._readers.append(reader)

        async def read() -> tuple[int, int] | None:
            name = ifname() if callable(ifname) else ifname
            if name is None:
                return None
            try:
                reading = await reader.read(name)
            except LinkError:
                return None  # absent for now (re-enumerating): no traffic evidence either way
            return reading.rx_bytes, reading.tx_bytes

        return read

    def close(self) -> None:
        """Release the counter readers' netlink sockets."""
        for reader in self._readers:
            reader.close()
        self._readers.clear()

    def deliver(self, modem_id: str, ev: Evidence) -> None:
        """Hand one piece of evidence to every monitor of the modem's layers."""
        for monitor in self._monitors_of(modem_id):
            monitor.evidence(ev)
        for listener in self.listeners:
            listener(modem_id, ev)

    def watch_channel(self, modem_id: str, channel: Subscribable) -> None:
        """Subscribe to the modem's context and registration URCs (once per channel; a
        reconnected modem brings a new channel, which is subscribed again)."""
        if self._channels.get(modem_id) is channel:
            return
        self._channels[modem_id] = channel

        def on_urc(line: str) -> None:
            ev = evidence_from_urc(line, time.monotonic())
            if ev is not None:
                log.info("urc_evidence", modem=modem_id, kind=ev.kind, line=line)
                self.deliver(modem_id, ev)

        channel.subscribe(URC_PREFIXES, on_urc)

    def link_task(
        self, modem_id: str, ifname: str, netns: str | None = None
    ) -> Callable[[], Awaitable[None]]:
        """A coroutine function (for the supervisor) feeding the interface's carrier and
        address events; it re-opens the netlink watch with backoff when it fails."""

        async def run() -> None:
            backoff = Backoff(RECONNECT_INITIAL_S, RECONNECT_MAX_S)
            while True:
                try:
                    async with LinkWatcher([ifname], netns) as watcher:
                        backoff.reset()
                        while True:
                            event = await watcher.next(timeout=None)
                            ev = to_evidence(event) if event is not None else None
                            if ev is not None:
                                self.deliver(modem_id, ev)
                except LinkError as exc:
                    log.warning(
                        "link_watch_failed", modem=modem_id, interface=ifname, error=str(exc)
                    )
                await asyncio.sleep(backoff.next())

        return run


def interface_of(modem_cfg: object) -> str | None:
    """The network interface a modem's config names (`interface` on [[modems]]), or None for
    none, "none" or "auto" (discovery belongs to the session that finds it)."""
    ifname = getattr(modem_cfg, "interface", None)
    if isinstance(ifname, str) and ifname not in ("", "none", "auto"):
        return ifname
    return None
