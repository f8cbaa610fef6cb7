"""Addresses on a modem's interface: the network-granted ones over netlink, or a DHCP lease.

Raw-IP and NCM/QMI/MBIM-like functions get the address the network granted (from
AT+CGCONTRDP / AT+CGPADDR) put on the interface by the host. ECM/RNDIS "router" functions run
their own DHCP server; for those the host asks with pyroute2's asyncio DHCP client (see
docs/network.md for why that one). Addresses the agent adds carry IFA_PROTO = RT_PROTO, so a
crashed run's leftovers are found and removed without touching anybody else's.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import structlog
from pyroute2 import AsyncIPRoute
from pyroute2.dhcp.client import AsyncDHCPClient, ClientConfig
from pyroute2.dhcp.fsm import State
from pyroute2.dhcp.hooks import Trigger, hook
from pyroute2.dhcp.leases import Lease as Pyroute2Lease
from pyroute2.dhcp.leases import MissingOptionError
from pyroute2.netlink.exceptions import NetlinkError

from agent.net.routes import NETLINK_TIMEOUT, RT_PROTO, RouteError

log = structlog.get_logger(__name__)

#: How long to wait for a DHCP lease before reporting failure.
DHCP_TIMEOUT = 20.0


@dataclass(frozen=True, slots=True)
class Lease:
    """What an interface got: addresses with prefix ('a.b.c.d/len'), gateways, DNS servers."""

    addresses: tuple[str, ...]
    gateways: tuple[str, ...] = ()
    dns: tuple[str, ...] = ()

    @property
    def sources(self) -> tuple[str, ...]:
        """The addresses without their prefix lengths."""
        return tuple(a.split("/")[0] for a in self.addresses)


@dataclass(slots=True)
class InterfaceAddresses:
    """Puts granted addresses on interfaces, brings them up, and takes them away again."""

    _ipr: Any = None

    @classmethod
    def open(cls) -> InterfaceAddresses:
        """An addresser for the network namespace this thread is in."""
        try:
            return cls(_ipr=AsyncIPRoute())
        except OSError as exc:
            raise RouteError(f"cannot open netlink: {exc}", exc.errno) from exc

    def close(self) -> None:
        """Release the netlink socket (addresses stay; use clear() first to remove them)."""
        self._ipr.close()

    async def apply(self, ifname: str, addresses: Sequence[str]) -> None:
        """Make our addresses on `ifname` exactly `addresses` ('a/len') and set the link up."""
        index = await self._index(ifname)
        wanted = {str(ipaddress.ip_interface(a)) for a in addresses}
        have = await self._ours(index)
        for addr in sorted(have.keys() - wanted):
            await self._addr("del", index, addr)
        for addr in sorted(wanted - have.keys()):
            await self._addr("add", index, addr)
        await self._call(self._ipr.link("set", index=index, state="up"), "link up")
        if wanted != set(have):
            log.info("net.addresses", interface=ifname, addresses=sorted(wanted))

    async def clear(self, ifname: str) -> None:
        """Remove every address the agent put on `ifname` (none left by a crash either)."""
        try:
            index = await self._index(ifname)
        except RouteError:
            return
        for addr in sorted(await self._ours(index)):
            await self._addr("del", index, addr)

    async def _ours(self, index: int) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        dump = await self._call(self._ipr.addr("dump", index=index), "addr dump")
        async with asyncio.timeout(NETLINK_TIMEOUT):
            async for a in dump:
                if a.get("IFA_PROTO") == RT_PROTO:
                    out[f"{a.get('address')}/{a['prefixlen']}"] = a
        return out

    async def _addr(self, command: str, index: int, addr: str) -> None:
        iface = ipaddress.ip_interface(addr)
        try:
            await self._call(
                self._ipr.addr(
                    command,
                    index=index,
                    address=str(iface.ip),
                    prefixlen=iface.network.prefixlen,
                    proto=RT_PROTO,
                ),
                f"addr {command}",
            )
        except RouteError as exc:
            # EEXIST on add / EADDRNOTAVAIL on del: already as wanted.
            if exc.errno not in (17, 99):
                raise

    async def _index(self, ifname: str) -> int:
        found = await self._call(self._ipr.link_lookup(ifname=ifname), "link lookup")
        if not found:
            raise RouteError(f"no interface {ifname!r}", 19)
        return int(found[0])

    @staticmethod
    async def _call(aw: Awaitable[Any], what: str) -> Any:
        try:
            async with asyncio.timeout(NETLINK_TIMEOUT):
                return await aw
        except TimeoutError:
            raise RouteError(f"{what} timed out") from None
        except NetlinkError as exc:
            raise RouteError(f"{what}: {exc}", exc.code) from exc


class _MemoryLease(Pyroute2Lease):  # type: ignore[misc]
    """A lease kept in memory only: after a restart the client asks afresh, no file to go stale."""

    def dump(self) -> None:
        """Nothing to write."""

    @classmethod
    def load(cls, interface: str) -> None:
        """Nothing stored."""
        return


LeaseCallback = Callable[[Lease | None], Awaitable[None]]


@dataclass(slots=True)
class DhcpClient:
    """Keeps a DHCPv4 lease on an ECM/RNDIS interface with pyroute2's asyncio client.

    `on_change(lease)` is awaited on every new, renewed or lost lease (None when lost); the
    caller puts the address on the interface and the routes in place.
    """

    ifname: str
    on_change: LeaseCallback
    _client: Any = None

    async def start(self, timeout: float = DHCP_TIMEOUT) -> Lease:
        """Bring the client up and wait for the first lease; TimeoutError when none comes."""

        async def changed(lease: Any) -> None:
            await self.on_change(_lease_from_dhcp(lease))

        async def lost(lease: Any) -> None:
            await self.on_change(None)

        on_bound = hook(Trigger.BOUND, Trigger.RENEWED, Trigger.REBOUND)(changed)
        on_lost = hook(Trigger.UNBOUND, Trigger.EXPIRED)(lost)
        config = ClientConfig(
            interface=self.ifname,
            lease_type=_MemoryLease,
            hooks=(on_bound, on_lost),
            handle_signals=False,
            write_pidfile=False,
            vendor_id="esim-agent",
            host_name=None,
        )
        client = AsyncDHCPClient(config)
        try:
            async with asyncio.timeout(NETLINK_TIMEOUT):
                await client.__aenter__()
        except TimeoutError:
            raise TimeoutError(f"DHCP client for {self.ifname} did not start") from None
        self._client = client
        try:
            async with asyncio.timeout(timeout + NETLINK_TIMEOUT):
                await client.bootstrap()
                await client.wait_for_state(State.BOUND, timeout=timeout)
        except BaseException:
            await self.stop()
            raise
        lease = client.lease
        if lease is None:
            await self.stop()
            raise TimeoutError("no DHCP lease")
        return _lease_from_dhcp(lease)

    async def stop(self) -> None:
        """Release the lease (the client sends DHCPRELEASE) and stop."""
        client, self._client = self._client, None
        if client is not None:
            async with asyncio.timeout(NETLINK_TIMEOUT):
                await client.__aexit__(None, None, None)


def _lease_from_dhcp(lease: Any) -> Lease:
    """Our Lease from pyroute2's (options the server left out are simply absent)."""

    def opt(name: str) -> Any:
        try:
            return getattr(lease, name)
        except MissingOptionError:
            return None

    plen = 32
    mask = opt("subnet_mask")
    if mask:
        plen = ipaddress.ip_network(f"0.0.0.0/{mask}").prefixlen
    return Lease(
        addresses=(f"{lease.ip}/{plen}",),
        gateways=tuple((opt("routers") or [])[:1]),
        dns=tuple(opt("name_servers") or ()),
    )
