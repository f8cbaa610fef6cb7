"""DataPath end to end in namespaces: two emulated modems (AT over pty) whose interfaces are the
lab's veths. The data connections come up, addresses and routes follow, traffic follows the
active layer, each layer's probes reach only its own operator, and closing removes it all."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import AsyncIPRoute

from agent.at.channel import AtChannel
from agent.config import Config, parse_config
from agent.daemon.datapath import DataPath
from agent.health.probes import probe_from_spec
from agent.modem.dataconn import DataState
from agent.modem.vendors import vendor_by_name
from agent.net.routes import ACTIVE_METRIC, RT_PROTO
from hw_fixtures.testing import EmulatorHandle
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

LAYERS = ("primary", "backup")


@pytest.fixture
def lab() -> Iterator[Lab]:
    with make_lab(2) as lab_, in_netns(lab_.agent):
        yield lab_


def scenario(tmp_path: Path) -> Path:
    """Two generic modems whose CGCONTRDP grants the lab's addresses on m0 and m1."""
    out = []
    for i in range(2):
        grant = (
            f'\\n+CGCONTRDP: 1,5,\\"internet\\",\\"198.18.{i + 1}.2.255.255.255.0\\",'
            f'\\"198.18.{i + 1}.1\\",\\"{INTERNET}\\"\\n\\nOK\\n'
        )
        out += [
            "[[modem]]",
            f'id = "m{i}"',
            'vendor = "generic"',
            "pdp_auto = false",
            "[[modem.profiles]]",
            f'iccid = "894450010203040506{i}"',
            'name = "P"',
            "enabled = true",
            "[modem.replies]",
            f'"AT+CGCONTRDP=1" = "{grant}"',
            "",
        ]
    path = tmp_path / "two.toml"
    path.write_text("\n".join(out))
    return path


def config(emu: EmulatorHandle, tmp_path: Path) -> Config:
    data: dict[str, Any] = {
        "device_id": "dp",
        "state_dir": str(tmp_path),
        "modems": [
            {"id": f"m{i}", "port": emu.modem(f"m{i}")["link"], "interface": f"m{i}"}
            for i in range(2)
        ],
        "layers": [
            {
                "name": name,
                "modem": f"m{i}",
                "profile": f"894450010203040506{i}0",
                "role": "primary" if i == 0 else "failover",
                "apn": "internet",
            }
            for i, name in enumerate(LAYERS)
        ],
    }
    return parse_config(data)


async def connect() -> None:
    sock = socket.socket()
    sock.setblocking(False)
    try:
        async with asyncio.timeout(5):
            await asyncio.get_running_loop().sock_connect(sock, (INTERNET, TCP_PORT))
    finally:
        sock.close()


async def wait_snapshot(
    dp: DataPath, want: Callable[[dict[str, dict[str, object]]], bool], timeout: float = 20.0
) -> None:
    async with asyncio.timeout(timeout):
        while not want(dp.snapshot()):
            dp.updated.clear()
            await dp.updated.wait()


async def addresses_on(ifname: str) -> list[str]:
    async with AsyncIPRoute() as ipr:
        idx = (await ipr.link_lookup(ifname=ifname))[0]
        return [
            f"{a.get('address')}/{a['prefixlen']}"
            async for a in await ipr.addr("dump", index=idx)
            if a.get("family") == socket.AF_INET
        ]


async def tagged_count() -> int:
    async with AsyncIPRoute() as ipr:
        routes = [r async for r in await ipr.route("dump") if r.get("proto") == RT_PROTO]
        rules = [r async for r in await ipr.rule("dump") if r.get("protocol") == RT_PROTO]
        return len(routes) + len(rules)


async def test_traffic_follows_the_active_layer_and_probes_stay_on_their_link(
    lab: Lab, tmp_path: Path, emu_factory: Callable[..., EmulatorHandle]
) -> None:
    emu = emu_factory("--scenario", str(scenario(tmp_path)))
    cfg = config(emu, tmp_path)
    dp = await DataPath.open(cfg)
    channels = [await AtChannel.open(emu.modem(f"m{i}")["link"]) for i in range(2)]
    try:
        async with operator_servers(lab), asyncio.TaskGroup() as tg:
            tasks = [
                tg.create_task(
                    dp.run_modem(f"m{i}", channels[i], vendor_by_name("generic"), LAYERS[i]),
                    name=f"data-m{i}",
                )
                for i in range(2)
            ]
            await wait_snapshot(dp, lambda snap: all(snap[n]["metric"] for n in LAYERS))
            await dp.set_active("primary")
            snap = dp.snapshot()
            assert snap["primary"]["metric"] == ACTIVE_METRIC
            assert snap["primary"]["default"] is True
            assert snap["backup"]["default"] is False
            assert snap["backup"]["addresses"] == ["198.18.2.2"]
            data = snap["primary"]["data"]
            assert isinstance(data, dict)
            assert data["state"] == str(DataState.UP)
            await connect()
            assert await lab.operators[0].wait_seen("tcp", 1) == ["198.18.1.2"]
            # Each layer's probe reaches its own operator whatever the main table says.
            for i, name in enumerate(LAYERS):
                probe = probe_from_spec("tcp", f"{INTERNET}:{TCP_PORT}", 3.0, dp.binding(name))
                assert (await probe.run()).ok
                dns = probe_from_spec("dns", "probe.example@link", 3.0, dp.binding(name))
                assert (await dns.run()).ok
                assert lab.operators[i].seen["dns"] == [f"198.18.{i + 1}.2"]
            assert lab.operators[1].seen["tcp"] == ["198.18.2.2"]
            # Failover: the default route moves, new connections take the backup's link.
            await dp.set_active("backup")
            await connect()
            assert await lab.operators[1].wait_seen("tcp", 2) == ["198.18.2.2"] * 2
            # The primary's context goes (registration lost): its routes and address go too,
            # and come back when the keeper re-establishes it.
            emu.control("set_registration", modem="m0", state="searching")
            dp.context_lost("m0")
            await wait_snapshot(dp, lambda snap: snap["primary"]["metric"] is None)
            assert await addresses_on("m0") == []
            emu.control("set_registration", modem="m0", state="home")
            await wait_snapshot(dp, lambda snap: snap["primary"]["metric"] is not None)
            assert await addresses_on("m0") == ["198.18.1.2/24"]
            for task in tasks:
                task.cancel()
    except* asyncio.CancelledError:
        pass
    finally:
        for ch in channels:
            await ch.close()
        await dp.close()
    assert await tagged_count() == 0


async def test_without_interfaces_nothing_is_touched_and_probes_stay_unbound(
    tmp_path: Path,
) -> None:
    data: dict[str, Any] = {
        "device_id": "dp",
        "state_dir": str(tmp_path),
        "modems": [{"id": "m0", "port": "/dev/null", "interface": "none"}],
        "layers": [
            {"name": "primary", "modem": "m0", "profile": "89445001020304050600", "role": "primary"}
        ],
    }
    dp = await DataPath.open(parse_config(data))
    try:
        assert dp.routes is None
        assert dp.binding("primary").bound is False
        assert dp.snapshot()["primary"]["interface"] is None
        await dp.set_active("primary")
    finally:
        await dp.close()


@pytest.fixture
def lab1() -> Iterator[Lab]:
    with make_lab(1) as lab_, in_netns(lab_.agent):
        yield lab_


async def test_router_mode_modem_gets_its_address_by_dhcp(
    lab1: Lab, tmp_path: Path, emu_factory: Callable[..., EmulatorHandle]
) -> None:
    """Quectel in ECM mode: connect with AT+QNETDEVCTL, then DHCP from the modem's server."""
    text = "\n".join(
        [
            "[[modem]]",
            'vendor = "quectel"',
            "pdp_auto = false",
            "[[modem.profiles]]",
            'iccid = "89445001020304050600"',
            'name = "P"',
            "enabled = true",
            "[modem.replies]",
            '"AT+QCFG=\\"usbnet\\"" = "\\n+QCFG: \\"usbnet\\",1\\n\\nOK\\n"',
            '"AT+QNETDEVCTL=1,1,1" = "\\nOK\\n"',
            '"AT+QNETDEVCTL=0,1,0" = "\\nOK\\n"',
            "",
        ]
    )
    (tmp_path / "ecm.toml").write_text(text)
    lab = lab1
    emu = emu_factory("--scenario", str(tmp_path / "ecm.toml"))
    cfg = parse_config(
        {
            "device_id": "dp",
            "state_dir": str(tmp_path),
            "modems": [{"id": "m0", "port": emu.port, "interface": "m0", "vendor": "quectel"}],
            "layers": [
                {
                    "name": "ecm",
                    "modem": "m0",
                    "profile": "89445001020304050600",
                    "role": "primary",
                    "apn": "internet",
                }
            ],
        }
    )
    dp = await DataPath.open(cfg)
    channel = await AtChannel.open(emu.port)
    try:
        async with operator_servers(lab), dhcp_server(lab, 0), asyncio.TaskGroup() as tg:
            task = tg.create_task(
                dp.run_modem("m0", channel, vendor_by_name("quectel"), "ecm"), name="data"
            )
            await wait_snapshot(dp, lambda snap: snap["ecm"]["metric"] is not None)
            await dp.set_active("ecm")
            snap = dp.snapshot()["ecm"]
            assert snap["addresses"] == ["198.18.1.2"]
            data = snap["data"]
            assert isinstance(data, dict)
            assert (data["usb_mode"], data["addressing"]) == ("ecm", "dhcp")
            assert dp.binding("ecm").dns == (INTERNET,)
            await connect()
            assert await lab.operators[0].wait_seen("tcp", 1) == ["198.18.1.2"]
            assert "AT+QNETDEVCTL=1,1,1" in emu.status()["history"]
            task.cancel()
            await asyncio.wait([task])
            # Taking the link down released the lease while the modem's server still listened.
            assert await lab.operators[0].wait_seen("dhcp", 3) == ["discover", "request", "release"]
    except* asyncio.CancelledError:
        pass
    finally:
        await channel.close()
        await dp.close()
    assert await addresses_on("m0") == []
    assert await tagged_count() == 0


async def test_mbim_modem_is_reported_and_its_interface_still_routed(
    lab1: Lab, tmp_path: Path, emu_factory: Callable[..., EmulatorHandle]
) -> None:
    """Dell (MBIM only): nothing is driven over AT, but an address something else put on the
    interface is routed through and probes stay bound to it."""
    lab = lab1
    async with AsyncIPRoute() as ipr:
        idx = (await ipr.link_lookup(ifname="m0"))[0]
        await ipr.addr("add", index=idx, address="198.18.1.2", prefixlen=24)
    emu = emu_factory("--vendor", "dell")
    cfg = parse_config(
        {
            "device_id": "dp",
            "state_dir": str(tmp_path),
            "modems": [{"id": "m0", "port": emu.port, "interface": "m0", "vendor": "dell"}],
            "layers": [
                {
                    "name": "mbim",
                    "modem": "m0",
                    "profile": "89445001020304050600",
                    "role": "primary",
                }
            ],
        }
    )
    dp = await DataPath.open(cfg)
    channel = await AtChannel.open(emu.port)
    try:
        async with asyncio.TaskGroup() as tg:
            task = tg.create_task(dp.run_modem("m0", channel, vendor_by_name("dell"), "mbim"))
            await wait_snapshot(dp, lambda snap: snap["mbim"]["metric"] is not None)
            snap = dp.snapshot()["mbim"]
            data = snap["data"]
            assert isinstance(data, dict)
            assert data["state"] == "unsupported"
            assert data["reason"] == "data function needs MBIM, not AT"
            assert snap["addresses"] == ["198.18.1.2"]
            assert dp.binding("mbim").interface == "m0"
            assert not any(c.startswith("AT+CGACT=") for c in emu.status()["history"])
            task.cancel()
    except* asyncio.CancelledError:
        pass
    finally:
        await channel.close()
        await dp.close()
    # Somebody else's address stays; our routes go.
    assert await addresses_on("m0") == ["198.18.1.2/24"]
    assert await tagged_count() == 0
    assert lab.operators[0].seen["tcp"] == []
