"""Layers across devices across a Mosquitto bridge (issue 11, "Beyond one broker").

The van's travel router runs a local Mosquitto bridged home with the shipped
config/mosquitto/bridge.conf; both brokers use the shipped ACL with per-device credentials (home
also lets the bridge's own user write the tree, as docs/bridge.md says). The phone, its
companion watch and the router (a group emergency holder) talk to the van's broker; the tablet,
first in the wake order, sits at home. Last Wills, retained state and claims cross the bridge:
the same story as on one broker, with exactly one emergency profile awake.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent.demo.stack import mosquitto_available
from hw_fixtures.group_lab import (
    BASE,
    GroupLab,
    LabBroker,
    ProfileMonitor,
    passwords,
)
from tests.mosquitto import Watcher
from tests.test_e2e_siblings import (
    PHONE,
    ROUTER_E,
    STEP_S,
    TABLET_E,
    WATCH,
    at_most_one_emergency,
    awake_emergencies,
    connected,
    data_answers,
    dormant,
    group,
    settled,
)

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not mosquitto_available(), reason="needs mosquitto (apt install mosquitto)"),
]

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "config" / "mosquitto" / "bridge.conf"
BRIDGE_USER = "van-router"


def bridge_lines(home: LabBroker, password: str) -> list[str]:
    """The shipped bridge config pointed at `home` on loopback: no TLS, the lab's credentials."""
    drop = ("address", "remote_password", "bridge_cafile", "bridge_insecure")
    lines = [
        line
        for line in SHIPPED.read_text().splitlines()
        if line.strip() and not line.startswith("#") and not line.startswith(drop)
    ]
    at = lines.index("connection home") + 1
    lines[at:at] = [f"address {home.host}:{home.port}", f"remote_password {password}"]
    # Reconnect fast in tests (the shipped 2..30 s backoff is for real links).
    return [("restart_timeout 1 2" if x.startswith("restart_timeout") else x) for x in lines]


@pytest.fixture
async def lab(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[GroupLab]:
    specs = group()
    for spec in specs:
        spec.broker = "home" if spec.name == "tablet" else "main"
    users = passwords(s.name for s in specs)
    home_users = {**users, BRIDGE_USER: "pw-bridge-lab"}
    for side in ("home", "van"):
        (tmp_path / side).mkdir()
    # docs/bridge.md: the bridge's remote user may write the whole tree at home.
    bridge_acl = f"user {BRIDGE_USER}\ntopic readwrite {BASE}/#\ntopic readwrite bridges/van/#\n"
    home = LabBroker(tmp_path / "home", home_users, acl_extra=bridge_acl)
    await asyncio.to_thread(home.start)
    van = LabBroker(tmp_path / "van", users, lines=bridge_lines(home, home_users[BRIDGE_USER]))
    group_lab = GroupLab(
        tmp_path / "lab", specs, priority={"tablet": 1, "router": 2}, brokers={"main": van}
    )
    group_lab.brokers["home"] = home
    try:
        await asyncio.to_thread(van.start)
        # The bridge is up before any daemon starts (else the first messages wait in its queue).
        bridge = home_users[BRIDGE_USER]
        async with Watcher(home, "bridges/#", username=BRIDGE_USER, password=bridge) as w:
            await w.wait_for("bridges/van/state", lambda p: p == b"1", STEP_S)
        await group_lab.start()
        yield group_lab
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            group_lab.report(sys.stderr)
    finally:
        await group_lab.close()
        await asyncio.to_thread(van.close)
        await asyncio.to_thread(home.close)


async def test_the_sibling_story_crosses_the_bridge(lab: GroupLab) -> None:
    home = lab.brokers["home"]
    async with lab.viewer("home") as at_home:
        await settled(lab)
        # The van's retained state reached home, and the tablet's the van.
        await at_home.wait_json(f"{BASE}/phone/state", connected, STEP_S)
        await lab.availability("tablet", "online", STEP_S)
        async with ProfileMonitor(lab, [at_most_one_emergency]) as monitor:
            await monitor.wait(dormant, STEP_S)

            # The phone dies in the van: its Last Will reaches home too; the watch takes over.
            mark, home_mark = lab.mark(), len(at_home.messages)
            await lab.kill("phone")
            await at_home.wait_for(
                f"{BASE}/phone/availability", lambda p: p == b"offline", STEP_S, home_mark
            )
            await lab.state("watch", lambda s: s["active_layer"] == "own" and connected(s))
            await monitor.wait(lambda s: s["watch"] == {WATCH}, STEP_S)
            assert await data_answers(lab, "watch")

            # The watch's data path dies: the tablet at home claims and wakes; its claim
            # crosses to the van, so the router there stays asleep.
            home_mark = len(at_home.messages)
            await lab.cut_data("watch")
            snap = await monitor.wait(lambda s: bool(awake_emergencies(s)), STEP_S)
            assert awake_emergencies(snap) == ["tablet"]
            assert lab.watcher is not None
            claim = await lab.watcher.wait_json(
                f"{BASE}/tablet/claim/family", lambda c: c["device"] == "tablet", STEP_S, mark
            )
            assert claim["group"] == "family"
            await at_home.wait_json(f"{BASE}/tablet/state", connected, STEP_S, home_mark)
            await lab.state("tablet", connected, STEP_S, mark)  # seen in the van

            # All heal: dormant on both sides, the tablet's claim cleared everywhere.
            mark = lab.mark()
            await lab.heal_data("watch")
            lab.restart("phone")
            await monitor.wait(dormant, STEP_S)
            await lab.state("tablet", lambda s: not connected(s), STEP_S, mark)
            assert lab.watcher is not None
            await lab.watcher.wait_for(
                f"{BASE}/tablet/claim/family", lambda p: p == b"", STEP_S, mark
            )
            assert not any(ROUTER_E in s["router"] for _, s in monitor.history)
            assert any(TABLET_E in s["tablet"] for _, s in monitor.history)
            assert monitor.current["phone"] == {PHONE}
        monitor.assert_clean()
    assert home.running
