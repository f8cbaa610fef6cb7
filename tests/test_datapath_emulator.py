"""DataPath against the emulator's real interfaces (`--net netns`): nothing canned. A generic
(NCM, address from AT+CGCONTRDP) and a Quectel (ECM: AT+QNETDEVCTL, then DHCP) modem; traffic
follows the active layer, each layer's probes are seen only by its own operator, and the
silent failure (upstream cut, modem still registered) fails only that layer's probes."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.at.channel import AtChannel
from agent.config import parse_config
from agent.daemon.datapath import DataPath
from agent.health.probes import probe_from_spec
from agent.modem.vendors import vendor_by_name
from agent.net.routes import ACTIVE_METRIC
from hw_fixtures.netns_testing import inside
from hw_fixtures.testing import EmulatorHandle
from tests.netns_lab import needs_root

pytestmark = needs_root()

INTERNET = "198.19.0.1"
ECHO_PORT = 7
LAYERS = {"primary": ("m0", "generic"), "backup": ("m1", "quectel")}

SCENARIO = """
[[modem]]
id = "m0"
vendor = "generic"
[[modem.profiles]]
iccid = "8944500102030405060"
name = "Home"
enabled = true

[[modem]]
id = "m1"
vendor = "quectel"
[[modem.profiles]]
iccid = "8944500102030405061"
name = "Travel"
enabled = true
"""


async def wait_snapshot(
    dp: DataPath, want: Callable[[dict[str, dict[str, object]]], bool], timeout: float = 30.0
) -> None:
    async with asyncio.timeout(timeout):
        while not want(dp.snapshot()):
            dp.updated.clear()
            await dp.updated.wait()


def requests(emu: EmulatorHandle, modem: str) -> dict[str, list[str]]:
    """What modem's operator servers saw since the last call (sources per service)."""
    reply: dict[str, Any] = emu.control("requests", modem=modem, reset=True)
    return reply["requests"]


async def connect() -> None:
    sock = socket.socket()
    sock.setblocking(False)
    try:
        async with asyncio.timeout(5):
            await asyncio.get_running_loop().sock_connect(sock, (INTERNET, ECHO_PORT))
    finally:
        sock.close()


async def test_traffic_and_probes_follow_their_layers_on_emulated_modems(
    netns_emu_factory: Callable[..., EmulatorHandle], agent_netns: str, tmp_path: Path
) -> None:
    (tmp_path / "two.toml").write_text(SCENARIO)
    emu = netns_emu_factory("--scenario", str(tmp_path / "two.toml"))
    modems = {m: emu.modem(m) for m, _ in LAYERS.values()}
    cfg = parse_config(
        {
            "device_id": "e2e",
            "state_dir": str(tmp_path),
            "modems": [
                {"id": m, "port": info["link"], "interface": info["interface"], "vendor": v}
                for m, v in LAYERS.values()
                for info in [modems[m]]
            ],
            "layers": [
                {
                    "name": name,
                    "modem": m,
                    "profile": f"894450010203040506{i}",
                    "role": "primary" if i == 0 else "failover",
                    "apn": "internet",
                }
                for i, (name, (m, _)) in enumerate(LAYERS.items())
            ],
        }
    )
    with inside(agent_netns):
        dp = await DataPath.open(cfg)
        channels = {m: await AtChannel.open(modems[m]["link"]) for m in modems}
        try:
            async with asyncio.TaskGroup() as tg:
                tasks = [
                    tg.create_task(
                        dp.run_modem(m, channels[m], vendor_by_name(v), name), name=f"data-{m}"
                    )
                    for name, (m, v) in LAYERS.items()
                ]
                await wait_snapshot(dp, lambda s: all(s[n]["metric"] for n in LAYERS))
                await dp.set_active("primary")
                snap = dp.snapshot()
                assert snap["primary"]["metric"] == ACTIVE_METRIC
                assert snap["primary"]["addresses"] == [modems["m0"]["address"]]
                assert snap["backup"]["addresses"] == [modems["m1"]["address"]]
                backup_data = snap["backup"]["data"]
                assert isinstance(backup_data, dict)
                assert (backup_data["usb_mode"], backup_data["addressing"]) == ("ecm", "dhcp")
                for m in modems:
                    requests(emu, m)  # forget the DHCP exchange

                # New connections follow the active layer ...
                await connect()
                assert requests(emu, "m0")["tcp"] == [modems["m0"]["address"]]
                assert requests(emu, "m1")["tcp"] == []
                # ... and each layer's probes are seen only by its own operator.
                for name, (m, _) in LAYERS.items():
                    for kind, target in (
                        ("tcp", f"{INTERNET}:{ECHO_PORT}"),
                        ("http", f"http://{INTERNET}/generate_204"),
                        ("dns", "probe.example@link"),
                    ):
                        result = await probe_from_spec(kind, target, 3.0, dp.binding(name)).run()
                        assert result.ok, (name, kind, result.error)
                    other = "m1" if m == "m0" else "m0"
                    seen = requests(emu, m)
                    assert seen["tcp"] == seen["http"] == seen["dns"] == [modems[m]["address"]]
                    assert not any(requests(emu, other).values())

                # The silent failure: upstream cut while the modem stays registered. The
                # primary's own probe fails although its default route is still the lowest.
                emu.control("link", modem="m0", state="down")
                probe = probe_from_spec(
                    "tcp", f"{INTERNET}:{ECHO_PORT}", 1.0, dp.binding("primary")
                )
                assert not (await probe.run()).ok
                backup_probe = probe_from_spec(
                    "tcp", f"{INTERNET}:{ECHO_PORT}", 3.0, dp.binding("backup")
                )
                assert (await backup_probe.run()).ok
                # Failover: the route moves; a new connection goes out through the backup.
                await dp.set_active("backup")
                requests(emu, "m1")
                await connect()
                assert requests(emu, "m1")["tcp"] == [modems["m1"]["address"]]
                for task in tasks:
                    task.cancel()
        except* asyncio.CancelledError:
            pass
        finally:
            for ch in channels.values():
                await ch.close()
            await dp.close()
