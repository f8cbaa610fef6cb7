"""A daemon download over real interfaces: the ES9+ connection leaves through the active layer's
interface (SO_BINDTODEVICE, its fwmark and source address), and follows the layer on a failover.

    agent ns: esim-agent run, mosquitto             operator ns per modem (the emulator's)
    m0 interface  <------------- veth ------------> 198.19.0.1: test SM-DP+ (one core, a
    m1 interface  <------------- veth ------------> listener in each operator's network)
"""

from __future__ import annotations

import asyncio
import tomllib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from agent.config import config_to_toml, parse_config
from agent.daemon.control import ControlError, control_call
from agent.demo.mosquitto import MosquittoBroker
from agent.demo.stack import DEMO_ICCIDS, DEMO_SCENARIO, mosquitto_available
from hw_fixtures.netns_testing import inside
from hw_fixtures.pki import TestPki
from hw_fixtures.smdp import Offer, SmdpCore, SmdpServer
from hw_fixtures.testing import EmulatorHandle
from tests.netns_lab import needs_root
from tests.test_e2e_datapath import INTERNET, STEP_S, NetStack, carried_by, layer_of

pytestmark = [
    pytest.mark.e2e,
    needs_root(),
    pytest.mark.skipif(not mosquitto_available(), reason="needs mosquitto"),
]

FIRST, SECOND = "8988247000005555555", "8988247000006666666"
ROAM = DEMO_ICCIDS[1]


class SeenSmdp(SmdpServer):
    """The test SM-DP+ that notes each client's source address."""

    def __init__(self, core: SmdpCore, peers: list[str], port: int) -> None:
        super().__init__(core, host="0.0.0.0", port=port)
        self.peers = peers

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.peers.append(str(writer.get_extra_info("peername")[0]))
        await super()._client(reader, writer)


@pytest.fixture
async def net_download(
    netns_emu_factory: Callable[..., EmulatorHandle],
    agent_netns: str,
    tmp_path: Path,
    test_pki: TestPki,
) -> AsyncIterator[tuple[NetStack, SmdpCore, list[str]]]:
    assert test_pki.directory is not None
    emu = await asyncio.to_thread(
        netns_emu_factory, "--scenario", str(DEMO_SCENARIO), "--pki", str(test_pki.directory)
    )
    core = SmdpCore(pki=test_pki, address=test_pki.smdp_host)
    peers: list[str] = []
    servers: list[SeenSmdp] = []
    port = 0
    for modem in ("m0", "m1"):
        # The same SM-DP+ on the Internet of either operator: reachable over either link.
        server = SeenSmdp(core, peers, port)
        with inside(str(emu.modem(modem)["netns"])):
            port = await server.start()
        servers.append(server)
    core.address = f"{test_pki.smdp_host}:{port}"
    core.offer(Offer(matching_id="NET-1", iccid=FIRST, name="First"))
    core.offer(Offer(matching_id="NET-2", iccid=SECOND, name="Second"))
    broker = MosquittoBroker(tmp_path / "mosquitto")
    broker.workdir.mkdir(parents=True, exist_ok=True)
    with inside(agent_netns):
        broker.start()
    stack = NetStack(agent_netns, emu, tmp_path, broker)
    stack.write_config()
    data = tomllib.loads(stack.config_path.read_text())
    data["rsp"] = {
        "ci_certs": [str(test_pki.directory / "ci.pem")],
        "resolve": [f"{core.address}:{INTERNET}"],
    }
    stack.config_path.write_text(config_to_toml(parse_config(data, str(stack.config_path))))
    stack.start_daemon()
    try:
        yield stack, core, peers
    finally:
        await stack.stop_daemon()
        broker.close()
        for server in servers:
            await server.stop()


def settled(status: dict[str, Any]) -> bool:
    """No switch in flight and m1 back on its roaming profile (the start may pass through the
    emergency profile while the first probes run)."""
    m1 = next(m for m in status["modems"] if m["id"] == "m1")
    return status["phase"] == "active" and not m1["switching"] and m1["enabled_iccid"] == ROAM


async def download(stack: NetStack, matching_id: str, address: str) -> dict[str, Any]:
    result = await control_call(
        stack.socket,
        "profile_download",
        {"code": f"LPA:1${address}${matching_id}", "modem": "m1"},
        timeout=STEP_S,
    )
    assert isinstance(result, dict)
    return result


async def test_es9_leaves_through_the_active_layers_interface(
    net_download: tuple[NetStack, SmdpCore, list[str]],
) -> None:
    stack, core, peers = net_download
    await stack.until_status(
        lambda s: (
            carried_by("primary")(s) and bool(layer_of(s, "failover")["addresses"]) and settled(s)
        )
    )
    first = await download(stack, "NET-1", core.address)
    assert (first["iccid"], first["layer"]) == (FIRST, "primary")
    assert peers
    assert set(peers) == {stack.address("m0")}, "ES9+ left by another way than the primary"

    # The primary's upstream dies: the next download goes out through the failover's link.
    await stack.emu_control("link", modem="m0", state="down")
    await stack.until_status(lambda s: carried_by("failover")(s) and settled(s))
    peers.clear()
    second = await download(stack, "NET-2", core.address)
    assert (second["iccid"], second["layer"]) == (SECOND, "failover")
    assert set(peers) == {stack.address("m1")}
    assert core.offers["NET-2"].state == "installed"


async def test_a_cut_link_cancels_and_the_smdp_hears_of_it_on_the_next_link(
    net_download: tuple[NetStack, SmdpCore, list[str]],
) -> None:
    stack, core, peers = net_download
    await stack.until_status(lambda s: carried_by("primary")(s) and settled(s))
    # The package is slow to come: the card holds its session when the primary's upstream dies.
    core.delays["getBoundProfilePackage"] = 45.0
    called = core.called.setdefault("getBoundProfilePackage", asyncio.Event())
    pending = asyncio.create_task(download(stack, "NET-1", core.address))
    async with asyncio.timeout(STEP_S):
        await called.wait()
    await stack.emu_control("link", modem="m0", state="down")
    with pytest.raises(ControlError) as lost:
        await pending
    message = lost.value.message
    assert message.startswith("link_lost: "), message
    # The SM-DP+ sits behind the dead link: the card's session is closed now, the SM-DP+'s
    # once a working link (the failover) is there, with the card's signed answer.
    assert "cancelled on the eUICC" in message
    profiles = await control_call(stack.socket, "profile_list", {"modem": "m1"}, timeout=STEP_S)
    assert isinstance(profiles, dict)
    assert FIRST not in [p["iccid"] for p in profiles["profiles"]]
    await stack.until_status(lambda s: carried_by("failover")(s) and bool(core.cancelled))
    assert len(core.cancelled) == 1
    assert stack.address("m1") in peers
    assert core.offers["NET-1"].state != "installed"
