"""Notifications over real interfaces: the daemon's ES9+ connection for a notification leaves
through the working layer's interface (the downloads' bound connection), and after a failover
through the new one.

    agent ns: esim-agent run, mosquitto             operator ns per modem (the emulator's)
    m0 interface  <------------- veth ------------> 198.19.0.1:443 test SM-DP+ (one core, a
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
from agent.daemon.control import control_call
from agent.demo.mosquitto import MosquittoBroker
from agent.demo.stack import DEMO_ICCIDS, DEMO_SCENARIO, mosquitto_available
from hw_fixtures.netns_testing import inside
from hw_fixtures.pki import TestPki
from hw_fixtures.smdp import SmdpCore, SmdpServer
from hw_fixtures.testing import EmulatorHandle
from tests.netns_lab import needs_root
from tests.test_e2e_datapath import INTERNET, STEP_S, NetStack, carried_by

pytestmark = [
    pytest.mark.e2e,
    needs_root(),
    pytest.mark.skipif(not mosquitto_available(), reason="needs mosquitto"),
]

_PRIMARY, ROAM, EMERGENCY = DEMO_ICCIDS


class SeenSmdp(SmdpServer):
    """The test SM-DP+ that notes each client's source address."""

    def __init__(self, core: SmdpCore, peers: list[str]) -> None:
        # 443: the emulated eUICC addresses its notifications to the SM-DP+ host alone.
        super().__init__(core, host="0.0.0.0", port=443)
        self.peers = peers

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.peers.append(str(writer.get_extra_info("peername")[0]))
        await super()._client(reader, writer)


@pytest.fixture
async def net_notify(
    netns_emu_factory: Callable[..., EmulatorHandle],
    agent_netns: str,
    tmp_path: Path,
    test_pki: TestPki,
) -> AsyncIterator[tuple[NetStack, SmdpCore, list[str]]]:
    assert test_pki.directory is not None
    emu = await asyncio.to_thread(
        netns_emu_factory,
        "--scenario",
        str(DEMO_SCENARIO),
        "--pki",
        str(test_pki.directory),
    )
    core = SmdpCore(pki=test_pki, address=test_pki.smdp_host)
    peers: list[str] = []
    servers: list[SeenSmdp] = []
    for modem in ("m0", "m1"):
        # The same SM-DP+ on the Internet of either operator: reachable over either link.
        server = SeenSmdp(core, peers)
        with inside(str(emu.modem(modem)["netns"])):
            await server.start()
        servers.append(server)
    broker = MosquittoBroker(tmp_path / "mosquitto")
    broker.workdir.mkdir(parents=True, exist_ok=True)
    with inside(agent_netns):
        broker.start()
    stack = NetStack(agent_netns, emu, tmp_path, broker)
    stack.write_config()
    data = tomllib.loads(stack.config_path.read_text())
    data["rsp"] = {
        "ci_certs": [str(test_pki.directory / "ci.pem")],
        "resolve": [f"{test_pki.smdp_host}:443:{INTERNET}"],
        # Long: only a new working link brings a retry forward in this test.
        "notification_retry_initial": 600.0,
        "notification_retry_max": 3600.0,
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
    """No switch in flight, m1 back on its roaming profile, nothing left to send (the start
    may pass through the emergency profile while the first probes run)."""
    m1 = next(m for m in status["modems"] if m["id"] == "m1")
    return (
        status["phase"] == "active"
        and not m1["switching"]
        and m1["enabled_iccid"] == ROAM
        and status["notifications"]["pending"] == 0
    )


def pending_on_m1(status: dict[str, Any]) -> list[str]:
    ops: list[str] = status["notifications"]["modems"]["m1"]["operations"] or []
    return ops


async def test_notifications_leave_through_the_working_layers_interface(
    net_notify: tuple[NetStack, SmdpCore, list[str]],
) -> None:
    stack, core, peers = net_notify
    await stack.until_status(lambda s: carried_by("primary")(s) and settled(s))
    core.notifications.clear()
    peers.clear()

    # The SM-DP+ refuses the first try, which goes out by the primary's link.
    core.refuse_notifications = ("8.1", "6.1")
    await control_call(
        stack.socket,
        "profile_delete",
        {"modem": "m1", "iccid": EMERGENCY, "force": True},
        timeout=STEP_S,
    )
    await stack.until_status(
        lambda s: s["notifications"]["failed"] >= 1 and pending_on_m1(s) == ["delete"]
    )
    assert [n["operation"] for n in core.refused] == ["delete"]
    assert set(peers) == {stack.address("m0")}, "ES9+ left by another way than the primary"

    # Accepted again, but the backoff is long: the failover's new link is what sends it, and
    # through the failover's interface.
    core.refuse_notifications = None
    await stack.emu_control("link", modem="m0", state="down")
    status = await stack.until_status(
        lambda s: carried_by("failover")(s) and s["notifications"]["pending"] == 0
    )
    assert status["notifications"]["modems"]["m1"]["pending"] == 0
    assert [(n["operation"], n["iccid"]) for n in core.notifications] == [("delete", EMERGENCY)]
    assert peers[-1] == stack.address("m1")
    assert set(peers) == {stack.address("m0"), stack.address("m1")}
