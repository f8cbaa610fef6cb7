"""`esim-agent check`: the pre-travel checklist against the emulator and a real Mosquitto, straight
to the modems and through a running daemon, with failing items giving a non-zero exit."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import serial

from agent.check import evaluate, system
from agent.config import config_to_toml, default_demo_config, parse_config
from agent.daemon.control import control_call
from agent.demo.mosquitto import MosquittoBroker
from agent.demo.stack import DEMO_ICCIDS, DEMO_SCENARIO, DemoStack, mosquitto_available
from hw_fixtures.testing import EmulatorHandle, start_emulator

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not mosquitto_available(), reason="needs mosquitto (apt install mosquitto)"),
]

PRIMARY, ROAM, EMERGENCY = DEMO_ICCIDS
STEP_S = 60.0
ALL_PASS = dict.fromkeys(evaluate.ORDER, "pass")


def run_check(config: Path, *extra: str) -> tuple[int, dict[str, Any]]:
    result = subprocess.run(
        [sys.executable, "-m", "agent", "check", "--config", str(config), "--json", *extra],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert "Traceback" not in result.stderr
    return result.returncode, json.loads(result.stdout)


def statuses(report: dict[str, Any]) -> dict[str, str]:
    return {i["id"]: i["status"] for i in report["items"]}


def with_quotas(data: dict[str, Any]) -> None:
    data.setdefault("usage", {})["quotas"] = dict.fromkeys(DEMO_ICCIDS, "10 GB")


@pytest.fixture
def emulator() -> Iterator[EmulatorHandle]:
    with start_emulator("--scenario", str(DEMO_SCENARIO), "--fast", "--log-level", "warning") as h:
        yield h


@pytest.fixture
def broker() -> Iterator[MosquittoBroker]:
    with MosquittoBroker(users={"traveller": "s3cret-pass"}) as b:
        yield b


def write_config(
    tmp_path: Path, emulator: EmulatorHandle, broker: MosquittoBroker, password: str
) -> Path:
    cfg = default_demo_config(emulator.info, broker.port, tmp_path / "state", list(DEMO_ICCIDS))
    data = tomllib.loads(config_to_toml(cfg))
    with_quotas(data)
    data["control"] = {"socket": str(tmp_path / "nobody-listens.sock")}
    secret = tmp_path / "mqtt-password"
    secret.write_text(password + "\n")
    data["mqtt"].update(username="traveller", password_file=str(secret))
    path = tmp_path / "agent.toml"
    path.write_text(config_to_toml(parse_config(data, str(path))))
    return path


def test_direct_check_passes_then_fails_on_an_enabled_emergency_profile(
    tmp_path: Path, emulator: EmulatorHandle, broker: MosquittoBroker
) -> None:
    config = write_config(tmp_path, emulator, broker, "s3cret-pass")
    code, report = run_check(config)
    assert statuses(report) == ALL_PASS, report
    assert (code, report["ok"], report["via"]) == (0, True, "direct")
    assert report["summary"] == {"pass": 11, "fail": 0, "skip": 0}
    primary = next(i for i in report["items"] if i["id"] == "primary")
    assert "probes pass" in primary["detail"]

    # The traveller tried the emergency profile and left it on: the check says so and how to fix.
    m1 = emulator.info["modems"][1]["port"]
    enabled = subprocess.run(
        [sys.executable, "-m", "agent", "profile", "enable", EMERGENCY, "--port", m1],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert enabled.returncode == 0, enabled.stderr
    code, report = run_check(config)
    assert code == 1
    assert report["ok"] is False
    assert statuses(report) == ALL_PASS | {"emergency": "fail"}
    emergency = next(i for i in report["items"] if i["id"] == "emergency")
    assert "enabled, not dormant" in emergency["detail"]
    assert f"profile disable {EMERGENCY}" in emergency["fix"]

    # Human output: the same verdicts, one line each, and the same exit status.
    human = subprocess.run(
        [sys.executable, "-m", "agent", "check", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert human.returncode == 1
    assert "FAIL  emergency profile installed and dormant" in human.stdout
    assert "checklist: 10 pass, 1 fail, 0 skip" in human.stdout


def test_wrong_broker_password_fails_the_broker_item(
    tmp_path: Path, emulator: EmulatorHandle, broker: MosquittoBroker
) -> None:
    config = write_config(tmp_path, emulator, broker, "not-the-password")
    code, report = run_check(config)
    assert code == 1
    broker_item = next(i for i in report["items"] if i["id"] == "broker")
    assert broker_item["status"] == "fail"
    assert "refused" in broker_item["detail"]
    assert "password" in broker_item["fix"]


def test_invalid_config_is_the_only_verdict(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('device_id = "x"\n[[layers]]\nname = "a"\n')
    code, report = run_check(bad)
    assert code == 78
    assert report["items"][0]["id"] == "config"
    assert report["items"][0]["status"] == "fail"
    assert {i["status"] for i in report["items"][1:]} == {"skip"}
    assert report["via"] is None


async def test_check_through_the_running_daemon(tmp_path: Path) -> None:
    stack = DemoStack(tmp_path / "stack", broker="mosquitto", tune=with_quotas)
    try:
        await stack.start()
        await stack.wait_json("state", lambda s: s.get("active_layer") == "primary", STEP_S)
        await stack.wait_json("profiles/m1", lambda p: len(p["profiles"]) == 2, STEP_S)
        code, report = await asyncio.to_thread(run_check, stack.config_path)
        assert report["via"] == "daemon"
        assert statuses(report) == ALL_PASS, report
        assert code == 0
        ports = next(i for i in report["items"] if i["id"] == "ports")
        assert "the running daemon holds them" in ports["detail"]

        # Through the daemon (it owns the port): the emergency profile left enabled on m1
        # (forced: the daemon refuses to touch a layer's profile otherwise).
        await control_call(
            stack.socket,
            "profile_enable",
            {"modem": "m1", "iccid": EMERGENCY, "force": True},
            timeout=STEP_S,
        )
        code, report = await asyncio.to_thread(run_check, stack.config_path)
        assert report["via"] == "daemon"
        assert code == 1
        assert statuses(report)["emergency"] == "fail"
        # No port fight: the daemon still has both modems.
        status = await control_call(stack.socket, "status", timeout=STEP_S)
        assert isinstance(status, dict)
        assert all(m["online"] for m in status["modems"])
    finally:
        await stack.close()


def test_a_port_held_by_another_program_fails_the_ports_item(
    tmp_path: Path, emulator: EmulatorHandle, broker: MosquittoBroker
) -> None:
    config = write_config(tmp_path, emulator, broker, "s3cret-pass")
    m0 = emulator.info["modems"][0]["port"]
    with serial.Serial(m0, exclusive=True):  # a terminal program left open on the modem
        code, report = run_check(config)
    assert code == 1
    items = {i["id"]: i for i in report["items"]}
    assert items["ports"]["status"] == "fail"
    assert f"(pid {os.getpid()})" in items["ports"]["detail"]
    assert "stop the other program" in items["ports"]["fix"]
    assert items["modems"]["status"] == "fail"
    assert "in use by another process" in items["modems"]["detail"]
    assert items["primary"]["status"] == "skip"


@pytest.mark.parametrize(
    ("when", "status"),
    [(0.0, "fail"), (datetime(2024, 6, 1, tzinfo=UTC).timestamp(), "fail"), (None, "pass")],
)
def test_clock_item(when: float | None, status: str) -> None:
    verdict = system.clock_item(when)
    assert verdict.status == status
    if status == "fail":
        assert "timedatectl" in (verdict.fix or "")
