"""The daemon's parts outside a running daemon: reload planning, the policy carried across a
reload, the watchdog's progress test, ordered hooks, the command table, run's exit statuses."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest
from msgspec.structs import replace

from agent.config import Config, parse_config
from agent.daemon.commands import CommandTable, DaemonCommands
from agent.daemon.control import UnknownCommand
from agent.daemon.hooks import HookQueue
from agent.daemon.liveness import POLICY_STALL_S, stalled
from agent.daemon.preflight import port_problem, state_dir_problem
from agent.daemon.reload import carry_policy, plan
from agent.mqtt.commands import CommandRejected
from agent.policy.engine import (
    Health,
    LayerHealth,
    Phase,
    PolicyConfig,
    SwitchDone,
    Tick,
    initial_state,
    transition,
)

P1, P2, P3 = "8944500102030405067", "8931440000012345678", "8988247000001234567"


def config(tmp_path: Path, tune: Any = None) -> Config:
    data: dict[str, Any] = {
        "device_id": "van",
        "state_dir": str(tmp_path / "state"),
        "control": {"socket": str(tmp_path / "state" / "control.sock")},
        "modems": [{"id": "m0", "port": "/dev/esa-m0"}, {"id": "m1", "port": "/dev/esa-m1"}],
        "layers": [
            {
                "name": "primary",
                "modem": "m0",
                "profile": P1,
                "role": "primary",
                "probes": [{"kind": "tcp", "target": "127.0.0.1:9"}],
            },
            {"name": "failover", "modem": "m1", "profile": P2},
            {"name": "emergency", "modem": "m1", "profile": P3, "role": "emergency"},
        ],
    }
    if tune is not None:
        tune(data)
    return parse_config(data)


# ---- reload by difference ------------------------------------------------------------------


def test_an_unchanged_file_plans_nothing(tmp_path: Path) -> None:
    diff = plan(config(tmp_path), config(tmp_path))
    assert diff.nothing


def test_a_changed_modem_restarts_it_and_the_layers_on_it_only(tmp_path: Path) -> None:
    def slower(d: dict[str, Any]) -> None:
        d["modems"][1]["poll_interval"] = 60.0

    diff = plan(config(tmp_path), config(tmp_path, tune=slower))
    assert diff.modems_new == {"m1"}
    assert diff.modems_removed == {"m1"}
    assert diff.layers_new == {"failover", "emergency"}
    assert not diff.policy_changed
    assert not diff.mqtt_changed
    assert not diff.control_changed


def test_a_changed_probe_restarts_that_monitor_only(tmp_path: Path) -> None:
    def probe(d: dict[str, Any]) -> None:
        d["layers"][0]["probes"][0]["interval"] = 7.5

    diff = plan(config(tmp_path), config(tmp_path, tune=probe))
    assert (diff.modems_new, diff.layers_new) == (frozenset(), {"primary"})
    assert not diff.policy_changed


def _healthy_on_primary(cfg: Config) -> Any:
    state = initial_state(PolicyConfig.from_config(cfg), 0.0, id_prefix="van-x")
    state, _ = transition(state, LayerHealth(layer="primary", health=Health.UP, now=1.0))
    state, _ = transition(state, LayerHealth(layer="failover", health=Health.UP, now=1.0))
    state, _ = transition(state, SwitchDone(layer="primary", ok=True, now=2.0))
    assert (state.active, state.phase, state.seq) == ("primary", Phase.ACTIVE, 1)
    return state


def test_new_timers_keep_the_active_layer_health_and_ids(tmp_path: Path) -> None:
    old_cfg = config(tmp_path)
    state = _healthy_on_primary(old_cfg)
    state = replace(
        state,
        layers=tuple(
            replace(ls, held_until=50.0) if ls.name == "failover" else ls for ls in state.layers
        ),
    )

    def timers(d: dict[str, Any]) -> None:
        d["timers"] = {"failback_stable": 60.0}

    new_cfg = config(tmp_path, tune=timers)
    assert plan(old_cfg, new_cfg).policy_changed
    carried = carry_policy(state, PolicyConfig.from_config(new_cfg))
    assert (carried.active, carried.phase, carried.seq) == ("primary", Phase.ACTIVE, 1)
    assert carried.layer("primary").status is Health.UP
    assert carried.layer("failover").held_until == 50.0  # the hold-down survives
    assert carried.config.failback_stable == 60.0
    # And the next tick decides nothing new: no "initial" transition after a reload.
    _, actions = transition(carried, Tick(now=3.0))
    assert actions == []


def test_an_unchanged_policy_is_the_same_state(tmp_path: Path) -> None:
    state = _healthy_on_primary(config(tmp_path))
    assert carry_policy(state, PolicyConfig.from_config(config(tmp_path))) is state


def test_a_changed_active_layer_is_chosen_again_with_ids_going_on(tmp_path: Path) -> None:
    state = _healthy_on_primary(config(tmp_path))

    def other_profile(d: dict[str, Any]) -> None:
        d["layers"][0]["profile"] = "8944500102030405999"

    carried = carry_policy(state, PolicyConfig.from_config(config(tmp_path, tune=other_profile)))
    assert (carried.active, carried.phase) == (None, Phase.IDLE)
    assert carried.layer("failover").status is Health.UP
    carried, _ = transition(
        carried, LayerHealth(layer="primary", health=Health.UP, reason="ok", now=3.0)
    )
    assert carried.pending is not None
    assert carried.pending.id == "van-x-2"  # not "-1" again


# ---- the watchdog --------------------------------------------------------------------------


def test_watchdog_withheld_when_the_policy_or_a_modem_stops() -> None:
    assert stalled(100.0, 99.0, [("m0", 95.0, 60.0)]) is None
    assert stalled(100.0, None, []) is None
    problem = stalled(100.0, 100.0 - POLICY_STALL_S - 1, [])
    assert problem is not None
    assert "policy" in problem
    problem = stalled(100.0, 99.0, [("m0", 95.0, 60.0), ("m1", 10.0, 60.0)])
    assert problem is not None
    assert "m1" in problem


# ---- hooks in order ------------------------------------------------------------------------


async def test_hooks_of_consecutive_transitions_never_overlap(tmp_path: Path) -> None:
    log = tmp_path / "hooks.log"
    hook = tmp_path / "hook"
    # Each run notes its start, waits until the next transition was queued, notes its end.
    hook.write_text(
        "#!/bin/sh\n"
        f'read line; id=$(echo "$line" | sed \'s/.*"id":"\\([^"]*\\)".*/\\1/\')\n'
        f'echo "start $id" >> {log}\n'
        f"while [ ! -e {tmp_path}/go ]; do sleep 0.01; done\n"
        f'echo "end $id" >> {log}\n'
    )
    hook.chmod(0o755)
    queue = HookQueue()
    runner = asyncio.create_task(queue.run())
    try:
        for i in range(3):
            queue.submit([str(hook)], {"id": f"t{i}"}, timeout=30)
        (tmp_path / "go").touch()
        async with asyncio.timeout(30):
            while queue.done < 3:  # noqa: ASYNC110 - the hook runs in another process
                await asyncio.sleep(0.02)
    finally:
        runner.cancel()
    lines = log.read_text().split("\n")
    assert [x for x in lines if x] == [
        "start t0",
        "end t0",
        "start t1",
        "end t1",
        "start t2",
        "end t2",
    ]


# ---- one command table ---------------------------------------------------------------------


class _Stub:
    """Enough of a daemon for the table's argument handling (no modems)."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.sessions: dict[str, Any] = {}
        self.monitors: dict[str, Any] = {}


async def test_the_table_types_arguments_for_every_surface(tmp_path: Path) -> None:
    table = DaemonCommands(_Stub(config(tmp_path))).table()  # type: ignore[arg-type]
    assert set(table.names) >= {
        "status",
        "switch_layer",
        "drill",
        "profile_enable",
        "profile_disable",
        "profile_nickname",
        "profile_delete",
        "profile_list",
        "euicc_info",
        "notification_list",
        "notification_remove",
        "modem_info",
    }
    # A missing or mistyped field is a typed rejection, not a KeyError.
    with pytest.raises(CommandRejected) as missing:
        await table.call("profile_enable", {"modem": "m0"})
    assert missing.value.code == "invalid_payload"
    with pytest.raises(CommandRejected) as huge:
        await table.call("notification_remove", {"seq_number": 10**400})
    assert huge.value.code == "invalid_payload"
    with pytest.raises(CommandRejected) as stray:
        await table.call("drill", {"rm": "-rf"})
    assert stray.value.code == "invalid_payload"
    with pytest.raises(CommandRejected) as unknown_layer:
        await table.call("switch_layer", {"layer": "nowhere"})
    assert unknown_layer.value.code == "unknown_layer"
    with pytest.raises(UnknownCommand):
        await table.control("reboot", {})
    with pytest.raises(CommandRejected) as unknown:
        await table.call("reboot", {})
    assert unknown.value.code == "unknown_command"


def test_a_table_is_built_from_typed_commands_only() -> None:
    table = CommandTable([])
    assert table.names == []
    with pytest.raises(CommandRejected):
        table.decode("status", {})


# ---- machine checks and exit statuses ------------------------------------------------------


def test_state_dir_problems_are_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert state_dir_problem(str(tmp_path / "new"), create=False) is None
    problem = state_dir_problem(str(blocker / "state"), create=True)
    assert problem is not None
    assert "\n" not in problem
    assert state_dir_problem(str(blocker), create=False) is not None
    assert port_problem(str(tmp_path / "absent")) is None  # absent modems are no problem
    assert port_problem(str(blocker)) == f"modem port {blocker} is not a serial device"


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "NOTIFY_SOCKET": ""},
    )


def write_config(path: Path, cfg: Config) -> None:
    from agent.config import config_to_toml

    path.write_text(config_to_toml(cfg))


@pytest.mark.parametrize(
    "raw",
    [b"\xef\xbb\xbfdevice_id = 'van'\n", b"device_id = 'caf\xe9'\n", b"\x7fELF\x02\x01\x00\x00"],
    ids=["bom", "latin1", "binary"],
)
def test_a_config_that_is_not_utf8_exits_78_with_one_line(tmp_path: Path, raw: bytes) -> None:
    path = tmp_path / "esim-agent.toml"
    path.write_bytes(raw)
    for args in (("run", "--config", str(path)), ("run", "--check", "--config", str(path))):
        out = run_cli(*args)
        assert out.returncode == 78
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr
        assert "Traceback" not in out.stderr


def test_a_huge_quota_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "esim-agent.toml"
    base = f'device_id = "van"\nstate_dir = "{tmp_path}"\n[usage.quotas]\n"{P1}" = {{quota}}\n'
    for quota in ('"' + "9" * 400 + ' GB"', str(2**63), "9" * 5000):
        path.write_text(base.replace("{quota}", quota))
        out = run_cli("run", "--check", "--config", str(path))
        assert out.returncode == 78, (quota[:20], out.stderr)
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_run_refuses_an_unusable_state_dir_with_73(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    path = tmp_path / "esim-agent.toml"
    write_config(
        path,
        parse_config(
            {
                "device_id": "van",
                "state_dir": str(blocker / "state"),
                "control": {"socket": str(tmp_path / "control.sock")},
            }
        ),
    )
    check = run_cli("run", "--check", "--config", str(path))
    assert check.returncode == 73
    assert len(check.stderr.strip().splitlines()) == 1
    run = run_cli("run", "--config", str(path))
    assert run.returncode == 73
    assert "Traceback" not in run.stderr
    assert [line for line in run.stderr.splitlines() if "error" in line] != []


def test_run_refuses_a_port_that_is_not_a_device_with_77(tmp_path: Path) -> None:
    not_a_tty = tmp_path / "ttyUSB9"
    not_a_tty.write_text("")
    cfg = config(tmp_path)
    cfg.modems[0].port = str(not_a_tty)
    path = tmp_path / "esim-agent.toml"
    write_config(path, cfg)
    check = run_cli("run", "--check", "--config", str(path))
    assert check.returncode == 77
    run = run_cli("run", "--config", str(path))
    assert run.returncode == 77
    assert "Traceback" not in run.stderr


async def test_a_second_daemon_on_the_same_socket_exits_75(tmp_path: Path) -> None:
    cfg = parse_config(
        {
            "device_id": "van",
            "state_dir": str(tmp_path / "state"),
            "control": {"socket": str(tmp_path / "run" / "control.sock")},
        }
    )
    path = tmp_path / "esim-agent.toml"
    write_config(path, cfg)
    first = subprocess.Popen(  # noqa: ASYNC220 - started once, waited for in a thread
        [sys.executable, "-m", "agent", "run", "--config", str(path)],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "NOTIFY_SOCKET": ""},
    )
    try:
        from agent.daemon.control import control_call

        async with asyncio.timeout(30):
            while True:
                try:
                    await control_call(cfg.control_socket, "status", timeout=2)
                    break
                except Exception:
                    await asyncio.sleep(0.1)
        second = await asyncio.to_thread(run_cli, "run", "--config", str(path))
        assert second.returncode == 75
        assert "Traceback" not in second.stderr
        assert "another daemon" in second.stderr
        # The first one is untouched.
        st = await control_call(cfg.control_socket, "status", timeout=5)
        assert isinstance(st, dict)
        assert st["device_id"] == "van"
    finally:
        first.terminate()
        assert await asyncio.to_thread(first.wait, 30) == 0
        assert first.stderr is not None
        assert "Traceback" not in first.stderr.read()


def test_every_command_argument_struct_rejects_unknown_fields() -> None:
    from agent.daemon import commands

    for struct in (
        commands.NoArgs,
        commands.SwitchLayerArgs,
        commands.ModemArgs,
        commands.ProfileChangeArgs,
        commands.ProfileNicknameArgs,
        commands.NotificationRemoveArgs,
    ):
        with pytest.raises(msgspec.ValidationError):
            msgspec.convert({"surprise": 1}, struct)


async def test_the_daemon_withholds_the_watchdog_when_a_part_stops(tmp_path: Path) -> None:
    import time

    from structlog.testing import capture_logs

    from agent.daemon.app import Daemon

    cfg = config(tmp_path)
    daemon = Daemon(cfg)
    for m in cfg.modems:
        daemon.sessions[m.id] = daemon._new_session(cfg, m.id)
    now = time.monotonic()
    daemon._policy_beat = now
    assert daemon._alive()
    # A modem loop that stopped ticking (a hung read, a deadlock) is no progress.
    daemon.sessions["m1"].last_tick = now - 3600
    with capture_logs() as logs:
        assert not daemon._alive()
        assert not daemon._alive()
    stalls = [e for e in logs if e["event"] == "daemon_stalled"]
    assert len(stalls) == 1  # logged once, not at every pet
    assert "m1" in stalls[0]["problem"]
    daemon.sessions["m1"].last_tick = now
    daemon._policy_beat = now - 3600  # the policy loop stopped handling events
    assert not daemon._alive()
