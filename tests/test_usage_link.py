"""Usage for every vendor: interface counters of a real veth (namespaces of our own) → SQLite."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from pyroute2 import IPRoute
from structlog.testing import capture_logs

from agent.daemon.usage import UsageTracker, crosscheck_mismatch
from agent.modem.counters import Counters
from agent.net.linkwatch import LinkCounters, LinkError, read_link
from agent.usage.store import UsageStore
from tests.vethpair import FAR_IF, NEAR_IF, VethPair, needs_root, veth_pair

HOME = "8944476500001224158"
TRAVEL = "89012345678901234567"
T0 = 1_717_200_000.0  # 2024-06-01T00:00:00Z
# Ethernet 14 + IPv4 20 + UDP 8 per datagram, plus what the stack adds on its own: ARP, IPv6
# neighbour discovery, and ICMP port-unreachable replies (rate-limited, up to ~590 B each).
OVERHEAD = 64
STACK_EXTRA = 8_000


@pytest.fixture
def veth() -> Iterator[VethPair]:
    with veth_pair() as pair:
        yield pair


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def tracker_on(path: Path) -> UsageTracker:
    return UsageTracker(UsageStore(path), lambda _alert: None, clock=Clock())


async def push(veth: VethPair, *, down: int = 0, up: int = 0) -> None:
    """Bytes of UDP payload from the network to the modem (down) and back (up)."""
    if down:
        await asyncio.to_thread(veth.send, True, b"d" * 1000, down // 1000)
    if up:
        await asyncio.to_thread(veth.send, False, b"u" * 1000, up // 1000)


def within(value: int, payload: int, datagrams: int) -> bool:
    return payload <= value <= payload + OVERHEAD * datagrams + STACK_EXTRA


@needs_root
async def test_usage_follows_the_interface_counters_and_the_active_profile(
    veth: VethPair, tmp_path: Path
) -> None:
    tracker = tracker_on(tmp_path / "usage.db")
    try:
        await tracker.sample_interface("m0", HOME, NEAR_IF, netns=veth.near)  # baseline
        await push(veth, down=50_000, up=20_000)
        await tracker.sample_interface("m0", HOME, NEAR_IF, netns=veth.near)
        home = tracker.snapshot(HOME)
        assert within(home["rx_bytes"], 50_000, 50)
        assert within(home["tx_bytes"], 20_000, 20)

        # Profile switch: the interface keeps counting, the new profile starts from here.
        await tracker.sample_interface("m0", TRAVEL, NEAR_IF, netns=veth.near)
        assert tracker.snapshot(TRAVEL)["total_bytes"] == 0
        await push(veth, down=30_000)
        await tracker.sample_interface("m0", TRAVEL, NEAR_IF, netns=veth.near)
        assert within(tracker.snapshot(TRAVEL)["rx_bytes"], 30_000, 30)
        assert tracker.snapshot(HOME) == home

        # Back to HOME: its stored baseline is stale (TRAVEL's bytes ran through since).
        await tracker.sample_interface("m0", HOME, NEAR_IF, netns=veth.near)
        assert tracker.snapshot(HOME) == home
    finally:
        await tracker.close()


@needs_root
async def test_restart_continues_and_recreated_interface_counts_whole(
    veth: VethPair, tmp_path: Path
) -> None:
    db = tmp_path / "usage.db"
    first = tracker_on(db)
    await first.sample_interface("m0", HOME, NEAR_IF, netns=veth.near)
    await first.close()
    await push(veth, down=40_000)  # while the daemon was stopped
    second = tracker_on(db)
    try:
        await second.sample_interface("m0", HOME, NEAR_IF, netns=veth.near)
        assert within(second.snapshot(HOME)["rx_bytes"], 40_000, 40)
        before = second.snapshot(HOME)["rx_bytes"]

        # The modem re-enumerates: its interface comes back with a new index, counting from 0.
        def recreate() -> None:
            with IPRoute(netns=veth.far, flags=0) as ipr:
                ipr.link("del", index=ipr.link_lookup(ifname=FAR_IF)[0])
            with IPRoute(netns=veth.near, flags=0) as ipr:
                ipr.link("add", ifname=NEAR_IF, kind="veth", peer=FAR_IF)
                ipr.link("set", index=ipr.link_lookup(ifname=FAR_IF)[0], net_ns_fd=veth.far)
                index = ipr.link_lookup(ifname=NEAR_IF)[0]
                ipr.addr("add", index=index, address="198.18.0.1", prefixlen=30)
                ipr.link("set", index=index, state="up")
            with IPRoute(netns=veth.far, flags=0) as ipr:
                index = ipr.link_lookup(ifname=FAR_IF)[0]
                ipr.addr("add", index=index, address="198.18.0.2", prefixlen=30)
                ipr.link("set", index=index, state="up")

        old_index = (await asyncio.to_thread(read_link, NEAR_IF, veth.near)).ifindex
        await asyncio.to_thread(recreate)
        assert (await asyncio.to_thread(read_link, NEAR_IF, veth.near)).ifindex != old_index
        with pytest.raises(LinkError, match="event loop"):
            read_link(NEAR_IF, veth.near)
        await push(veth, down=10_000)
        await second.sample_interface("m0", HOME, NEAR_IF, netns=veth.near)
        assert within(second.snapshot(HOME)["rx_bytes"] - before, 10_000, 10)
    finally:
        await second.close()


async def test_unreadable_interface_records_nothing(tmp_path: Path) -> None:
    tracker = tracker_on(tmp_path / "usage.db")
    try:
        with capture_logs() as logs:
            assert await tracker.sample_interface("m0", HOME, "esa-nonexistent0") == []
        assert any(e["event"] == "usage_link_unreadable" for e in logs)
        assert tracker.snapshot(HOME)["total_bytes"] == 0
    finally:
        await tracker.close()


def link(rx: int, tx: int, ifindex: int = 7) -> LinkCounters:
    return LinkCounters(ifname="wwan0", ifindex=ifindex, rx_bytes=rx, tx_bytes=tx)


async def test_modem_counters_are_a_cross_check(tmp_path: Path) -> None:
    tracker = tracker_on(tmp_path / "usage.db")
    mb = 1 << 20
    try:
        await tracker.sample_link("m0", HOME, link(0, 0), Counters(rx_bytes=0, tx_bytes=0))
        with capture_logs() as logs:
            # Within framing tolerance: 3 % more on the interface (Ethernet headers).
            await tracker.sample_link(
                "m0", HOME, link(103 * mb, 0), Counters(rx_bytes=100 * mb, tx_bytes=0)
            )
        assert not [e for e in logs if e["event"] == "usage_crosscheck_mismatch"]
        with capture_logs() as logs:
            # The modem saw 100 MB more than the interface: one warning, not one per sample.
            for n in (1, 2):
                await tracker.sample_link(
                    "m0",
                    HOME,
                    link((103 + n) * mb, 0),
                    Counters(rx_bytes=(100 + n * 100) * mb, tx_bytes=0),
                )
        mismatches = [e for e in logs if e["event"] == "usage_crosscheck_mismatch"]
        assert len(mismatches) == 1
        assert mismatches[0]["link_bytes"] == 104 * mb
        # The usage itself is the interface's figure; the modem's is only compared.
        assert tracker.snapshot(HOME)["rx_bytes"] == 105 * mb
        # A modem counter that restarted gives no comparison for that window.
        await tracker.sample_link("m0", HOME, link(106 * mb, 0), Counters(rx_bytes=0, tx_bytes=0))
        assert tracker.memory.add_crosscheck(HOME, 0, 0, T0 + 100) == (105 * mb, 300 * mb)
        store = tracker.store
        assert store is not None
        assert store.add_crosscheck(HOME, 0, 0, T0 + 100) == (105 * mb, 300 * mb)  # the file too
    finally:
        await tracker.close()


def test_crosscheck_tolerance() -> None:
    assert not crosscheck_mismatch(0, 1 << 20)
    assert crosscheck_mismatch(0, (1 << 20) + 1)
    assert not crosscheck_mismatch(100_000_000, 109_000_000)
    assert crosscheck_mismatch(100_000_000, 112_000_000)


async def test_probe_bytes_in_the_ledger(tmp_path: Path) -> None:
    tracker = tracker_on(tmp_path / "usage.db")
    try:
        await tracker.record_probe_bytes("primary", HOME, 280, 280)
        await tracker.record_probe_bytes("primary", HOME, 56, 0)
        await tracker.record_probe_bytes("primary", TRAVEL, 28, 28)
        await tracker.record_probe_bytes("failover", None, 100, 0)
        await tracker.record_probe_bytes("failover", None, 0, 0)
        primary = tracker.probe_snapshot("primary")
        assert primary is not None
        assert primary["tx_bytes"] == 364
        assert primary["rx_bytes"] == 308
        assert primary["by_profile"] == {HOME: 616, TRAVEL: 56}
        assert tracker.probe_snapshot("failover") == {
            "layer": "failover",
            "period": "2024-06",
            "tx_bytes": 100,
            "rx_bytes": 0,
            "total_bytes": 100,
            "by_profile": {"-": 100},
        }
        assert tracker.probe_snapshot("nosuch") == {
            "layer": "nosuch",
            "period": "2024-06",
            "tx_bytes": 0,
            "rx_bytes": 0,
            "total_bytes": 0,
            "by_profile": {},
        }
    finally:
        await tracker.close()


def test_store_link_modes(tmp_path: Path) -> None:
    with UsageStore(tmp_path / "usage.db") as store:
        store.record_link(HOME, "wwan0", 3, rx_bytes=1000, tx_bytes=500, at=T0)  # baseline
        assert store.totals(HOME).total_bytes == 0
        store.record_link(HOME, "wwan0", 3, rx_bytes=1600, tx_bytes=700, at=T0 + 1)
        assert (store.totals(HOME).rx_bytes, store.totals(HOME).tx_bytes) == (600, 200)
        store.record_link(HOME, "wwan0", 3, rx_bytes=100, tx_bytes=50, at=T0 + 2)  # restarted
        assert store.totals(HOME).total_bytes == 950
        store.record_link(HOME, "wwan1", 9, rx_bytes=5000, tx_bytes=5000, at=T0 + 3)
        assert store.totals(HOME).total_bytes == 950  # another interface: a new baseline
        store.record_link(
            HOME, "wwan1", 9, rx_bytes=6000, tx_bytes=5000, at=T0 + 4, mode="baseline"
        )
        assert store.totals(HOME).total_bytes == 950
        store.record_link(HOME, "wwan1", 10, rx_bytes=70, tx_bytes=30, at=T0 + 5, mode="whole")
        assert store.totals(HOME).total_bytes == 1050
        with pytest.raises(ValueError, match="negative"):
            store.record_link(HOME, "wwan1", 10, rx_bytes=-1, tx_bytes=0, at=T0 + 6)
