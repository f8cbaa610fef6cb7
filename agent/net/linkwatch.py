"""Observing links over netlink (pyroute2): byte counters, and carrier/address events as a stream.

Read-only: nothing here changes a link, an address or a route. Counters are the kernel's 64-bit
ones (IFLA_STATS64), so they do not wrap in practice; they restart at zero only when the
interface is re-created (a modem re-enumerated on USB), which the ifindex shows.

    rx, tx = read_counters("wwan0")                 # from sync code or a worker thread
    reading = await CounterReader().read("wwan0")  # from a coroutine
    async with LinkWatcher(["wwan0"]) as watcher:
        ev = await watcher.next(timeout=5.0)      # LinkEvent, or None on timeout
        evidence = to_evidence(ev)                # agent.health.detect.Evidence for the monitor
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import time
from collections.abc import Iterable
from typing import Any, Literal

import msgspec
import structlog
from pyroute2 import AsyncIPRoute, IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import RTMGRP_IPV4_IFADDR, RTMGRP_IPV6_IFADDR, RTMGRP_LINK

from agent.errors import AgentError
from agent.health.detect import Evidence

log = structlog.get_logger(__name__)

NETLINK_TIMEOUT_S = 5.0
_QUEUE_MAX = 1024

LinkEventKind = Literal[
    "carrier_lost", "carrier_up", "address_added", "address_removed", "link_removed"
]


class LinkError(AgentError):
    """A link cannot be read: no such interface or namespace, or netlink refused."""


class LinkCounters(msgspec.Struct, frozen=True, kw_only=True):
    """One reading of an interface's byte counters; ifindex changes when it is re-created."""

    ifname: str
    ifindex: int
    rx_bytes: int
    tx_bytes: int


class LinkEvent(msgspec.Struct, frozen=True, kw_only=True):
    """A change on a watched interface. `addresses` is what remains after it (not link-local)."""

    kind: LinkEventKind
    ifname: str
    ifindex: int
    at: float
    address: str | None = None
    addresses: tuple[str, ...] = ()


def _open(netns: str | None) -> IPRoute:
    # flags=0: never create a namespace that is not there (pyroute2 defaults to O_CREAT).
    return IPRoute(netns=netns, flags=0) if netns else IPRoute()


def _counters_of(msg: Any, ifname: str) -> LinkCounters:
    stats = msg.get("stats64") or msg.get("stats")
    if stats is None:
        raise LinkError(f"{ifname}: the kernel sent no counters")
    return LinkCounters(
        ifname=ifname,
        ifindex=int(msg["index"]),
        rx_bytes=int(stats["rx_bytes"]),
        tx_bytes=int(stats["tx_bytes"]),
    )


def read_link(ifname: str, netns: str | None = None) -> LinkCounters:
    """The interface's counters and index; LinkError when it (or the namespace) is not there.

    Synchronous: call it from plain code or a worker thread, never from a coroutine (pyroute2's
    IPRoute runs an event loop of its own); CounterReader is the coroutine-side reader.
    """
    with contextlib.suppress(RuntimeError):
        asyncio.get_running_loop()
        raise LinkError(f"{ifname}: read_link called on an event loop; use CounterReader")
    try:
        with _open(netns) as ipr:
            msgs = ipr.link("get", ifname=ifname)
    except NetlinkError as exc:
        raise LinkError(f"{ifname}: {exc}") from exc
    except OSError as exc:
        raise LinkError(f"{ifname} (netns {netns}): {exc}") from exc
    if not msgs:
        raise LinkError(f"{ifname}: no such interface")
    return _counters_of(msgs[0], ifname)


def read_counters(ifname: str, netns: str | None = None) -> tuple[int, int]:
    """(rx_bytes, tx_bytes) of an interface; LinkError when it cannot be read."""
    reading = read_link(ifname, netns)
    return reading.rx_bytes, reading.tx_bytes


class CounterReader:
    """Reads counters from the event loop over one long-lived async netlink socket.

    pyroute2's synchronous IPRoute runs its own event loop, so read_link/read_counters must not
    be called from a coroutine; use this (or asyncio.to_thread) there.
    """

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self._sock: AsyncIPRoute | None = None

    async def read(self, ifname: str, timeout: float = NETLINK_TIMEOUT_S) -> LinkCounters:
        """One reading; LinkError when the interface is missing or netlink does not answer."""
        try:
            async with asyncio.timeout(timeout):
                if self._sock is None:
                    self._sock = (
                        AsyncIPRoute(netns=self.netns, flags=0) if self.netns else AsyncIPRoute()
                    )
                    await self._sock.setup_endpoint()
                msgs = list(await self._sock.link("get", ifname=ifname))
        except NetlinkError as exc:
            raise LinkError(f"{ifname}: {exc}") from exc
        except (OSError, TimeoutError) as exc:
            self.close()  # a socket that timed out may hold a half-read reply
            raise LinkError(f"{ifname} (netns {self.netns}): {exc!r}") from exc
        if not msgs:
            raise LinkError(f"{ifname}: no such interface")
        return _counters_of(msgs[0], ifname)

    def close(self) -> None:
        """Release the socket (a later read opens a new one)."""
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()


def is_link_local(address: str) -> bool:
    """fe80::/10 and 169.254/16: present on any up link, so they prove nothing."""
    try:
        return ipaddress.ip_address(address).is_link_local
    except ValueError:
        return False


def to_evidence(ev: LinkEvent) -> Evidence | None:
    """The detection evidence a link event gives (None when it says nothing about the path)."""
    if ev.kind in ("carrier_lost", "link_removed"):
        return Evidence(kind="carrier_lost", at=ev.at, reason=f"carrier_lost: {ev.ifname}")
    if ev.kind == "carrier_up":
        return Evidence(kind="carrier_up", at=ev.at)
    if ev.address is None or is_link_local(ev.address):
        return None
    if ev.kind == "address_removed" and not ev.addresses:
        return Evidence(kind="address_lost", at=ev.at, reason=f"address_lost: {ev.ifname}")
    if ev.kind == "address_added":
        return Evidence(kind="address_added", at=ev.at)
    return None


class _Link:
    def __init__(self, ifname: str, ifindex: int, carrier: bool) -> None:
        self.ifname = ifname
        self.ifindex = ifindex
        self.carrier = carrier
        self.addresses: set[str] = set()


class LinkWatcher:
    """Carrier and address events of some interfaces (by name) in one namespace.

    Each watched interface's carrier at open() is the first event (carrier_up or carrier_lost);
    interfaces that do not exist yet are reported the same way when they appear. Use as an async context manager, or open()/close().
    """

    def __init__(self, ifnames: Iterable[str], netns: str | None = None) -> None:
        self.ifnames = frozenset(ifnames)
        self.netns = netns
        self._links: dict[int, _Link] = {}
        self._queue: asyncio.Queue[LinkEvent] = asyncio.Queue(_QUEUE_MAX)
        self._sock: AsyncIPRoute | None = None
        self._reader: asyncio.Task[None] | None = None
        self._log = log.bind(netns=netns)

    async def __aenter__(self) -> LinkWatcher:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def open(self, timeout: float = NETLINK_TIMEOUT_S) -> None:
        """Subscribe first, then read the current state, so no change falls in between."""
        sock = AsyncIPRoute(netns=self.netns, flags=0) if self.netns else AsyncIPRoute()
        try:
            async with asyncio.timeout(timeout):
                await sock.bind(groups=RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR)
                await self._load(timeout)
        except (OSError, NetlinkError, TimeoutError) as exc:
            sock.close()
            raise LinkError(f"watching {sorted(self.ifnames)}: {exc!r}") from exc
        self._sock = sock
        now = time.monotonic()
        for link in self._links.values():
            # The state at start is news too: a carrier already gone must count.
            kind: LinkEventKind = "carrier_up" if link.carrier else "carrier_lost"
            self._emit(LinkEvent(kind=kind, ifname=link.ifname, ifindex=link.ifindex, at=now))
        self._reader = asyncio.create_task(self._read(sock), name="linkwatch")

    async def _load(self, timeout: float) -> None:
        def dump() -> tuple[list[Any], list[Any]]:
            with _open(self.netns) as ipr:
                return list(ipr.link("dump")), list(ipr.addr("dump"))

        links, addrs = await asyncio.wait_for(asyncio.to_thread(dump), timeout)
        for msg in links:
            name = msg.get("ifname")
            if name in self.ifnames:
                self._links[int(msg["index"])] = _Link(name, int(msg["index"]), _carrier(msg))
        for msg in addrs:
            link = self._links.get(int(msg["index"]))
            address = msg.get("IFA_ADDRESS")
            if link is not None and address and not is_link_local(address):
                link.addresses.add(address)

    def state(self, ifname: str) -> tuple[bool, tuple[str, ...]] | None:
        """(carrier, addresses) as last seen, or None while the interface is absent."""
        for link in self._links.values():
            if link.ifname == ifname:
                return link.carrier, tuple(sorted(link.addresses))
        return None

    async def next(self, timeout: float | None = None) -> LinkEvent | None:
        """The next event, or None when `timeout` passes first. LinkError once closed."""
        if self._reader is None:
            raise LinkError("watcher is not open")
        if self._reader.done() and self._queue.empty():
            raise LinkError("watcher stopped")
        try:
            async with asyncio.timeout(timeout):
                return await self._queue.get()
        except TimeoutError:
            return None

    async def close(self) -> None:
        """Stop reading and release the netlink socket; safe to call twice."""
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    async def _read(self, sock: AsyncIPRoute) -> None:
        while True:
            try:
                async for msg in sock.get():
                    for ev in self._translate(msg):
                        self._emit(ev)
            except OSError as exc:
                # ENOBUFS: the kernel dropped events; re-read the state and report differences.
                self._log.warning("linkwatch_overrun", error=str(exc))
                await self._resync()

    def _emit(self, ev: LinkEvent) -> None:
        if self._queue.full():
            self._queue.get_nowait()  # keep the newest: the latest state is what matters
        self._queue.put_nowait(ev)
        self._log.info("link_event", kind=ev.kind, ifname=ev.ifname, address=ev.address)

    async def _resync(self) -> None:
        old = {i: (link.carrier, set(link.addresses)) for i, link in self._links.items()}
        names = {i: link.ifname for i, link in self._links.items()}
        self._links.clear()
        with contextlib.suppress(OSError, NetlinkError, TimeoutError):
            await self._load(NETLINK_TIMEOUT_S)
        now = time.monotonic()
        for index, (carrier, addrs) in old.items():
            link = self._links.get(index)
            if link is None:
                self._emit(
                    LinkEvent(kind="link_removed", ifname=names[index], ifindex=index, at=now)
                )
                continue
            if carrier != link.carrier:
                kind: LinkEventKind = "carrier_up" if link.carrier else "carrier_lost"
                self._emit(LinkEvent(kind=kind, ifname=link.ifname, ifindex=index, at=now))
            left = tuple(sorted(link.addresses))
            for a in sorted(addrs - link.addresses):
                self._emit(_addr_event("address_removed", link, a, left, now))
            for a in sorted(link.addresses - addrs):
                self._emit(_addr_event("address_added", link, a, left, now))

    def _translate(self, msg: Any) -> list[LinkEvent]:
        event = msg.get("event")
        index = int(msg.get("index") or 0)
        now = time.monotonic()
        if event == "RTM_NEWLINK":
            name = msg.get("ifname")
            carrier = _carrier(msg)
            link = self._links.get(index)
            if link is None:
                if name not in self.ifnames:
                    return []
                self._links[index] = _Link(name, index, carrier)
                kind: LinkEventKind = "carrier_up" if carrier else "carrier_lost"
                return [LinkEvent(kind=kind, ifname=name, ifindex=index, at=now)]
            if carrier == link.carrier:
                return []
            link.carrier = carrier
            kind = "carrier_up" if carrier else "carrier_lost"
            return [LinkEvent(kind=kind, ifname=link.ifname, ifindex=index, at=now)]
        if event == "RTM_DELLINK":
            link = self._links.pop(index, None)
            if link is None:
                return []
            return [LinkEvent(kind="link_removed", ifname=link.ifname, ifindex=index, at=now)]
        if event in ("RTM_NEWADDR", "RTM_DELADDR"):
            link = self._links.get(index)
            address = msg.get("IFA_ADDRESS")
            if link is None or not address or is_link_local(address):
                return []
            if event == "RTM_NEWADDR":
                if address in link.addresses:
                    return []
                link.addresses.add(address)
                left = tuple(sorted(link.addresses))
                return [_addr_event("address_added", link, address, left, now)]
            link.addresses.discard(address)
            left = tuple(sorted(link.addresses))
            return [_addr_event("address_removed", link, address, left, now)]
        return []


def _addr_event(
    kind: LinkEventKind, link: _Link, address: str, left: tuple[str, ...], at: float
) -> LinkEvent:
    return LinkEvent(
        kind=kind, ifname=link.ifname, ifindex=link.ifindex, at=at, address=address, addresses=left
    )


def _carrier(msg: Any) -> bool:
    carrier = msg.get("carrier")
    if carrier is not None:
        return bool(carrier)
    # Older kernels omit IFLA_CARRIER; operstate UP (or UNKNOWN on tun-like links) means up.
    return msg.get("operstate") in ("UP", "UNKNOWN")
