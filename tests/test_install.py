"""The README's install path and the shipped files that must agree with it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from agent.cli.daemon import default_socket
from agent.config import DEFAULT_CONTROL_SOCKET, load_config

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "config").glob("*.toml"))


@pytest.mark.install
@pytest.mark.timeout(600)  # pip fetches the dependencies; slow mirrors must not fail it
def test_wheel_installs_into_a_fresh_venv_and_runs(tmp_path: Path) -> None:
    """What the README does on Debian 12 / Ubuntu 24.04: a venv of its own, pip install, run."""
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(ROOT)],
        check=True,
        timeout=300,
        capture_output=True,
    )
    (wheel,) = dist.glob("esim_agent-*.whl")
    target = tmp_path / "opt-esim-agent"
    venv.EnvBuilder(with_pip=True, clear=True).create(target)
    pip = subprocess.run(
        [str(target / "bin" / "python"), "-m", "pip", "install", "-q", str(wheel)],
        timeout=300,
        capture_output=True,
        text=True,
        check=False,
    )
    assert pip.returncode == 0, pip.stderr
    exe = target / "bin" / "esim-agent"
    helped = subprocess.run(
        [str(exe), "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.startswith("usage: esim-agent")
    for config in CONFIGS:
        checked = subprocess.run(
            [str(exe), "run", "--check", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            cwd=tmp_path,  # not the checkout: the installed package must stand alone
        )
        assert checked.returncode == 0, checked.stderr
        assert checked.stdout.strip() == f"{config}: ok"
    # The demo scaffolding is not part of the daemon's package.
    site = next(target.glob("lib/python3*/site-packages"))
    assert not (site / "agent" / "demo" / "broker.py").exists()


def test_unit_runs_the_venv_and_can_read_its_config() -> None:
    unit = (ROOT / "systemd" / "esim-agent.service").read_text()
    assert (
        "ExecStart=/opt/esim-agent/bin/esim-agent run --config /etc/esim-agent/config.toml" in unit
    )
    assert "ConfigurationDirectory=esim-agent" in unit
    assert "Group=esim-agent" in unit
    readme = (ROOT / "README.md").read_text()
    assert "python3 -m venv /opt/esim-agent" in readme
    assert "install -m 0640 -o root -g esim-agent" in readme
    assert "pip install ." in readme
    assert "python3 -m pip install ." not in readme  # PEP 668 refuses it on Debian 12


def test_one_default_control_socket_everywhere() -> None:
    assert DEFAULT_CONTROL_SOCKET == "/run/esim-agent/control.sock"
    if "ESIM_AGENT_SOCKET" not in os.environ:
        assert default_socket() == DEFAULT_CONTROL_SOCKET
    for config in CONFIGS:
        assert load_config(config).control_socket == DEFAULT_CONTROL_SOCKET, config
    shipped = [ROOT / "README.md", *CONFIGS, *(ROOT / "systemd").iterdir()]
    shipped += sorted((ROOT / "docs").glob("*.md"))
    named: dict[str, set[str]] = {}
    for path in shipped:
        for found in re.findall(r"[\w<>./$-]*control\.sock", path.read_text()):
            named.setdefault(found, set()).add(path.name)
    # The emulator's own control socket (docs/emulator.md) lives in its temp dir; everything
    # else that names the agent's socket names the one default.
    agent_sockets = {
        path: where
        for path, where in named.items()
        if not path.startswith("/tmp/") and path != "control.sock"
    }
    assert set(agent_sockets) == {DEFAULT_CONTROL_SOCKET}, named


def test_readme_install_block_names_files_that_exist() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Install", 1)[1]
    block = section.split("```sh", 1)[1].split("```", 1)[0]
    shipped = re.findall(r"(?<![/\w])((?:systemd|config)/[\w.-]+)", block)
    assert {"systemd/esim-agent.service", "systemd/70-esim-agent.rules"} <= set(shipped)
    assert all((ROOT / path).is_file() for path in shipped), shipped
    # The venv the unit runs is the one the block creates, and the CLI on PATH is the same one.
    assert "python3 -m venv /opt/esim-agent" in block
    assert "/opt/esim-agent/bin/pip install ." in block
    assert "ln -sf /opt/esim-agent/bin/esim-agent /usr/local/bin/esim-agent" in block
    assert "--config /etc/esim-agent/config.toml --check" in block
