"""Routes and rules in real namespaces: each layer's traffic leaves by its own link, the main
default route follows the active layer, metered layers stay off, a crash leaves nothing behind."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from pyroute2 import AsyncIPRoute

from agent.net.routes import (
    ACTIVE_METRIC,
    RT_PROTO,
    RULE_PRIORITY,
    TABLE_BASE,
    TABLE_METRIC,
    RouteManager,
    is_agent_table,
)
from tests.netns_lab import (
    INTERNET,
    TCP_PORT,
    Lab,
    add_agent_address,
    in_netns,
    make_lab,
    needs_root,
    operator_servers,
)

pytestmark = needs_root()

LAYERS = ("primary", "backup")


@pytest.fixture
def lab() -> Iterator[Lab]:
    """Two operators; the test body runs inside the agent namespace."""
    with make_lab(2) as lab_:
        for i in range(2):
            add_agent_address(lab_, i)
        with in_netns(lab_.agent):
            yield lab_


@pytest.fixture
async def rm(lab: Lab) -> AsyncIterator[RouteManager]:
    async with operator_servers(lab):
        manager = await RouteManager.open(LAYERS)
        try:
            yield manager
        finally:
            await manager.close(clean=True)


async def declare_both(rm: RouteManager, lab: Lab, *, metered_backup: bool = False) -> None:
    for i, name in enumerate(LAYERS):
        await rm.set_layer(
            name,
            lab.ifname(i),
            gateways=[lab.operators[i].gateway],
            sources=[lab.address(i)],
            metered=metered_backup and name == "backup",
        )


async def connect(mark: int | None = None, source: str | None = None) -> None:
    """Open a TCP connection to the Internet address the way a probe or an app would."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    if mark is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
    if source is not None:
        sock.bind((source, 0))
    try:
        async with asyncio.timeout(5):
            await asyncio.get_running_loop().sock_connect(sock, (INTERNET, TCP_PORT))
    finally:
        sock.close()


async def seen_by(lab: Lab, i: int, count: int) -> list[str]:
    """The sources operator i's TCP server saw, once it has seen `count` connections."""
    return await lab.operators[i].wait_seen("tcp", count)


async def tagged(ipr: AsyncIPRoute) -> tuple[list[Any], list[Any]]:
    """Every route and rule in this namespace that carries the agent's tag or table."""
    routes = [r async for r in await ipr.route("dump") if r.get("proto") == RT_PROTO]
    rules = [
        r
        async for r in await ipr.rule("dump")
        if r.get("protocol") == RT_PROTO or is_agent_table(r.get("table"))
    ]
    return routes, rules


async def main_defaults(ipr: AsyncIPRoute) -> list[tuple[int, int]]:
    """(metric, oif) of every IPv4 default route in the main table."""
    return sorted(
        [
            (r.get("priority") or 0, r.get("oif"))
            async for r in await ipr.route("dump", family=socket.AF_INET)
            if r["dst_len"] == 0 and r.get("table") == 254
        ]
    )


async def ifindex(ipr: AsyncIPRoute, name: str) -> int:
    return int((await ipr.link_lookup(ifname=name))[0])


async def test_each_layer_leaves_by_its_own_link_whatever_main_says(
    lab: Lab, rm: RouteManager
) -> None:
    await declare_both(rm, lab)
    await rm.set_active("primary")
    # The main table's default points at m0: unmarked traffic goes to operator 0 ...
    await connect()
    assert await seen_by(lab, 0, 1) == [lab.address(0)]
    # ... but the backup layer's mark, or its source address, takes operator 1's link.
    await connect(mark=rm.fwmark("backup"))
    await connect(source=lab.address(1))
    assert await seen_by(lab, 1, 2) == [lab.address(1)] * 2
    assert lab.operators[0].seen["tcp"] == [lab.address(0)]
    # And the primary's mark still goes to operator 0 after the main route moves away.
    await rm.set_active("backup")
    await connect(mark=rm.fwmark("primary"))
    assert await seen_by(lab, 0, 2) == [lab.address(0)] * 2


async def test_set_active_moves_the_default_route_and_new_connections(
    lab: Lab, rm: RouteManager
) -> None:
    await declare_both(rm, lab)
    await rm.set_active("primary")
    async with AsyncIPRoute() as ipr:
        m0, m1 = await ifindex(ipr, "m0"), await ifindex(ipr, "m1")
        assert await main_defaults(ipr) == [(ACTIVE_METRIC, m0), (1010, m1)]
        await rm.set_active("backup")
        assert await main_defaults(ipr) == [(ACTIVE_METRIC, m1), (1000, m0)]
    await connect()
    assert await seen_by(lab, 1, 1) == [lab.address(1)]
    assert lab.operators[0].seen["tcp"] == []
    snap = rm.snapshot()
    assert snap["backup"]["default"] is True
    assert snap["backup"]["metric"] == ACTIVE_METRIC
    assert snap["primary"] == {
        "interface": "m0",
        "addresses": [lab.address(0)],
        "table": rm.table("primary"),
        "fwmark": rm.fwmark("primary"),
        "metric": 1000,
        "default": False,
    }


async def test_metered_layer_has_no_default_route_until_chosen(lab: Lab, rm: RouteManager) -> None:
    await declare_both(rm, lab, metered_backup=True)
    await rm.set_active("primary")
    async with AsyncIPRoute() as ipr:
        m0, m1 = await ifindex(ipr, "m0"), await ifindex(ipr, "m1")
        assert await main_defaults(ipr) == [(ACTIVE_METRIC, m0)]
        assert rm.snapshot()["backup"]["metric"] is None
        # Its own probes still work through its table.
        await connect(mark=rm.fwmark("backup"))
        assert await seen_by(lab, 1, 1) == [lab.address(1)]
        await rm.set_active("backup")
        assert await main_defaults(ipr) == [(ACTIVE_METRIC, m1), (1000, m0)]
        # Chosen and then left: the metered layer's main route goes away again.
        await rm.set_active("primary")
        assert await main_defaults(ipr) == [(ACTIVE_METRIC, m0)]


async def test_calls_are_idempotent(lab: Lab, rm: RouteManager) -> None:
    await declare_both(rm, lab)
    await rm.set_active("primary")
    async with AsyncIPRoute() as ipr:
        before = await tagged(ipr)
        for i, name in enumerate(LAYERS):
            again = await rm.set_layer(
                name, lab.ifname(i), [lab.operators[i].gateway], [lab.address(i)]
            )
            assert again == 0
        assert await rm.set_active("primary") == 0
        after = await tagged(ipr)
    assert len(after[0]) == len(before[0]) == 4  # two tables + two main defaults
    assert len(after[1]) == len(before[1]) == 4  # fwmark + source rule per layer
    assert {r.get("priority") for r in after[1]} == {RULE_PRIORITY}


async def test_sweep_after_crash_leaves_no_duplicate_or_stale_entry(lab: Lab) -> None:
    async with operator_servers(lab), AsyncIPRoute() as ipr:
        m0, m1 = await ifindex(ipr, "m0"), await ifindex(ipr, "m1")
        # Somebody else's default route (not ours): must survive everything below.
        await ipr.route("add", dst="0.0.0.0/0", gateway="198.18.2.1", oif=m1, priority=5000)
        # The crashed run: same layers at other metrics, backup active; it never cleans up.
        crashed = await RouteManager.open(LAYERS)
        for i, name in enumerate(LAYERS):
            await crashed.set_layer(
                name,
                lab.ifname(i),
                gateways=[lab.operators[i].gateway],
                sources=[lab.address(i)],
                metric=500 + i,
            )
        await crashed.set_active("backup")
        await crashed.close(clean=False)
        # Leftovers of an older layout: a tagged route in another table of the range, and a
        # rule into the range that an old version added without the protocol tag.
        stale_table = TABLE_BASE + 5
        await ipr.route(
            "add", dst="0.0.0.0/0", gateway="198.18.1.1", oif=m0, table=stale_table, proto=RT_PROTO
        )
        await ipr.rule("add", table=stale_table, priority=100, fwmark=7, family=socket.AF_INET)
        routes, rules = await tagged(ipr)
        assert (len(routes), len(rules)) == (5, 5)

        rm = await RouteManager.open(LAYERS)
        try:
            assert await rm.sweep_stale() > 0
            assert await tagged(ipr) == ([], [])
            await declare_both(rm, lab)
            await rm.set_active("primary")
            routes, rules = await tagged(ipr)
            assert len(routes) == 4
            assert len(rules) == 4
            assert await main_defaults(ipr) == [(ACTIVE_METRIC, m0), (1010, m1), (5000, m1)]
            await connect()
            assert await seen_by(lab, 0, 1) == [lab.address(0)]
        finally:
            await rm.close(clean=True)
        assert await main_defaults(ipr) == [(5000, m1)]


async def test_close_clean_removes_everything(lab: Lab) -> None:
    manager = await RouteManager.open(LAYERS)
    await declare_both(manager, lab)
    await manager.set_active("primary")
    await manager.close(clean=True)
    async with AsyncIPRoute() as ipr:
        assert await tagged(ipr) == ([], [])
        assert await main_defaults(ipr) == []


async def test_remove_layer_takes_its_routes_and_rules(lab: Lab, rm: RouteManager) -> None:
    await declare_both(rm, lab)
    await rm.set_active("backup")
    await rm.remove_layer("backup")
    async with AsyncIPRoute() as ipr:
        m0 = await ifindex(ipr, "m0")
        assert await main_defaults(ipr) == [(1000, m0)]
        routes, rules = await tagged(ipr)
        assert {r.get("table") for r in routes} == {254, rm.table("primary")}
        assert {r.get("table") for r in rules} == {rm.table("primary")}
    assert rm.carrier() == "primary"
    assert set(rm.snapshot()) == {"primary"}


async def test_ipv6_layer_gets_its_own_v6_table_rules_and_main_route(lab: Lab) -> None:
    async with AsyncIPRoute() as ipr:
        m0 = await ifindex(ipr, "m0")
        await ipr.addr("add", index=m0, address="fd00:1::2", prefixlen=64, flags=0x80)
    rm = await RouteManager.open(["dual"])
    try:
        await rm.set_layer(
            "dual",
            "m0",
            gateways=["198.18.1.1", "fd00:1::1"],
            sources=["198.18.1.2", "fd00:1::2"],
        )
        await rm.set_active("dual")
        assert await rm.set_active("dual") == 0
        assert (
            await rm.set_layer(
                "dual", "m0", ["198.18.1.1", "fd00:1::1"], ["198.18.1.2", "fd00:1::2"]
            )
            == 0
        )
        async with AsyncIPRoute() as ipr:
            v6 = [
                (r.get("table"), r.get("priority") or 0, r.get("gateway"))
                async for r in await ipr.route("dump", family=socket.AF_INET6)
                if r.get("proto") == RT_PROTO
            ]
            assert sorted(v6) == [
                (254, ACTIVE_METRIC, "fd00:1::1"),
                (rm.table("dual"), TABLE_METRIC, "fd00:1::1"),
            ]
            rules6 = [
                (r.get("fwmark"), r.get("src"))
                async for r in await ipr.rule("dump", family=socket.AF_INET6)
                if r.get("protocol") == RT_PROTO
            ]
            assert sorted(rules6, key=str) == sorted(
                [(rm.fwmark("dual"), None), (None, "fd00:1::2")], key=str
            )
    finally:
        await rm.close(clean=True)
    async with AsyncIPRoute() as ipr:
        assert await tagged(ipr) == ([], [])


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ({"gateways": ["198.18.1.1", "198.18.1.254"]}, "one gateway per address family"),
        ({"gateways": ["not-an-address"]}, "does not appear to be an IPv4 or IPv6 address"),
        ({"metric": 5}, "standby metric must be above"),
    ],
)
def test_set_layer_rejects_what_cannot_be_routed(bad: dict[str, Any], match: str) -> None:
    rm = RouteManager(layers=("a",))
    with pytest.raises(ValueError, match=match):
        asyncio.run(rm.set_layer("a", "m0", **bad))
    with pytest.raises(KeyError):
        rm.table("b")


async def test_device_routes_without_gateway_are_removed_too(lab: Lab) -> None:
    """Raw-IP interfaces (QMI/MBIM) route without a gateway: those must go on close as well."""
    rm = await RouteManager.open(["raw"])
    try:
        await rm.set_layer("raw", "m0", sources=[lab.address(0)])
        await rm.set_active("raw")
        assert await rm.set_active("raw") == 0
        async with AsyncIPRoute() as ipr:
            routes, _ = await tagged(ipr)
            assert {(r.get("table"), r["scope"], r.get("gateway")) for r in routes} == {
                (254, 253, None),
                (rm.table("raw"), 253, None),
            }
    finally:
        await rm.close(clean=True)
    async with AsyncIPRoute() as ipr:
        assert await tagged(ipr) == ([], [])
