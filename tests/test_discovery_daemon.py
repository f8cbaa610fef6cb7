"""The daemon finding modems through discovery: config/distributed.toml as shipped (IMEI match)
against the emulator presented as udev devices, and `modem list --json` asking the daemon."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from agent.daemon.control import ControlError, control_call
from hw_fixtures.testing import EmulatorHandle, start_emulator

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "config" / "distributed.toml"
SCENARIO = ROOT / "hw_fixtures" / "scenarios" / "distributed.toml"
STEP_S = 60.0


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    return str(value)


def dump_toml(data: dict[str, Any]) -> str:
    """Enough TOML for a config: top-level keys, tables, arrays of tables (one level deep)."""
    out: list[str] = []
    for k, v in data.items():
        if not isinstance(v, dict) and not (isinstance(v, list) and v and isinstance(v[0], dict)):
            out.append(f"{k} = {_toml(v)}")
    for k, v in data.items():
        if isinstance(v, dict):
            out.append(f"[{k}]")
            for kk, vv in v.items():
                if isinstance(vv, list) and vv and isinstance(vv[0], dict):
                    continue
                out.append(f"{kk} = {_toml(vv)}")
            for kk, vv in v.items():
                if isinstance(vv, list) and vv and isinstance(vv[0], dict):
                    for item in vv:
                        out.append(f"[[{k}.{kk}]]")
                        out.extend(f"{a} = {_toml(b)}" for a, b in item.items())
        elif isinstance(v, list) and v and isinstance(v[0], dict):
            for item in v:
                out.append(f"[[{k}]]")
                out.extend(f"{a} = {_toml(b)}" for a, b in item.items())
    return "\n".join(out) + "\n"


async def until(check: Callable[[], Awaitable[bool]], timeout: float = STEP_S) -> None:
    """Wait for a condition on another process's state, with a deadline."""
    async with asyncio.timeout(timeout):
        while not await check():  # noqa: ASYNC110 - the state lives in another process
            await asyncio.sleep(0.1)


class Daemon:
    """`esim-agent run` on a config file, stopped with SIGTERM."""

    def __init__(self, config: Path, log: Path) -> None:
        self.socket = str(config.parent / "control.sock")
        with log.open("ab") as fh:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "agent", "run", "--config", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=fh,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        self.log = log

    async def call(self, cmd: str, **args: Any) -> Any:
        return await control_call(self.socket, cmd, args, timeout=30)

    async def answers(self) -> bool:
        try:
            await self.call("status")
        except ControlError:
            return False
        return True

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def shipped_config_against(emu: EmulatorHandle, workdir: Path) -> Path:
    """distributed.toml with only what must change on a test machine changed: where state and
    the control socket live, no broker at 10.0.0.1, probes at the emulator instead of the
    internet, and discovery reading the emulator's udev feed. The [[modems]] entry is as shipped.
    """
    data = tomllib.loads(SHIPPED.read_text())
    data["state_dir"] = str(workdir / "state")
    data["mqtt"]["enabled"] = False
    data["control"] = {"socket": str(workdir / "control.sock")}
    data["discovery"] = {"source": "emulator", "emulator_control": emu.control_path}
    http = emu.modem("m0")["http_url"]
    for layer in data["layers"]:
        layer["probes"] = [{"kind": "http", "target": http, "interval": 1.0, "timeout": 1.0}]
    path = workdir / "config.toml"
    path.write_text(dump_toml(data))
    return path


@pytest.fixture
async def distributed(tmp_path: Path) -> AsyncIterator[tuple[EmulatorHandle, Daemon]]:
    emu = await asyncio.to_thread(
        start_emulator, "--scenario", str(SCENARIO), "--fast", "--log-level", "warning"
    )
    daemon = Daemon(shipped_config_against(emu, tmp_path), tmp_path / "daemon.log")
    try:
        yield emu, daemon
    finally:
        await asyncio.to_thread(daemon.stop)
        await asyncio.to_thread(emu.stop)


def test_shipped_entry_is_unchanged_and_names_the_emulators_imei() -> None:
    shipped = tomllib.loads(SHIPPED.read_text())
    scenario = tomllib.loads(SCENARIO.read_text())
    assert shipped["modems"] == [{"id": "m0", "imei": "356938035643809", "vendor": "auto"}]
    assert scenario["modem"][0]["imei"] == shipped["modems"][0]["imei"]


async def test_distributed_config_finds_its_modem_by_imei(
    distributed: tuple[EmulatorHandle, Daemon],
) -> None:
    emu, daemon = distributed
    await until(daemon.answers)

    async def online() -> bool:
        st = await daemon.call("status")
        return bool(st["modems"] and st["modems"][0]["online"])

    await until(online)
    st = await daemon.call("status")
    [m0] = st["modems"]
    assert m0["port"] == emu.modem("m0")["port"]
    assert m0["netdev"] == "wwan-cabin"

    out = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "agent", "modem", "list", "--json", "--socket", daemon.socket],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    doc = json.loads(out.stdout)
    [entry] = doc["entries"]
    assert entry == {
        "id": "m0",
        "how": "imei",
        "port": emu.modem("m0")["port"],
        "device": entry["device"],
        "netdev": "wwan-cabin",
        "why": None,
    }
    [device] = doc["devices"]
    assert device["entry"] == "m0"
    assert device["imei"] == "356938035643809"
    assert device["vendor"] == "2c7c"
    assert device["ports"][0]["role"] == "at_primary"
    assert device["ports"][0]["held_by"] == [daemon.proc.pid]
