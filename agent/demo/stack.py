"""The whole system on one machine: emulator, MQTT broker, the daemon process, and a watcher.

The demo, the end-to-end tests and the benchmarks all use this one stack, so what the demo
shows is what the tests check.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hw_fixtures
from agent.config import Config, config_to_toml, default_demo_config
from agent.demo.mosquitto import MOSQUITTO, MosquittoBroker, Watcher
from hw_fixtures.broker import EmbeddedBroker
from hw_fixtures.control_client import AsyncControlClient
from hw_fixtures.testing import EmulatorHandle, start_emulator

DEMO_SCENARIO = Path(hw_fixtures.__file__).parent / "scenarios" / "demo.toml"
#: Profiles of the demo scenario in layer order: primary, failover, emergency.
DEMO_ICCIDS = ("8944500102030405067", "8931440000012345678", "8988247000001234567")
BASE_TOPIC = "esim-agent"
DAEMON_STOP_TIMEOUT_S = 20.0


@dataclass(frozen=True)
class Address:
    """A broker address."""

    host: str
    port: int


def mosquitto_available() -> bool:
    """Whether a Mosquitto binary is installed and can be run."""
    return os.path.isfile(MOSQUITTO) and os.access(MOSQUITTO, os.X_OK)


class DemoStack:
    """Starts and stops the emulator, a broker, and `esim-agent run` as a real process."""

    def __init__(
        self,
        workdir: Path,
        *,
        scenario: Path = DEMO_SCENARIO,
        iccids: tuple[str, ...] = DEMO_ICCIDS,
        broker: str = "auto",
        device_id: str = "demo",
        command_token: str | None = None,
        emulator_args: tuple[str, ...] = (),
        tune: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.workdir = workdir
        self.scenario = scenario
        self.iccids = iccids
        self.broker_kind = broker
        self.device_id = device_id
        self.command_token = command_token or secrets.token_hex(16)
        self.emulator_args = emulator_args
        self.tune = tune
        self.emulator: EmulatorHandle | None = None
        self.mosquitto: MosquittoBroker | None = None
        self.embedded: EmbeddedBroker | None = None
        self.address: Address | None = None
        self.config: Config | None = None
        self.config_path = workdir / "esim-agent.toml"
        self.daemon: subprocess.Popen[bytes] | None = None
        self.daemon_log = workdir / "daemon.log"
        self.watcher: Watcher | None = None
        self._control: AsyncControlClient | None = None

    @property
    def topic(self) -> str:
        """`<base>/<device_id>`."""
        return f"{BASE_TOPIC}/{self.device_id}"

    @property
    def socket(self) -> str:
        """The daemon's control socket."""
        return str(self.workdir / "state" / "control.sock")

    async def start(self) -> DemoStack:
        """Emulator, broker, config, daemon and watcher, in that order; on any failure what was
        started is stopped again (no orphaned emulator or broker) and the error raised."""
        try:
            return await self._start()
        except BaseException:
            await self.close()
            raise

    async def _start(self) -> DemoStack:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.emulator = await asyncio.to_thread(
            start_emulator, "--scenario", str(self.scenario), *self.emulator_args
        )
        self._control = AsyncControlClient(self.emulator.info["control"])
        await self.start_broker()
        assert self.address is not None
        cfg = default_demo_config(
            self.emulator.info,
            self.address.port,
            self.workdir / "state",
            list(self.iccids),
            device_id=self.device_id,
            command_token=self.command_token,
        )
        self.config = cfg
        text = config_to_toml(cfg)
        if self.tune is not None:
            import tomllib

            data = tomllib.loads(text)
            self.tune(data)
            from agent.config import parse_config

            cfg = parse_config(data, str(self.config_path))
            self.config = cfg
            text = config_to_toml(cfg)
        self.config_path.write_text(text)
        self.watcher = Watcher(self.address, f"{self.topic}/#")
        await self.watcher.__aenter__()
        self.start_daemon()
        return self

    async def start_broker(self) -> None:
        """Mosquitto when installed (or asked for), the embedded broker otherwise."""
        use_mosquitto = self.broker_kind == "mosquitto" or (
            self.broker_kind == "auto" and mosquitto_available()
        )
        if use_mosquitto:
            self.mosquitto = MosquittoBroker(self.workdir / "mosquitto")
            self.mosquitto.workdir.mkdir(parents=True, exist_ok=True)
            await asyncio.to_thread(self.mosquitto.start)
            self.address = Address(self.mosquitto.host, self.mosquitto.port)
        else:
            self.embedded = EmbeddedBroker()
            await self.embedded.start("127.0.0.1", 0)
            self.address = Address("127.0.0.1", self.embedded.port)

    @property
    def broker_name(self) -> str:
        """Which broker runs."""
        return "mosquitto" if self.mosquitto is not None else "embedded"

    def start_daemon(self) -> None:
        """Start `esim-agent run` on the written config."""
        log = self.daemon_log.open("ab")
        self.daemon = subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "--config", str(self.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        log.close()

    async def stop_daemon(self, sig: int = signal.SIGTERM) -> int | None:
        """Signal the daemon and wait for it to exit; returns its exit status."""
        proc, self.daemon = self.daemon, None
        if proc is None:
            return None
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            return await asyncio.wait_for(asyncio.to_thread(proc.wait), DAEMON_STOP_TIMEOUT_S)
        except TimeoutError:
            proc.kill()
            return await asyncio.to_thread(proc.wait)

    async def control(self, cmd: str, **params: Any) -> dict[str, Any]:
        """A request to the emulator's control socket."""
        assert self._control is not None
        return await self._control.call(cmd, **params)

    def mark(self) -> int:
        """A position in the message log: later waits can look only at what came after it."""
        assert self.watcher is not None
        return len(self.watcher.messages)

    async def wait_json(
        self,
        key: str,
        predicate: Callable[[Any], bool],
        timeout: float = 30.0,
        since: int = 0,
    ) -> Any:
        """Wait for a message on `<base>/<device>/<key>` whose JSON satisfies predicate."""
        assert self.watcher is not None
        return await self.watcher.wait_json(f"{self.topic}/{key}", predicate, timeout, since)

    async def wait_transition(
        self,
        predicate: Callable[[dict[str, Any]], bool],
        timeout: float = 60.0,
        since: int = 0,
    ) -> dict[str, Any]:
        """Wait for a finished transition event (after mark `since`) that satisfies predicate."""
        event = await self.wait_json(
            "events",
            lambda e: e.get("type") == "transition" and bool(predicate(e.get("data", {}))),
            timeout,
            since,
        )
        data: dict[str, Any] = event["data"]
        return data

    def transitions(self) -> list[dict[str, Any]]:
        """Every finished transition seen so far, in order."""
        assert self.watcher is not None
        out: list[dict[str, Any]] = []
        for topic, payload, _, _ in self.watcher.messages:
            if topic != f"{self.topic}/events":
                continue
            with contextlib.suppress(ValueError):
                event = json.loads(payload)
                if event.get("type") == "transition":
                    out.append(event["data"])
        return out

    async def close(self) -> None:
        """Stop everything, the daemon first so it can say goodbye on MQTT."""
        with contextlib.suppress(Exception):
            await self.stop_daemon()
        if self.watcher is not None:
            await self.watcher.__aexit__(None, None, None)
        if self.emulator is not None:
            await asyncio.to_thread(self.emulator.stop)
        if self.mosquitto is not None:
            await asyncio.to_thread(self.mosquitto.close)
        if self.embedded is not None:
            await self.embedded.stop()

    async def __aenter__(self) -> DemoStack:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def elapsed_ms(since: float) -> float:
    """Milliseconds since a time.monotonic() reading."""
    return round((time.monotonic() - since) * 1000.0, 1)
