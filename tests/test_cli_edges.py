"""The CLI's edges as a user meets them: usage errors, JSON errors, help text, ports that are not
modems or are held by someone else, demo and emulator mistakes, and plain `profile enable` on
modems that need their vendor's refresh."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import serial

from agent.cli import build_parser
from agent.config import parse_config
from agent.errors import ConfigError
from agent.iccid import parse_iccid
from agent.mqtt.payloads import ProfileEnableCommand
from hw_fixtures.testing import EmulatorHandle, start_emulator

HOME = "8944476500001224158"
TRAVEL = "89012345678901234567"
CLI_TIMEOUT = 90.0


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", *args],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        check=False,
        env={**os.environ, **(env or {})},
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


# ------------------------------------------------------------------------------ ICCID rule


@pytest.mark.parametrize(
    ("text", "digits"),
    [
        ("894450010203040506", "894450010203040506"),  # 18
        ("8944500102030405067", "8944500102030405067"),  # 19
        ("89012345678901234567", "89012345678901234567"),  # 20
        ("8944500102030405067F", "8944500102030405067"),
        ("8944 5001 0203 0405 067f", "8944500102030405067"),
    ],
)
def test_iccid_rule_accepts(text: str, digits: str) -> None:
    assert parse_iccid(text) == digits


@pytest.mark.parametrize(
    "text", ["123", "89445001020304050", "890123456789012345678", "8944500102030405067FF", "89x"]
)
def test_iccid_rule_rejects_everywhere(text: str) -> None:
    with pytest.raises(ValueError, match="18-20 digits"):
        parse_iccid(text)
    payload = json.dumps({"modem": "m0", "iccid": text}).encode()
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(payload, type=ProfileEnableCommand)
    cfg = {
        "device_id": "d",
        "state_dir": "/tmp/esa-iccid",
        "modems": [{"id": "m0", "port": "/dev/null"}],
        "layers": [{"name": "home", "modem": "m0", "profile": text, "role": "primary"}],
    }
    with pytest.raises(ConfigError, match="18-20 digits"):
        parse_config(cfg, "<config>")


def test_config_and_mqtt_accept_a_trailing_f() -> None:
    cfg = {
        "device_id": "d",
        "state_dir": "/tmp/esa-iccid",
        "modems": [{"id": "m0", "port": "/dev/null"}],
        "layers": [
            {"name": "home", "modem": "m0", "profile": TRAVEL[:19] + "F", "role": "primary"}
        ],
    }
    assert parse_config(cfg, "<config>").layers[0].profile == TRAVEL[:19]
    cmd = msgspec.json.decode(
        b'{"modem": "m0", "iccid": "8944500102030405067F"}', type=ProfileEnableCommand
    )
    assert cmd.iccid == "8944500102030405067"


def test_short_iccid_is_a_usage_error() -> None:
    result = cli("profile", "enable", "123", "--port", "/dev/null")
    assert result.returncode == 2
    assert "not an ICCID" in result.stderr
    assert "Traceback" not in result.stderr


# ------------------------------------------------------------------------------ choices, JSON


@pytest.mark.parametrize(
    "args",
    [
        ("modem", "info", "--port", "/dev/null", "--vendor", "nokia"),
        ("--log-level", "loud", "modem", "info", "--port", "/dev/null"),
        ("modem", "info", "--port", "/dev/null", "--log-level", "loud"),
        ("modem", "scan", "--port", "/dev/null", "--timeout", "0"),
        ("profile", "list", "--port", "/dev/null", "--timeout", "-5"),
        ("profile", "enable", HOME, "--port", "/dev/null", "--rollback-timeout", "nan"),
    ],
)
def test_bad_choices_and_timeouts_are_usage_errors(args: tuple[str, ...]) -> None:
    result = cli(*args)
    assert result.returncode == 2, result.stderr
    assert "invalid choice" in result.stderr or "must be a positive" in result.stderr


def test_log_level_after_the_subcommand_is_used() -> None:
    args = build_parser().parse_args(["modem", "info", "--port", "p", "--log-level", "debug"])
    assert args.log_level == "debug"
    args = build_parser().parse_args(["--log-level", "info", "modem", "info", "--port", "p"])
    assert args.log_level == "info"


def test_json_errors_are_one_object_on_stdout(tmp_path: Path) -> None:
    missing = str(tmp_path / "ttyNOPE")
    result = cli("modem", "info", "--port", missing, "--json")
    assert result.returncode == 1
    assert result.stderr == ""
    assert json.loads(result.stdout) == {
        "error": {"code": "port", "message": f"{missing}: no such file or directory"}
    }
    usage = cli("profile", "enable", "123", "--port", missing, "--json")
    assert usage.returncode == 2
    body = json.loads(usage.stdout)
    assert body["error"]["code"] == "usage"
    assert "not an ICCID" in body["error"]["message"]
    # Without --json the same error is one line on stderr and nothing on stdout.
    plain = cli("modem", "info", "--port", missing)
    assert plain.stdout == ""
    assert assert_one_line_error(plain) == f"esim-agent: {missing}: no such file or directory"


def _walk(parser: argparse.ArgumentParser, path: str) -> Iterator[tuple[str, argparse.Action]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                yield f"{path} {choice.dest}", choice
            for name, sub in action.choices.items():
                yield from _walk(sub, f"{path} {name}")
        elif not isinstance(action, argparse._HelpAction):
            yield f"{path} {action.dest}", action


def test_every_argument_and_option_has_help() -> None:
    from hw_fixtures.emulator import build_parser as emulator_parser

    walked = [
        *_walk(build_parser(), "esim-agent"),
        *_walk(emulator_parser("esim-agent emulator"), "esim-agent emulator"),
    ]
    assert len(walked) > 100  # the whole tree, not one level of it
    missing = [
        where for where, action in walked if not action.help or action.help == argparse.SUPPRESS
    ]
    assert missing == []


def test_emulator_help_names_the_command() -> None:
    result = cli("emulator", "--help")
    assert result.returncode == 0
    assert result.stdout.startswith("usage: esim-agent emulator")
    for option in ("--vendor", "--link-dir", "--log-level"):
        assert option in result.stdout


def test_emulator_link_dir_missing_is_one_line(tmp_path: Path) -> None:
    result = cli("emulator", "--link-dir", str(tmp_path / "nope"))
    assert result.returncode == 2
    assert "--link-dir" in result.stderr
    assert "no such directory" in result.stderr
    assert "Traceback" not in result.stderr


# ------------------------------------------------------------------------------ ports


def test_a_port_that_is_not_a_modem_fails_with_a_plain_message() -> None:
    leader, follower = os.openpty()
    try:
        result = cli("modem", "info", "--port", os.ttyname(follower))
    finally:
        os.close(leader)
        os.close(follower)
    assert result.returncode == 1
    line = assert_one_line_error(result)
    # The deadline is the CLI's short one (2 s), not the daemon's patient probe.
    assert "no answer to AT within 2 s (not a modem's AT port?)" in line


def test_a_held_port_points_to_the_daemon() -> None:
    with start_emulator("--vendor", "quectel", "--fast") as emu:
        holder = serial.Serial(emu.port, exclusive=True)
        try:
            result = cli("profile", "list", "--port", emu.port, "--socket", "/nonexistent.sock")
        finally:
            holder.close()
    assert result.returncode == 1
    line = assert_one_line_error(result)
    assert "in use by another process" in line
    assert "--socket" in line


# ------------------------------------------------------------------------------ profile enable


def registered_on(port: str, iccid: str) -> dict[str, Any]:
    """`modem info` until the modem runs iccid and is registered (the condition, with a deadline)."""
    deadline = time.monotonic() + 30.0
    info: dict[str, Any] = {}
    while time.monotonic() < deadline:
        result = cli("modem", "info", "--port", port, "--json")
        if result.returncode == 0:
            info = json.loads(result.stdout)
            if info["sim"]["iccid"] == iccid and info["registration"]["state"] in (
                "home",
                "roaming",
            ):
                return info
    raise AssertionError(f"{port} never registered on {iccid}: last {info}")


@pytest.fixture(params=["sierra", "dell"])
def refresh_emu(request: pytest.FixtureRequest) -> Iterator[EmulatorHandle]:
    with start_emulator(
        "--vendor",
        request.param,
        "--fast",
        "--log-level",
        "warning",
        "--profile",
        f"{HOME}:Home:enabled",
        "--profile",
        f"{TRAVEL}:Travel",
    ) as handle:
        yield handle


def test_plain_enable_leaves_the_modem_serving(refresh_emu: EmulatorHandle) -> None:
    result = cli("profile", "enable", TRAVEL, "--port", refresh_emu.port, "--json")
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    assert body["changed"] is True
    assert body["strategy"] in ("cfun", "reset")
    info = registered_on(refresh_emu.port, TRAVEL)
    assert info["registration"]["state"] == "home"


def test_strategy_is_honoured_without_safe(refresh_emu: EmulatorHandle) -> None:
    result = cli(
        "profile", "enable", TRAVEL, "--port", refresh_emu.port, "--strategy", "reset", "--json"
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["strategy"] == "reset"
    registered_on(refresh_emu.port, TRAVEL)


def test_no_refresh_only_switches_the_card(refresh_emu: EmulatorHandle) -> None:
    result = cli("profile", "enable", TRAVEL, "--port", refresh_emu.port, "--no-refresh", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["strategy"] == "none"
    listed = cli("profile", "list", "--port", refresh_emu.port, "--json")
    states = {p["iccid"]: p["state"] for p in json.loads(listed.stdout)["profiles"]}
    assert states[TRAVEL] == "enabled"
    # The modem was not asked to take it: it waits for a refresh and serves nothing meanwhile,
    # which is what --no-refresh means (and what a plain enable used to leave behind).
    registration = refresh_emu.status()["registration"]
    assert registration["pending_refresh"] is True
    assert registration["state"] not in ("home", "roaming")


# ------------------------------------------------------------------------------ demo


def test_demo_json_into_a_missing_folder_is_refused_first(tmp_path: Path) -> None:
    result = cli(
        "demo", "--json", str(tmp_path / "no" / "t.json"), "--workdir", str(tmp_path / "w")
    )
    assert result.returncode == 1
    line = assert_one_line_error(result)
    assert "does not exist" in line
    assert result.stdout == ""  # nothing started
    assert not (tmp_path / "w" / "esim-agent.toml").exists()


def test_demo_unwritable_workdir_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = cli("demo", "--workdir", str(blocker / "sub"))
    assert result.returncode == 1
    assert "--workdir" in assert_one_line_error(result)


def _processes_with(marker: str) -> list[int]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if marker.encode() in environ:
            found.append(int(pid))
    return found


def test_demo_with_a_mosquitto_that_cannot_run_leaves_nothing_behind(tmp_path: Path) -> None:
    fake = tmp_path / "mosquitto"
    fake.write_text("not a program\n")  # present, not executable
    mark = uuid.uuid4().hex
    env = {"ESIM_AGENT_MOSQUITTO": str(fake), "ESA_DEMO_MARK": mark}
    forced = cli("demo", "--broker", "mosquitto", "--workdir", str(tmp_path / "w"), env=env)
    assert forced.returncode == 1
    line = assert_one_line_error(forced)
    assert "cannot run" in line
    assert str(fake) in line
    # The emulator the demo had started is gone with it.
    assert _processes_with(f"ESA_DEMO_MARK={mark}") == []


# ------------------------------------------------------------------------------ progress


def run_on_a_terminal(*args: str) -> tuple[int, str]:
    """The CLI with a pty as its terminal (stdout and stderr), as a person runs it."""
    leader, follower = os.openpty()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent", *args],
            stdin=subprocess.DEVNULL,
            stdout=follower,
            stderr=follower,
        )
        os.close(follower)
        out = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO once the child has closed the pty
                break
            if not chunk:
                break
            out += chunk
        code = proc.wait(timeout=CLI_TIMEOUT)
    finally:
        os.close(leader)
    return code, out.decode(errors="replace")


def test_long_operations_show_progress_on_a_terminal_only() -> None:
    with start_emulator(
        "--vendor",
        "sierra",
        "--fast",
        "--log-level",
        "warning",
        "--profile",
        f"{HOME}:Home:enabled",
        "--profile",
        f"{TRAVEL}:Travel",
    ) as emu:
        code, screen = run_on_a_terminal("modem", "scan", "--port", emu.port)
        assert code == 0, screen
        assert "scanning for operators" in screen
        code, screen = run_on_a_terminal(
            "profile", "enable", TRAVEL, "--port", emu.port, "--safe", "--rollback-timeout", "30"
        )
        assert code == 0, screen
        # Every phase of the safe switch, in order, then the outcome.
        phases = [
            f"enabling {TRAVEL}",
            "the modem takes the new profile",
            "waiting for the network to register the new profile",
            "verifying the data path",
        ]
        positions = [screen.find(p) for p in phases]
        assert -1 not in positions, screen
        assert positions == sorted(positions)
        assert f"switched: {HOME} -> {TRAVEL}" in screen
        # Not a terminal: nothing but the result.
        piped = cli("modem", "scan", "--port", emu.port, "--json")
        assert piped.returncode == 0, piped.stderr
        assert piped.stderr == ""
        json.loads(piped.stdout)


async def test_a_port_held_by_the_daemon_names_its_socket(tmp_path: Path) -> None:
    from agent.demo.stack import DemoStack, mosquitto_available

    broker = "mosquitto" if mosquitto_available() else "embedded"
    stack = DemoStack(tmp_path / "stack", broker=broker)
    try:
        await stack.start()
        await stack.wait_json("modems/m0", lambda m: m.get("online") is True, 60.0)
        assert stack.emulator is not None
        assert stack.daemon is not None
        port = stack.emulator.info["modems"][0]["port"]
        for args in (
            ("profile", "list", "--port", port, "--socket", str(tmp_path / "elsewhere.sock")),
            ("modem", "info", "--port", port),
        ):
            result = await asyncio.to_thread(cli, *args)
            assert result.returncode == 1
            line = assert_one_line_error(result)
            assert f"in use by the esim-agent daemon (pid {stack.daemon.pid})" in line
            assert f"--socket {stack.socket}" in line
    finally:
        await stack.close()


def test_a_file_that_is_no_serial_port_says_so() -> None:
    result = cli("modem", "info", "--port", "/dev/null")
    assert result.returncode == 1
    assert assert_one_line_error(result) == "esim-agent: /dev/null: not a serial port"


def test_no_daemon_with_json_is_a_json_error(tmp_path: Path) -> None:
    result = cli("status", "--json", "--socket", str(tmp_path / "none.sock"))
    assert result.returncode == 3
    assert result.stderr == ""
    body = json.loads(result.stdout)
    assert body["error"]["code"] == "no_daemon"
    assert str(tmp_path / "none.sock") in body["error"]["message"]
