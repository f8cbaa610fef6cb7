"""Mosquittos with a config of the test's choosing (ACLs, password files, bridges)."""

from __future__ import annotations

import os
import subprocess
import sys
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


# A client that connects with a Last Will and then dies without DISCONNECT (SIGKILL).
_WILL_CLIENT = """
import asyncio, sys, aiomqtt
async def main():
    host, port, client_id, topic, user, password = sys.argv[1:7]
    will = aiomqtt.Will(topic, b"offline", qos=1, retain=True)
    async with aiomqtt.Client(host, int(port), username=user or None, password=password or None,
                              will=will, identifier=client_id,
                              protocol=aiomqtt.ProtocolVersion.V5):
        print("connected", flush=True)
        await asyncio.Event().wait()
asyncio.run(main())
"""


def die_with_will(
    broker: MosquittoBroker,
    client_id: str,
    topic: str,
    *,
    user: str | None = None,
    password: str | None = None,
    timeout: float = 10.0,
) -> None:
    """Connect a separate process with a Will `offline` (retained) on `topic`, then SIGKILL it."""
    argv = [broker.host, str(broker.port), client_id, topic, user or "", password or ""]
    proc = subprocess.Popen(
        [sys.executable, "-c", _WILL_CLIENT, *argv], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        if line != "connected":
            raise AssertionError(f"will client did not connect: {line!r}")
    finally:
        proc.kill()
        proc.wait(timeout)
