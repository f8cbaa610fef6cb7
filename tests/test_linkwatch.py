"""agent/net/linkwatch.py on a real veth pair in namespaces of our own (root)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from pyroute2 import netns

from agent.net.linkwatch import (
    CounterReader,
    LinkError,
    LinkEvent,
    LinkWatcher,
    read_counters,
    read_link,
    to_evidence,
)
from tests.vethpair import NEAR_ADDR, NEAR_IF, VethPair, needs_root, veth_pair

pytestmark = needs_root

DEADLINE = 5.0


@pytest.fixture
def veth() -> Iterator[VethPair]:
    with veth_pair() as pair:
        yield pair


async def next_of(watcher: LinkWatcher, kind: str) -> LinkEvent:
    while True:
        ev = await watcher.next(timeout=DEADLINE)
        assert ev is not None, f"no {kind} event within {DEADLINE} s"
        if ev.kind == kind:
            return ev


def test_counters_grow_with_traffic_both_ways(veth: VethPair) -> None:
    _, tx0 = read_counters(NEAR_IF, veth.near)
    veth.send(from_far=False, payload=b"x" * 1000, count=20)
    rx1, tx1 = read_counters(NEAR_IF, veth.near)
    assert tx1 - tx0 >= 20 * 1000  # payload plus headers left through the near end
    veth.send(from_far=True, payload=b"y" * 500, count=10)
    rx2, _ = read_counters(NEAR_IF, veth.near)
    assert rx2 - rx1 >= 10 * 500
    assert read_link(NEAR_IF, veth.near).ifindex > 0


def test_missing_interface_or_namespace_is_a_link_error(veth: VethPair) -> None:
    with pytest.raises(LinkError):
        read_counters("esa-none0", veth.near)
    ghost = veth.near + "-ghost"
    with pytest.raises(LinkError):
        read_counters(NEAR_IF, ghost)
    assert ghost not in netns.listnetns()  # looking never creates a namespace


async def test_carrier_and_address_events(veth: VethPair) -> None:
    async with LinkWatcher([NEAR_IF], netns=veth.near) as watcher:
        assert watcher.state(NEAR_IF) == (True, (NEAR_ADDR,))
        first = await watcher.next(timeout=DEADLINE)
        assert first is not None
        assert (first.kind, first.ifname) == ("carrier_up", NEAR_IF)  # the state at start
        await asyncio.to_thread(veth.set_far_up, False)
        lost = await next_of(watcher, "carrier_lost")
        assert lost.ifname == NEAR_IF
        evidence = to_evidence(lost)
        assert evidence is not None
        assert evidence.kind == "carrier_lost"
        await asyncio.to_thread(veth.set_far_up, True)
        up = await next_of(watcher, "carrier_up")
        assert to_evidence(up) is not None

        await asyncio.to_thread(veth.addr, "add", "198.18.1.1")
        added = await next_of(watcher, "address_added")
        assert added.address == "198.18.1.1"
        assert set(added.addresses) == {NEAR_ADDR, "198.18.1.1"}
        await asyncio.to_thread(veth.addr, "del", "198.18.1.1")
        removed = await next_of(watcher, "address_removed")
        assert removed.addresses == (NEAR_ADDR,)
        assert to_evidence(removed) is None  # an address is left: the link still has one
        await asyncio.to_thread(veth.addr, "del", NEAR_ADDR, 30)
        last = await next_of(watcher, "address_removed")
        assert last.addresses == ()
        evidence = to_evidence(last)
        assert evidence is not None
        assert evidence.kind == "address_lost"
        assert await watcher.next(timeout=0.05) is None  # quiet: timeout, not an error
    with pytest.raises(LinkError):
        await watcher.next(timeout=0.1)
    await watcher.close()  # twice is fine


async def test_watching_a_namespace_that_is_not_there() -> None:
    watcher = LinkWatcher([NEAR_IF], netns="esa-absent-ns")
    with pytest.raises(LinkError):
        await watcher.open()
    assert "esa-absent-ns" not in netns.listnetns()


async def test_counter_reader_from_the_event_loop(veth: VethPair) -> None:
    reader = CounterReader(veth.near)
    try:
        before = await reader.read(NEAR_IF)
        await asyncio.to_thread(veth.send, True, b"z" * 800, 10)
        after = await reader.read(NEAR_IF)
        assert after.rx_bytes - before.rx_bytes >= 8000
        assert after.ifindex == before.ifindex
        with pytest.raises(LinkError):
            await reader.read("esa-none0")
    finally:
        reader.close()
