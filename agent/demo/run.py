"""`esim-agent demo`: the whole agent on embedded defaults, with a scripted failover story.

Emulator (two modems, three profiles) + MQTT broker + the daemon as a real process. The
script breaks the primary's data link, then the roaming operator, then heals both, and
shows what the daemon does, live, from its MQTT events; it ends with a timeline.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from agent.demo.stack import DEMO_ICCIDS, DemoStack, mosquitto_available
from agent.errors import AgentError
from hw_fixtures.testing import EmulatorStartError

STEP_TIMEOUT_S = 90.0
PRIMARY, ROAM, EMERGENCY = DEMO_ICCIDS


def _say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


class _Shown:
    """How far the live display has got in the watcher's message log."""

    def __init__(self) -> None:
        self.index = 0
        self.advanced = asyncio.Event()


async def _caught_up(stack: DemoStack, shown: _Shown) -> None:
    """Let the live display print what has arrived before the next step's header."""
    assert stack.watcher is not None
    while shown.index < len(stack.watcher.messages):
        shown.advanced.clear()
        await shown.advanced.wait()


async def _live(stack: DemoStack, started: float, shown: _Shown) -> None:
    """Print transitions and layer health as the daemon publishes them."""
    assert stack.watcher is not None
    health: dict[str, str] = {}
    while True:
        topic, payload, _, _ = await stack.watcher.message_at(shown.index)
        shown.index += 1
        shown.advanced.set()
        key = topic.removeprefix(stack.topic + "/")
        try:
            value = json.loads(payload)
        except ValueError:
            continue
        t = f"{time.monotonic() - started:6.1f}s"
        if key == "events" and value.get("type") in ("transition_started", "transition"):
            d = value["data"]
            verb = "deciding" if value["type"] == "transition_started" else d["outcome"]
            _say(
                f"  {t}  [{d['kind']}] {d['from_layer'] or '-'} -> {d['to_layer']}: {verb}"
                f"  ({d['reason']})"
            )
        elif key == "events" and value.get("type") == "emergency_disabled":
            d = value["data"]
            _say(f"  {t}  emergency profile put back to sleep: {d['outcome']}")
        elif key.startswith("health/"):
            layer = key.removeprefix("health/")
            state = f"{value.get('status')} ({value.get('detail')})"
            if health.get(layer) != state:
                health[layer] = state
                _say(f"  {t}  health {layer}: {state}")


def _timeline(transitions: list[dict[str, Any]]) -> None:
    _say("\nTimeline (ms from detection):")
    # Transition ids carry the device and boot stamp (`demo-mxbhre8n-3`): size the column to them.
    w = max([len("id"), *(len(str(tr["id"])) for tr in transitions)])
    header = f"  {'id':<{w}} {'kind':<10} {'from':<10} {'to':<10} {'outcome':<9}"
    header += f" {'decide':>8} {'switch':>8} {'verify':>8} {'total':>8}"
    _say(header)
    for tr in transitions:
        ms = tr["timings_ms"]

        def f(v: float | None) -> str:
            return "-" if v is None else f"{v:.0f}"

        _say(
            f"  {tr['id']:<{w}} {tr['kind']:<10} {tr['from_layer'] or '-':<10}"
            f" {tr['to_layer'] or '-':<10}"
            f" {tr['outcome']:<9} {f(ms['detect_to_decide']):>8} {f(ms['decide_to_switch']):>8}"
            f" {f(ms['switch_to_verify']):>8} {f(ms['total']):>8}"
        )


class DemoError(AgentError):
    """The demo could not run (a bad --workdir or --json, or a part that did not start)."""


async def run_demo(workdir: Path, json_out: Path | None = None, broker: str = "auto") -> int:
    """Run the scripted scenario; 0 when every step happened as expected."""
    started = time.monotonic()
    stack = DemoStack(workdir, broker=broker)
    _say("esim-agent demo: emulator (2 modems, 3 profiles) + MQTT broker + daemon")
    if broker == "auto" and not mosquitto_available():
        _say("  (Mosquitto is not installed or not executable: using the embedded demo broker)")
    try:
        await stack.start()  # stops whatever it started when a part fails
    except (AgentError, OSError, EmulatorStartError) as exc:
        raise DemoError(f"the demo could not start: {exc}") from None
    assert stack.address is not None
    _say(
        f"  broker: {stack.broker_name} on 127.0.0.1:{stack.address.port}; "
        f"topics under {stack.topic}/"
    )
    _say(f"  config: {stack.config_path}; daemon log: {stack.daemon_log}")
    _say("  layers: primary = m0/Home, failover = m1/Roam, emergency = m1/Emergency (dormant)\n")
    shown = _Shown()
    live = asyncio.create_task(_live(stack, started, shown))
    ok = True
    try:
        await stack.wait_json("state", lambda s: s.get("active_layer") == "primary", STEP_TIMEOUT_S)
        await _caught_up(stack, shown)
        _say("\n1. The home network's data path breaks (m0 link down)")
        mark = stack.mark()
        await stack.control("link", modem="m0", state="down")
        await stack.wait_transition(
            lambda d: d["to_layer"] == "failover" and d["outcome"] == "switched",
            STEP_TIMEOUT_S,
            mark,
        )
        await _caught_up(stack, shown)
        _say("\n2. The roaming operator fails too (m1's Roam profile loses service)")
        mark = stack.mark()
        await stack.control("profile", modem="m1", op="broken", iccid=ROAM)
        await stack.wait_transition(
            lambda d: d["to_layer"] == "emergency" and d["outcome"] == "switched",
            STEP_TIMEOUT_S,
            mark,
        )
        await _caught_up(stack, shown)
        _say("\n3. Both recover: failback to primary, emergency profile disabled again")
        mark = stack.mark()
        await stack.control("link", modem="m0", state="up")
        await stack.control("profile", modem="m1", op="broken", iccid=ROAM, broken=False)
        await stack.wait_transition(
            lambda d: d["to_layer"] == "primary" and d["outcome"] == "switched",
            STEP_TIMEOUT_S,
            mark,
        )
        await stack.wait_json(
            "events", lambda e: e.get("type") == "emergency_disabled", STEP_TIMEOUT_S, mark
        )
        await stack.wait_json(
            "profiles/m1",
            lambda p: any(x["iccid"] == ROAM and x["state"] == "enabled" for x in p["profiles"]),
            STEP_TIMEOUT_S,
            mark,
        )
        await _caught_up(stack, shown)
        _say(f"  emergency profile {EMERGENCY} is disabled; m1 runs Roam again")
    except TimeoutError:
        ok = False
        _say(f"\nA step did not happen in time; see {stack.daemon_log}")
    finally:
        live.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await live
        transitions = stack.transitions()
        _timeline(transitions)
        await stack.close()
    if json_out is not None:
        text = json.dumps({"ok": ok, "transitions": transitions}, indent=2)
        await asyncio.to_thread(json_out.write_text, text)
        _say(f"\nTimeline written to {json_out}")
    _say("\ndemo " + ("finished" if ok else "FAILED"))
    return 0 if ok else 1


def check_paths(json_out: str | None, workdir: str | None) -> None:
    """Refuse a --json file or --workdir the demo could not write, before anything starts."""
    if json_out is not None:
        parent = Path(json_out).resolve().parent
        if not parent.is_dir():
            raise DemoError(f"--json {json_out}: folder {parent} does not exist")
        if not os.access(parent, os.W_OK):
            raise DemoError(f"--json {json_out}: folder {parent} is not writable")
        if Path(json_out).is_dir():
            raise DemoError(f"--json {json_out}: is a folder, not a file")
    if workdir is not None:
        path = Path(workdir)
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DemoError(f"--workdir {workdir}: {exc.strerror or exc}") from None
        # os.access is not enough (a read-only mount answers yes to root): try a file.
        try:
            with tempfile.TemporaryFile(dir=path):
                pass
        except OSError as exc:
            raise DemoError(f"--workdir {workdir}: not writable ({exc.strerror or exc})") from None


def main(json_out: str | None = None, workdir: str | None = None, broker: str = "auto") -> int:
    """Entry point for the CLI; raises DemoError (one line for the user) when it cannot run."""
    check_paths(json_out, workdir)
    out = Path(json_out) if json_out else None
    if workdir is not None:
        return asyncio.run(run_demo(Path(workdir), out, broker))
    with tempfile.TemporaryDirectory(prefix="esim-agent-demo-") as tmp:
        return asyncio.run(run_demo(Path(tmp), out, broker))
