"""A device's own limit inside a shared pool, end to end: the real daemon, a real Mosquitto, the
emulator's modems. The limit alerts once per threshold on the device, and the pool's `on_limit`
action is carried out through the command table (switch_layer, or disable_profile)."""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from agent.demo.stack import DEMO_ICCIDS, DemoStack, mosquitto_available

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not mosquitto_available(), reason="needs mosquitto (apt install mosquitto)"),
]

PRIMARY, ROAM, EMERGENCY = DEMO_ICCIDS
STEP_S = 60.0
LIMIT = 4_000

StackFactory = Callable[..., Awaitable[DemoStack]]


@pytest.fixture
async def make_stack(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[StackFactory]:
    stacks: list[DemoStack] = []

    async def make(**kwargs: Any) -> DemoStack:
        stack = DemoStack(tmp_path / f"stack{len(stacks)}", broker="mosquitto", **kwargs)
        stacks.append(stack)
        await stack.start()
        await stack.wait_json("state", lambda s: s.get("active_layer") == "primary", STEP_S)
        return stack

    yield make
    for stack in stacks:
        await stack.close()
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        for stack in stacks:
            lines = stack.daemon_log.read_text(errors="replace").splitlines()
            sys.stderr.write(f"--- {stack.daemon_log} (last 60 of {len(lines)})\n")
            sys.stderr.write("\n".join(lines[-60:]) + "\n")


def limited_pool(on_limit: str) -> Callable[[dict[str, Any]], None]:
    def tune(cfg: dict[str, Any]) -> None:
        cfg.setdefault("usage", {})["pools"] = [
            {
                "name": "team",
                "members": [PRIMARY],
                "quota_bytes": "1 GB",
                "devices": ["watch"],
                "device_limits": {"demo": LIMIT, "watch": 1},
                "on_limit": on_limit,
            }
        ]

    return tune


def events(stack: DemoStack, kind: str) -> list[dict[str, Any]]:
    assert stack.watcher is not None
    out = []
    for topic, payload, _, _ in stack.watcher.messages:
        if topic == f"{stack.topic}/events":
            event = json.loads(payload)
            if event.get("type") == kind:
                out.append(event["data"])
    return out


async def over_the_limit(stack: DemoStack) -> None:
    """Traffic on the primary's modem past the device's limit; wait for every limit alert."""
    await stack.wait_json(f"usage/{PRIMARY}", lambda u: u["total_bytes"] > 0, STEP_S)
    await stack.control("traffic", modem="m0", rx=LIMIT, tx=500)
    for threshold in (50, 75, 90, 100):
        await stack.wait_json("events", limit_alert(threshold), STEP_S)


def limit_alert(threshold: int) -> Callable[[Any], bool]:
    def match(e: Any) -> bool:
        return bool(
            e.get("type") == "quota_alert"
            and e["data"]["subject"] == "pool:team/demo"
            and e["data"]["threshold"] == threshold
        )

    return match


async def test_the_limit_alerts_once_each_and_pins_the_chosen_layer(
    make_stack: StackFactory,
) -> None:
    stack = await make_stack(tune=limited_pool("switch_layer:failover"))
    await over_the_limit(stack)
    action = await stack.wait_json("events", lambda e: e.get("type") == "pool_limit_action", STEP_S)
    assert action["data"]["outcome"] == "done", action
    assert action["data"]["action"] == "switch_layer:failover"
    await stack.wait_json("state", lambda s: s.get("active_layer") == "failover", STEP_S)
    # The primary's modem still runs (and counts) the pool's profile: more traffic, more samples.
    assert stack.watcher is not None
    before = json.loads(stack.watcher.latest(f"{stack.topic}/usage/{PRIMARY}") or b"{}")
    mark = stack.mark()
    await stack.control("traffic", modem="m0", rx=3_000, tx=0)
    await stack.wait_json(
        "usage/pool/team",
        lambda p: p["local_bytes"] >= before["total_bytes"] + 3_000,
        STEP_S,
        mark,
    )
    limit_alerts = [
        a["threshold"] for a in events(stack, "quota_alert") if a["subject"] == "pool:team/demo"
    ]
    assert limit_alerts == [50, 75, 90, 100]
    assert len(events(stack, "pool_limit_action")) == 1
    # The watch's limit (1 byte) is the watch's own business: no alert here.
    assert not [a for a in events(stack, "quota_alert") if a["subject"] == "pool:team/watch"]


async def test_disable_profile_leaves_the_pool_profile_and_says_what_still_works(
    make_stack: StackFactory,
) -> None:
    stack = await make_stack(tune=limited_pool("disable_profile"))
    await over_the_limit(stack)
    action = await stack.wait_json("events", lambda e: e.get("type") == "pool_limit_action", STEP_S)
    data = action["data"]
    assert (data["outcome"], data["disabled"]) == ("done", [PRIMARY]), data
    assert data["working_layers"] == ["failover"]
    assert "no_working_layer" not in data
    profiles = await stack.wait_json(
        "profiles/m0",
        lambda p: all(x["state"] != "enabled" for x in p["profiles"] if x["iccid"] == PRIMARY),
        STEP_S,
    )
    assert PRIMARY in [x["iccid"] for x in profiles["profiles"]]
    # The policy sees the primary's profile gone and the failover carries the traffic.
    await stack.wait_json(
        "state",
        lambda s: s.get("active_layer") == "failover" and s.get("connectivity") is True,
        STEP_S,
    )
