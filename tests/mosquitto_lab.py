"""Mosquittos with a config of the test's choosing (ACLs, password files, bridges)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from agent.demo.mosquitto import MosquittoBroker


class ConfiguredMosquitto(MosquittoBroker):
    """A MosquittoBroker whose config is the listener plus `lines` (paths are the caller's)."""

    def __init__(self, workdir: Path, lines: list[str], *, port: int | None = None) -> None:
        super().__init__(workdir, port=port)
        self.lines = lines

    def _write_config(self) -> Path:
        head = [
            f"listener {self.port} {self.host}",
            "persistence false",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
        ]
        if os.geteuid() == 0:
            head.append("user root")
        conf = self.workdir / "mosquitto.conf"
        conf.write_text("\n".join([*head, *self.lines]) + "\n")
        return conf


def password_file(path: Path, users: dict[str, str]) -> Path:
    """Write a Mosquitto password file with the real mosquitto_passwd."""
    for n, (user, password) in enumerate(users.items()):
        create = ["-c"] if n == 0 else []
        subprocess.run(
            ["mosquitto_passwd", *create, "-b", str(path), user, password],
            check=True,
            capture_output=True,
            timeout=30,
        )
    path.chmod(0o600)
    return path
