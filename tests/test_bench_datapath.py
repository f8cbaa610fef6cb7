"""The datapath bench's own parts: the mwan3track baseline decides as mwan3track does, its route
move is seen by the bench's route check, and the daemon config it writes is one the agent takes.
(The timed runs live in bench/, never here.)"""

from __future__ import annotations

import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from pyroute2 import IPRoute

from agent.config import parse_config
from bench.bench_datapath import Modem, agent_config, route_via, to_toml
from bench.mwan3track_baseline import DOWN, UP, MetricMover, Mwan3Track
from hw_fixtures.netns_testing import inside, temp_netns
from tests.netns_lab import needs_root


def tracker() -> tuple[Mwan3Track, list[str]]:
    calls: list[str] = []

    async def down(iface: str) -> None:
        calls.append(f"down {iface}")

    async def up(iface: str) -> None:
        calls.append(f"up {iface}")

    return Mwan3Track("wwan0", "198.19.0.1", down, up), calls


async def test_mwan3track_declares_down_on_the_fifth_failed_round_and_up_on_the_fifth_good() -> (
    None
):
    t, calls = tracker()
    for _ in range(DOWN - 1):
        assert await t.round(False) == 10.0
    assert (t.status, calls) == ("disconnecting", [])
    await t.round(False)
    assert (t.status, calls) == ("offline", ["down wwan0"])
    await t.round(False)  # more failures change nothing
    for _ in range(UP - 1):
        await t.round(True)
    assert (t.status, calls) == ("connecting", ["down wwan0"])
    await t.round(True)
    assert (t.status, calls) == ("online", ["down wwan0", "up wwan0"])


async def test_mwan3track_one_good_round_restores_the_full_score() -> None:
    t, calls = tracker()
    for _ in range(DOWN - 1):
        await t.round(False)
    await t.round(True)
    for _ in range(DOWN - 1):
        await t.round(False)
    assert (t.status, calls) == ("disconnecting", [])


def test_the_daemon_config_the_bench_writes_is_accepted(tmp_path: Path) -> None:
    modems = {
        f"m{i}": Modem(f"m{i}", f"/dev/pts/{i}", f"esam{i}", f"198.18.{i}.2", f"198.18.{i}.1", 24)
        for i in range(2)
    }
    data = agent_config(tmp_path, modems, daemon=True)
    cfg = parse_config(tomllib.loads(to_toml(data)))
    assert [m.interface for m in cfg.modems] == ["esam0", "esam1"]
    assert [(p.kind, p.interval, p.timeout) for layer in cfg.layers for p in layer.probes] == [
        ("icmp", 5.0, 1.0),
        ("icmp", 5.0, 1.0),
    ]
    assert cfg.mqtt.enabled is False


@pytest.fixture
def veths() -> Iterator[str]:
    with temp_netns("bench") as ns:
        with IPRoute(netns=ns) as ipr:
            for i in range(2):
                ipr.link("add", ifname=f"a{i}", kind="veth", peer={"ifname": f"b{i}"})
                for name in (f"a{i}", f"b{i}"):
                    ipr.link("set", index=ipr.link_lookup(ifname=name)[0], state="up")
                idx = ipr.link_lookup(ifname=f"a{i}")[0]
                ipr.addr("add", index=idx, address=f"198.18.{i}.2", prefixlen=24)
        yield ns


@needs_root()
async def test_metric_mover_moves_the_lowest_default_route(veths: str) -> None:
    with inside(veths):
        from pyroute2 import AsyncIPRoute

        mover, ipr = MetricMover(), AsyncIPRoute()
        try:
            await mover.place("a0", "198.18.0.1", 10)
            await mover.place("a1", "198.18.1.1", 20)
            assert await route_via(ipr, 4, "a0")
            await mover.demote("a0")
            assert await route_via(ipr, 4, "a1")
            assert not await route_via(ipr, 229, "a1")  # only the agent's protocol counts there
            await mover.restore("a0")
            assert await route_via(ipr, 4, "a0")
            await mover.remove_all()
            assert not await route_via(ipr, None, "a0")
        finally:
            mover.close()
            ipr.close()
