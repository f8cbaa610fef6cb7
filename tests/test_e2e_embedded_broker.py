"""End to end on the embedded demo broker (hw_fixtures/broker.py): what `make demo` runs when
Mosquitto is not installed. The real daemon process, the emulator, and a watcher on that broker."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.demo.stack import DemoStack

pytestmark = pytest.mark.e2e

STEP_S = 60.0


async def test_daemon_fails_over_and_back_through_the_embedded_broker(tmp_path: Path) -> None:
    stack = DemoStack(tmp_path / "stack", broker="embedded")
    try:
        await stack.start()
        assert stack.broker_name == "embedded"
        await stack.wait_json("state", lambda s: s.get("active_layer") == "primary", STEP_S)
        # The daemon's own session is up: its birth message and a modem's retained state.
        await stack.wait_json("modems/m0", lambda m: m.get("online") is True, STEP_S)

        mark = stack.mark()
        await stack.control("link", modem="m0", state="down")
        failover = await stack.wait_transition(lambda d: d["to_layer"] == "failover", STEP_S, mark)
        assert (failover["kind"], failover["outcome"]) == ("failover", "switched")

        mark = stack.mark()
        await stack.control("link", modem="m0", state="up")
        failback = await stack.wait_transition(lambda d: d["to_layer"] == "primary", STEP_S, mark)
        assert (failback["kind"], failback["outcome"]) == ("failback", "switched")
    finally:
        await stack.close()
