"""End to end, the daemon's lifecycle: reloads that keep their state, reloads refused, ids that
never repeat, absent and vanishing modems, the first decision, commands that do not fight the
policy. Real daemon process, real Mosquitto, the emulator (the stack of test_e2e_daemon)."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path
from typing import Any

import pytest
from test_e2e_daemon import (
    EMERGENCY,
    PRIMARY,
    ROAM,
    STEP_S,
    Caller,
    StackFactory,
    make_stack,
    run_cli,
    until,
)

from agent.daemon.control import control_call
from agent.demo.stack import DEMO_SCENARIO, DemoStack, mosquitto_available

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not mosquitto_available(), reason="needs mosquitto (apt install mosquitto)"),
]

__all__ = ["make_stack"]  # the fixture, shared with test_e2e_daemon


async def log_count(stack: DemoStack, event: str) -> int:
    text = await asyncio.to_thread(stack.daemon_log.read_text, errors="replace")
    return text.count(f'"event": "{event}"')


async def sighup(stack: DemoStack, expect: str) -> None:
    """Send SIGHUP and wait until the daemon logged `expect` once more."""
    assert stack.daemon is not None
    before = await log_count(stack, expect)
    stack.daemon.send_signal(signal.SIGHUP)

    async def logged() -> bool:
        return await log_count(stack, expect) > before

    await until(logged)
    assert stack.daemon.poll() is None


async def settled(stack: DemoStack) -> None:
    """The first transition is in and the primary reported up."""
    await stack.wait_transition(lambda d: d["kind"] == "initial", STEP_S)
    await stack.wait_json("health/primary", lambda h: h["status"] == "up", STEP_S)


async def status(stack: DemoStack) -> dict[str, Any]:
    st = await control_call(stack.socket, "status", {}, timeout=10)
    assert isinstance(st, dict)
    return st


def health_messages(stack: DemoStack, layer: str, since: int) -> list[dict[str, Any]]:
    assert stack.watcher is not None
    return [
        json.loads(p)
        for t, p, _, _ in stack.watcher.messages[since:]
        if t == f"{stack.topic}/health/{layer}"
    ]


async def test_sighup_with_an_unchanged_file_changes_nothing(make_stack: StackFactory) -> None:
    stack = await make_stack()
    await settled(stack)
    onlines = await log_count(stack, "modem_online")
    transitions = stack.transitions()
    mark = stack.mark()
    for _ in range(5):
        await sighup(stack, "config_reloaded")
    st = await status(stack)
    assert st["active_layer"] == "primary"
    assert {x["name"]: x["health"] for x in st["layers"]}["primary"] == "up"
    # No new "initial" transition, no health reset, no modem reconnected.
    assert stack.transitions() == transitions
    assert all(h["status"] == "up" for h in health_messages(stack, "primary", mark))
    assert await log_count(stack, "modem_online") == onlines


async def test_sighup_restarts_only_what_changed(make_stack: StackFactory) -> None:
    stack = await make_stack()
    await settled(stack)
    onlines = await log_count(stack, "modem_online")
    transitions = stack.transitions()
    text = await asyncio.to_thread(stack.config_path.read_text)
    # New policy timers and a new probe interval on the primary layer only.
    changed = text.replace("failback_stable = 5.0", "failback_stable = 7.0").replace(
        "interval = 1.0", "interval = 1.5", 1
    )
    assert changed != text
    await asyncio.to_thread(stack.config_path.write_text, changed)
    mark = stack.mark()
    await sighup(stack, "config_reloaded")
    log = await asyncio.to_thread(stack.daemon_log.read_text)
    reloading = [json.loads(x) for x in log.splitlines() if '"config_reloading"' in x][-1]
    assert reloading["policy"] is True
    assert reloading["modems"] == []
    assert reloading["layers"] == ["primary"]
    st = await status(stack)
    assert st["active_layer"] == "primary"
    assert st["policy"]["layers"][0]["status"] == "up"
    assert stack.transitions() == transitions
    assert await log_count(stack, "modem_online") == onlines
    # The restarted monitor starts unknown, but the policy keeps its layer: no failover.
    await stack.wait_json("health/primary", lambda h: h["status"] == "up", STEP_S, mark)
    assert (await status(stack))["active_layer"] == "primary"


@pytest.mark.parametrize(
    "spoil",
    ["latin1", "bom", "binary", "huge_quota", "quota_over_64_bits", "state_dir", "socket"],
)
async def test_sighup_refuses_what_validation_used_to_miss(
    make_stack: StackFactory, tmp_path: Path, spoil: str
) -> None:
    stack = await make_stack()
    good = await asyncio.to_thread(stack.config_path.read_bytes)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    bad = {
        "latin1": good.replace(b'device_id = "demo"', b'device_id = "demo"\n# caf\xe9'),
        "bom": b"\xef\xbb\xbf" + good,
        "binary": b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)),
        "huge_quota": good.replace(
            b"[usage.quotas]\n", f'[usage.quotas]\n"{PRIMARY}" = "{"9" * 400} GB"\n'.encode()
        ),
        "quota_over_64_bits": good.replace(
            b"[usage.quotas]\n", f'[usage.quotas]\n"{PRIMARY}" = {2**64}\n'.encode()
        ),
        "state_dir": good.replace(
            str(stack.workdir / "state").encode(), str(blocker / "state").encode()
        ),
        "socket": good.replace(
            b"[control]\n", f'[control]\nsocket = "{blocker / "ctl.sock"}"\n'.encode()
        ),
    }[spoil]
    assert bad != good
    await asyncio.to_thread(stack.config_path.write_bytes, bad)
    await sighup(stack, "config_reload_refused")
    log = await asyncio.to_thread(stack.daemon_log.read_text, errors="replace")
    assert "Traceback" not in log
    st = await status(stack)
    assert st["active_layer"] == "primary"
    assert stack.socket == str(stack.workdir / "state" / "control.sock")
    # The old config still runs: the failover works as before.
    mark = stack.mark()
    await stack.control("link", modem="m0", state="down")
    await stack.wait_transition(lambda d: d["to_layer"] == "failover", STEP_S, mark)


async def test_transition_ids_never_repeat_across_reloads_and_restarts(
    make_stack: StackFactory,
) -> None:
    stack = await make_stack()
    await settled(stack)
    drill = await asyncio.to_thread(run_cli, "drill", "--socket", stack.socket, "--json")
    assert drill.returncode == 0, drill.stderr
    text = await asyncio.to_thread(stack.config_path.read_text)
    await asyncio.to_thread(
        stack.config_path.write_text, text.replace("hold_down = 2.0", "hold_down = 3.0")
    )
    await sighup(stack, "config_reloaded")
    back = await asyncio.to_thread(run_cli, "switch", "primary", "--socket", stack.socket)
    assert back.returncode == 0, back.stderr
    mark = stack.mark()
    await stack.stop_daemon(signal.SIGTERM)
    stack.start_daemon()
    await stack.wait_transition(lambda d: d["kind"] == "initial", STEP_S, mark)
    ids = [t["id"] for t in stack.transitions()]
    assert len(ids) == 4
    assert len(set(ids)) == len(ids), ids


async def test_an_absent_modem_never_blocks_the_others(
    make_stack: StackFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket

    notify = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify))
    sock.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify))
    absent = f"/dev/esa-absent-{tmp_path.name[-8:]}"

    def with_absent_spare(cfg: dict[str, Any]) -> None:
        cfg["modems"].append({"id": "gone", "port": absent, "poll_interval": 2.0})
        # A failover layer that sleeps with its radio off, on a modem that is not there.
        cfg["layers"].insert(
            1,
            {
                "name": "spare",
                "modem": "gone",
                "profile": "8900000000000000099",
                "role": "failover",
                "radio_down_when_inactive": True,
            },
        )

    try:
        stack = await make_stack(tune=with_absent_spare)
        loop = asyncio.get_running_loop()
        got: list[str] = []
        async with asyncio.timeout(STEP_S):
            while not any("READY=1" in x for x in got):
                got.append((await loop.sock_recv(sock, 4096)).decode())
        first = await stack.wait_transition(lambda d: d["kind"] == "initial", STEP_S)
        assert first["to_layer"] == "primary"

        # The primary fails: the spare is tried and refused at once as absent (not after a
        # grace period for an offline modem), and the failover layer takes over.
        mark = stack.mark()
        await stack.control("link", modem="m0", state="down")
        moved = await stack.wait_transition(
            lambda d: d["to_layer"] == "failover" and d["outcome"] == "switched", STEP_S, mark
        )
        assert moved["kind"] == "failover"
        tried = [t for t in stack.transitions() if t["to_layer"] == "spare"]
        assert all(t["outcome"] == "failed" for t in tried)
        assert all("absent" in t["reason"] for t in tried)

        # Shutdown with the modem absent: clean, no traceback.
        assert await stack.stop_daemon(signal.SIGTERM) == 0
        log = await asyncio.to_thread(stack.daemon_log.read_text)
        assert "Traceback" not in log
        assert "KeyError" not in log
        assert "daemon_stopped" in log
    finally:
        sock.close()


@pytest.mark.parametrize("vendor", ["sierra", "quectel", "fibocom", "simcom", "dell", "generic"])
async def test_unplug_in_the_middle_of_a_switch_ends_with_a_typed_outcome(
    make_stack: StackFactory, tmp_path: Path, vendor: str
) -> None:
    # The dongle (m1, which switches to the emergency profile) as each personality.
    scenario = tmp_path / "scenario.toml"
    text = DEMO_SCENARIO.read_text()
    assert 'vendor = "sierra"' in text
    scenario.write_text(text.replace('vendor = "sierra"', f'vendor = "{vendor}"'))
    stack = await make_stack(scenario=scenario)
    await stack.control("link", modem="m0", state="down")
    await stack.wait_transition(lambda d: d["to_layer"] == "failover", STEP_S)
    # A slow re-attach keeps the dongle inside its eUICC switch (to the emergency profile)
    # long enough to unplug it there.
    await stack.control("set_delays", modem="m1", reattach=3.0)
    mark = stack.mark()
    await stack.control("profile", modem="m1", op="broken", iccid=ROAM)
    await stack.wait_json(
        "events",
        lambda e: e.get("type") == "transition_started" and e["data"]["to_layer"] == "emergency",
        STEP_S,
        mark,
    )
    await stack.control("unplug", modem="m1")
    done = await stack.wait_transition(lambda d: d["to_layer"] == "emergency", STEP_S, mark)
    assert done["outcome"] == "failed"
    assert done["reason"]
    log = await asyncio.to_thread(stack.daemon_log.read_text)
    assert "Traceback" not in log
    await stack.control("replug", modem="m1")
    assert stack.daemon is not None
    assert stack.daemon.poll() is None
    assert await stack.stop_daemon(signal.SIGTERM) == 0
    log = await asyncio.to_thread(stack.daemon_log.read_text)
    assert "Traceback" not in log


async def test_profile_commands_do_not_fight_the_policy(make_stack: StackFactory) -> None:
    stack = await make_stack()
    caller = Caller(stack)
    token = stack.command_token
    # The dormant emergency profile belongs to the emergency layer: MQTT cannot touch it.
    for command in ("profile_enable", "profile_disable"):
        refused = await caller.request(command, {"token": token, "modem": "m1", "iccid": EMERGENCY})
        assert refused["ok"] is False
        assert refused["error"]["code"] == "not_allowed"
        assert "switch_layer" in refused["error"]["message"]
    # Nor can the socket, nor the CLI without --force.
    assert stack.emulator is not None
    port = stack.emulator.modem("m1")["link"]
    for action in (["enable", EMERGENCY], ["disable", EMERGENCY], ["disable", ROAM]):
        out = await asyncio.to_thread(
            run_cli, "profile", *action, "--port", port, "--socket", stack.socket
        )
        assert out.returncode == 1, out.stdout
        assert "switch_layer" in out.stderr
        assert len(out.stderr.strip().splitlines()) == 1
    deleted = await asyncio.to_thread(
        run_cli, "profile", "delete", EMERGENCY, "--yes", "--port", port, "--socket", stack.socket
    )
    assert deleted.returncode == 1
    assert "switch_layer" in deleted.stderr
    profiles = await stack.control("profile", modem="m1")
    assert {p["iccid"] for p in profiles["profiles"]} >= {ROAM, EMERGENCY}
    # --force on the CLI is the operator's override.
    forced = await asyncio.to_thread(
        run_cli,
        "profile",
        "enable",
        EMERGENCY,
        "--force",
        "--port",
        port,
        "--socket",
        stack.socket,
    )
    assert forced.returncode == 0, forced.stderr
    log = await asyncio.to_thread(stack.daemon_log.read_text)
    assert "profile_command_forced" in log


async def test_switch_layer_over_mqtt_pins_and_unpins(make_stack: StackFactory) -> None:
    stack = await make_stack()
    caller = Caller(stack)
    token = stack.command_token
    pinned = await caller.request("switch_layer", {"token": token, "layer": "failover"})
    assert pinned["ok"] is True
    assert pinned["result"]["pinned"] == "failover"
    assert pinned["result"]["transition"]["to_layer"] == "failover"
    mark = stack.mark()
    unpinned = await caller.request("switch_layer", {"token": token, "layer": None})
    assert unpinned["ok"] is True
    assert unpinned["result"]["pinned"] is None
    # Automatic again: the healthy primary wins back after failback_stable.
    back = await stack.wait_transition(lambda d: d["to_layer"] == "primary", STEP_S, mark)
    assert (back["kind"], back["outcome"]) == ("failback", "switched")
    # The CLI says so too.
    pin = await asyncio.to_thread(run_cli, "switch", "primary", "--socket", stack.socket)
    assert pin.returncode == 0, pin.stderr
    auto = await asyncio.to_thread(run_cli, "switch", "--auto", "--socket", stack.socket)
    assert auto.returncode == 0, auto.stderr
    assert "unpinned" in auto.stdout
    assert (await status(stack))["policy"]["pinned"] is None


async def test_the_first_decision_waits_for_the_higher_layers_first_round(
    make_stack: StackFactory,
) -> None:
    # The primary's only probe answers slowly; the failover's answer at once.
    async def slow_204(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(1.5)
        writer.write(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(slow_204, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]

    def slow_primary(cfg: dict[str, Any]) -> None:
        cfg["layers"][0]["probes"] = [
            {
                "kind": "http",
                "target": f"http://127.0.0.1:{port}/generate_204",
                "interval": 4.0,
                "timeout": 3.0,
            }
        ]
        cfg["timers"]["failback_stable"] = 3.0

    try:
        stack = await make_stack(tune=slow_primary)
        first = await stack.wait_transition(lambda d: d["kind"] == "initial", STEP_S)
        assert first["to_layer"] == "primary"
    finally:
        server.close()
