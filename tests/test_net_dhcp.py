"""An ECM/RNDIS "router" modem: the agent asks its DHCP server (pyroute2's client), puts the
lease on the interface, routes through it, and releases and removes it on the way down."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator

import pytest
from pyroute2 import AsyncIPRoute

from agent.net.addressing import DhcpClient, InterfaceAddresses, Lease
from agent.net.routes import RouteManager
from tests.netns_lab import (
    INTERNET,
    TCP_PORT,
    Lab,
    dhcp_server,
    in_netns,
    make_lab,
    needs_root,
    operator_servers,
)

pytestmark = needs_root()


@pytest.fixture
def lab() -> Iterator[Lab]:
    with make_lab(1) as lab_, in_netns(lab_.agent):
        yield lab_


async def addresses_on(ifname: str) -> list[str]:
    async with AsyncIPRoute() as ipr:
        idx = (await ipr.link_lookup(ifname=ifname))[0]
        return [
            f"{a.get('address')}/{a['prefixlen']}"
            async for a in await ipr.addr("dump", index=idx)
            if a.get("family") == socket.AF_INET
        ]


async def test_dhcp_lease_is_applied_routed_and_released(lab: Lab) -> None:
    changes: list[Lease | None] = []

    async def on_change(lease: Lease | None) -> None:
        changes.append(lease)

    addresser = InterfaceAddresses.open()
    rm = await RouteManager.open(["ecm"])
    try:
        async with operator_servers(lab), dhcp_server(lab, 0):
            client = DhcpClient("m0", on_change)
            lease = await client.start(timeout=10)
            assert lease == Lease(
                addresses=("198.18.1.2/24",), gateways=("198.18.1.1",), dns=(INTERNET,)
            )
            assert changes == [lease]
            await addresser.apply("m0", lease.addresses)
            await rm.set_layer("ecm", "m0", lease.gateways, lease.sources)
            await rm.set_active("ecm")
            sock = socket.socket()
            sock.setblocking(False)
            try:
                async with asyncio.timeout(5):
                    await asyncio.get_running_loop().sock_connect(sock, (INTERNET, TCP_PORT))
            finally:
                sock.close()
            assert await lab.operators[0].wait_seen("tcp", 1) == ["198.18.1.2"]
            await client.stop()
            assert await lab.operators[0].wait_seen("dhcp", 3) == [
                "discover",
                "request",
                "release",
            ]
            await rm.remove_layer("ecm")
            await addresser.clear("m0")
            assert await addresses_on("m0") == []
    finally:
        await rm.close()
        addresser.close()


async def test_apply_replaces_only_the_agents_own_addresses(lab: Lab) -> None:
    addresser = InterfaceAddresses.open()
    try:
        async with AsyncIPRoute() as ipr:
            idx = (await ipr.link_lookup(ifname="m0"))[0]
            # Somebody else's address on the same interface stays whatever we do.
            await ipr.addr("add", index=idx, address="198.18.1.200", prefixlen=24)
        await addresser.apply("m0", ["198.18.1.2/32"])
        await addresser.apply("m0", ["198.18.1.2/32"])  # idempotent
        assert sorted(await addresses_on("m0")) == ["198.18.1.2/32", "198.18.1.200/24"]
        await addresser.apply("m0", ["198.18.1.3/32"])
        assert sorted(await addresses_on("m0")) == ["198.18.1.200/24", "198.18.1.3/32"]
        # A second addresser (a restart after a crash) finds and clears the first one's.
        other = InterfaceAddresses.open()
        try:
            await other.clear("m0")
        finally:
            other.close()
        assert await addresses_on("m0") == ["198.18.1.200/24"]
    finally:
        addresser.close()
