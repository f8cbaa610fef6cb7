"""Probes on their own link: a layer's probes are seen only by its own operator, whatever the
main table says, and a dead link fails its probes even while another link carries the default."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from pyroute2 import AsyncIPRoute

from agent.health.probes import LinkBinding, probe_from_spec
from agent.net.routes import RouteManager
from tests.netns_lab import (
    DNS_PORT,
    HTTP_PORT,
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
    with make_lab(2) as lab_:
        for i in range(2):
            add_agent_address(lab_, i)
        with in_netns(lab_.agent):
            yield lab_


@pytest.fixture
async def rm(lab: Lab) -> AsyncIterator[RouteManager]:
    """Both layers declared (backup metered), primary active; operator servers running."""
    async with operator_servers(lab):
        manager = await RouteManager.open(LAYERS)
        for i, name in enumerate(LAYERS):
            await manager.set_layer(
                name,
                lab.ifname(i),
                gateways=[lab.operators[i].gateway],
                sources=[lab.address(i)],
                metered=name == "backup",
            )
        await manager.set_active("primary")
        try:
            yield manager
        finally:
            await manager.close(clean=True)


def binding(rm: RouteManager, lab: Lab, name: str) -> LinkBinding:
    i = LAYERS.index(name)
    return LinkBinding(interface=lab.ifname(i), fwmark=rm.fwmark(name), dns=(INTERNET,))


def specs() -> list[tuple[str, str]]:
    return [
        ("tcp", f"{INTERNET}:{TCP_PORT}"),
        ("http", f"http://{INTERNET}:{HTTP_PORT}/generate_204"),
        ("dns", f"probe.example@{INTERNET}:{DNS_PORT}"),
        ("dns", "probe.example@link"),
    ]


async def test_each_layers_probes_reach_only_its_own_operator(lab: Lab, rm: RouteManager) -> None:
    for name in LAYERS:
        link = binding(rm, lab, name)
        for kind, target in specs():
            result = await probe_from_spec(kind, target, 3.0, link).run()
            assert result.ok, (name, kind, target, result.error)
    for i, op in enumerate(lab.operators):
        assert op.seen["tcp"] == [lab.address(i)]
        assert op.seen["http"] == [lab.address(i)]
        assert op.seen["dns"] == [lab.address(i)] * 2


async def test_http_probe_resolves_its_host_through_the_links_own_dns(
    lab: Lab, rm: RouteManager
) -> None:
    # probe.example resolves (at either operator) to the Internet address; the lookup and the
    # GET both go through the backup link although the main table points at the primary.
    probe = probe_from_spec(
        "http", f"http://probe.example:{HTTP_PORT}/generate_204", 3.0, binding(rm, lab, "backup")
    )
    result = await probe.run()
    assert result.ok, result.error
    assert lab.operators[1].seen["dns"] == [lab.address(1)]
    assert lab.operators[1].seen["http"] == [lab.address(1)]
    assert not any(lab.operators[0].seen.values())


async def test_a_dead_link_fails_its_probes_while_another_link_carries_the_default(
    lab: Lab, rm: RouteManager
) -> None:
    # Cut the backup's upstream at the operator side: the agent's m1 loses carrier.
    async with AsyncIPRoute(netns=lab.operators[1].ns) as op_ipr:
        u1 = (await op_ipr.link_lookup(ifname="u1"))[0]
        await op_ipr.link("set", index=u1, state="down")
    unbound = probe_from_spec("tcp", f"{INTERNET}:{TCP_PORT}", 1.0)
    assert (await unbound.run()).ok  # the host's default route (primary) still works ...
    for kind, target in specs():
        result = await probe_from_spec(kind, target, 1.0, binding(rm, lab, "backup")).run()
        assert not result.ok, (kind, target)  # ... but the backup's own probes see it dead
    assert not any(lab.operators[1].seen.values())


async def test_unbound_binding_behaves_as_before(lab: Lab, rm: RouteManager) -> None:
    await rm.set_active("backup")
    for kind, target in specs()[:3]:
        result = await probe_from_spec(kind, target, 3.0, LinkBinding()).run()
        assert result.ok, (kind, result.error)
    assert lab.operators[1].seen["tcp"] == [lab.address(1)]
    assert lab.operators[0].seen["tcp"] == []


async def test_dns_probe_without_link_servers_reports_it(lab: Lab, rm: RouteManager) -> None:
    link = LinkBinding(interface="m0", fwmark=rm.fwmark("primary"))
    result = await probe_from_spec("dns", "probe.example@link", 1.0, link).run()
    assert not result.ok
    assert result.error == "no DNS server from the data connection"


async def test_missing_interface_is_a_failed_probe_not_a_crash(lab: Lab, rm: RouteManager) -> None:
    link = LinkBinding(interface="wwan9", fwmark=None)
    result = await probe_from_spec("tcp", f"{INTERNET}:{TCP_PORT}", 1.0, link).run()
    assert not result.ok
    assert result.error
