"""A real Mosquitto broker on a free loopback port (demo, tests, benchmarks) and a watcher."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from base64 import b64encode
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

from agent.errors import AgentError

#: The broker binary; ESIM_AGENT_MOSQUITTO points the demo and the tests at another one.
MOSQUITTO = (
    os.environ.get("ESIM_AGENT_MOSQUITTO") or shutil.which("mosquitto") or "/usr/sbin/mosquitto"
)
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _password_line(user: str, password: str) -> str:
    """A mosquitto_passwd-compatible `$6$` (salted SHA-512) entry."""
    salt = secrets.token_bytes(12)
    digest = hashlib.sha512(password.encode() + salt).digest()
    return f"{user}:$6${b64encode(salt).decode()}${b64encode(digest).decode()}\n"


class BrokerStartError(AgentError):
    """The broker could not be started (missing, not executable, exited, or never listened)."""


class MosquittoBroker:
    """Starts `/usr/sbin/mosquitto` with its own config in a temp dir; can be killed and restarted."""

    def __init__(
        self,
        workdir: Path | None = None,
        *,
        port: int | None = None,
        users: dict[str, str] | None = None,
    ) -> None:
        self._own_dir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="mosquitto-")) if workdir is None else workdir
        self.port = port if port is not None else free_port()
        self.users = dict(users or {})
        self.host = "127.0.0.1"
        self._proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.workdir / "mosquitto.log"

    def _write_config(self) -> Path:
        """Write mosquitto.conf (and a password file when users are given)."""
        lines = [
            f"listener {self.port} {self.host}",
            "persistence false",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
        ]
        if os.geteuid() == 0:
            # As root mosquitto drops to user "mosquitto", who cannot read our private temp dir.
            lines.append("user root")
        if self.users:
            pwfile = self.workdir / "passwords"
            pwfile.write_text("".join(_password_line(u, p) for u, p in self.users.items()))
            pwfile.chmod(0o600)
            lines += ["allow_anonymous false", f"password_file {pwfile}"]
        else:
            lines.append("allow_anonymous true")
        conf = self.workdir / "mosquitto.conf"
        conf.write_text("\n".join(lines) + "\n")
        return conf

    @property
    def running(self) -> bool:
        """Whether the broker process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start the broker and return once its port accepts connections."""
        if self.running:
            return
        conf = self._write_config()
        log = self.log_path.open("ab")
        try:
            self._proc = subprocess.Popen(
                [MOSQUITTO, "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT
            )
        except OSError as exc:
            raise BrokerStartError(f"cannot run {MOSQUITTO}: {exc.strerror or exc}") from None
        finally:
            log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                text = self.log_path.read_text(errors="replace").strip()
                raise BrokerStartError(f"mosquitto exited: {text[-500:]}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection((self.host, self.port), 0.2),
            ):
                return
            # Nothing to wait on but the port itself: poll it briefly until the deadline.
            time.sleep(0.02)
        self.kill()
        raise BrokerStartError(f"mosquitto did not listen on {self.port} within {START_TIMEOUT_S}s")

    def stop(self) -> None:
        """Stop the broker cleanly (SIGTERM), killing it if it does not exit in time."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(STOP_TIMEOUT_S)
        self._proc = None

    def kill(self) -> None:
        """Kill the broker abruptly (SIGKILL): clients see their sockets die."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(STOP_TIMEOUT_S)
        self._proc = None

    def restart(self) -> None:
        """Start again on the same port (after stop() or kill())."""
        self.kill()
        self.start()

    def close(self) -> None:
        """Stop the broker and remove a temp dir this object created."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> MosquittoBroker:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def env(self) -> dict[str, str]:
        """Environment for a child process that should find this broker."""
        return {**os.environ, "MQTT_HOST": self.host, "MQTT_PORT": str(self.port)}


class BrokerAddress(Protocol):
    """Where a broker listens (a MosquittoBroker, or any object with host and port)."""

    @property
    def host(self) -> str:
        """Host name or address."""
        ...

    @property
    def port(self) -> int:
        """TCP port."""
        ...


class Watcher:
    """An independent MQTT v5 client that records every message on its filters, for assertions."""

    def __init__(self, broker: BrokerAddress, *filters: str, **client_kwargs: object) -> None:
        import aiomqtt

        self._filters = filters
        self.client = aiomqtt.Client(
            broker.host,
            broker.port,
            protocol=aiomqtt.ProtocolVersion.V5,
            timeout=10,
            **client_kwargs,  # type: ignore[arg-type]
        )
        self.messages: list[tuple[str, bytes, bool, object]] = []
        self._changed: asyncio.Condition | None = None
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Watcher:
        self._changed = asyncio.Condition()
        await self.client.__aenter__()
        for topic_filter in self._filters:
            await self.client.subscribe(topic_filter, qos=1, timeout=10)
        self._task = asyncio.create_task(self._collect(), name="watcher")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        with contextlib.suppress(Exception):
            await self.client.__aexit__(None, None, None)

    async def _collect(self) -> None:
        assert self._changed is not None
        async for message in self.client.messages:
            payload = message.payload if isinstance(message.payload, bytes) else b""
            async with self._changed:
                self.messages.append(
                    (message.topic.value, payload, message.retain, message.properties)
                )
                self._changed.notify_all()

    async def message_at(self, index: int) -> tuple[str, bytes, bool, object]:
        """The index-th message, waiting for it to arrive (for live displays)."""
        assert self._changed is not None
        async with self._changed:
            await self._changed.wait_for(lambda: len(self.messages) > index)
            return self.messages[index]

    def latest(self, topic: str) -> bytes | None:
        """The last payload seen on `topic`, or None."""
        for seen_topic, payload, _, _ in reversed(self.messages):
            if seen_topic == topic:
                return payload
        return None

    async def wait_for(
        self,
        topic: str,
        predicate: Callable[[bytes], bool] = lambda _: True,
        timeout: float = 10.0,
        since: int = 0,
    ) -> tuple[str, bytes, bool, object]:
        """Wait until a message on `topic` (from index `since` on) satisfies `predicate`."""
        assert self._changed is not None

        def match() -> tuple[str, bytes, bool, object] | None:
            for item in self.messages[since:]:
                if item[0] == topic and predicate(item[1]):
                    return item
            return None

        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: match() is not None)
            found = match()
            assert found is not None
            return found

    async def wait_json(
        self,
        topic: str,
        predicate: Callable[[Any], bool] = lambda _: True,
        timeout: float = 10.0,
        since: int = 0,
    ) -> Any:
        """Wait for a JSON message on `topic` whose decoded value satisfies `predicate`."""

        def ok(payload: bytes) -> bool:
            try:
                value = json.loads(payload)
            except ValueError:
                return False
            return bool(predicate(value))

        _, payload, _, _ = await self.wait_for(topic, ok, timeout, since)
        return json.loads(payload)
