"""Test helpers: run the emulator as a subprocess and talk to it over its pty and control socket."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from types import TracebackType
from typing import Any

from hw_fixtures.control_client import ControlClient

START_TIMEOUT = 20.0


class EmulatorStartError(RuntimeError):
    """The emulator exited or stayed silent before printing its ready line."""


class EmulatorHandle:
    """A running emulator subprocess: ports, modems, control calls; a context manager."""

    def __init__(self, proc: subprocess.Popen[bytes], info: dict[str, Any], log_path: str) -> None:
        self.proc = proc
        self.info = info
        self.log_path = log_path
        self.port: str = info["port"]
        self.control_path: str = info["control"]
        self.modems: list[dict[str, Any]] = info["modems"]
        self.client = ControlClient(self.control_path)

    def modem(self, ident: str = "m0") -> dict[str, Any]:
        """The start-up facts of one modem (ports, symlink, endpoints)."""
        return next(m for m in self.modems if m["id"] == ident)

    def control(self, cmd: str, **params: Any) -> dict[str, Any]:
        """One control request; raises ControlError on {"ok": false}."""
        return self.client.call(cmd, **params)

    def status(self, modem: str = "m0") -> dict[str, Any]:
        """The status of one modem."""
        return self.control("status", modem=modem)

    def log_text(self) -> str:
        """What the emulator wrote to stderr so far."""
        with open(self.log_path, encoding="utf-8", errors="replace") as fh:
            return fh.read()

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, wait, SIGKILL as a last resort; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        with contextlib.suppress(OSError):
            os.unlink(self.log_path)
        return self.proc.returncode

    def __enter__(self) -> EmulatorHandle:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def start_emulator(*args: str, timeout: float = START_TIMEOUT) -> EmulatorHandle:
    """Start `python -m hw_fixtures.emulator *args` and wait for its JSON ready line.

    Loopback endpoints unless the args say `--net`: tests, the demo and the benches run as
    root, where the emulator's own default would be real interfaces."""
    if not any(a == "--net" or a.startswith("--net=") for a in args):
        args = ("--net", "loopback", *args)
    fd, log_path = tempfile.mkstemp(prefix="esim-emu-", suffix=".log")
    # stderr to a file: a pipe nobody drains would stall the emulator once it fills
    with os.fdopen(fd, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "hw_fixtures.emulator", *args],
            stdout=subprocess.PIPE,
            stderr=log_file,
            stdin=subprocess.DEVNULL,
        )
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    buf = b""
    while not buf.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0 or proc.poll() is not None:
            proc.kill()
            proc.wait()
            with open(log_path, encoding="utf-8", errors="replace") as fh:
                text = fh.read()[-2000:]
            os.unlink(log_path)
            raise EmulatorStartError(f"emulator did not start: {text}")
        ready, _, _ = select.select([proc.stdout], [], [], remaining)
        if ready:
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                continue
            buf += chunk
    return EmulatorHandle(proc, json.loads(buf.split(b"\n", 1)[0]), log_path)


class PortReader:
    """Plain os.read/os.write access to an emulated port, with deadline-bound waits."""

    def __init__(self, port: str) -> None:
        self.port = port
        self.fd = os.open(port, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        self.buf = b""

    def close(self) -> None:
        """Close the port."""
        with contextlib.suppress(OSError):
            os.close(self.fd)

    def write(self, data: bytes | str) -> None:
        """Write raw bytes (str is encoded as latin-1)."""
        raw = data.encode("latin-1") if isinstance(data, str) else data
        os.write(self.fd, raw)

    def _fill(self, deadline: float) -> bool:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        ready, _, _ = select.select([self.fd], [], [], remaining)
        if not ready:
            return False
        chunk = os.read(self.fd, 65536)
        if not chunk:
            raise EOFError(f"{self.port}: hung up")
        self.buf += chunk
        return True

    def read_until(self, marker: bytes, timeout: float = 5.0) -> bytes:
        """Bytes up to and including marker; TimeoutError when it does not arrive in time."""
        deadline = time.monotonic() + timeout
        while marker not in self.buf:
            if not self._fill(deadline) and time.monotonic() >= deadline:
                raise TimeoutError(f"{marker!r} not seen; got {self.buf!r}")
        idx = self.buf.index(marker) + len(marker)
        out, self.buf = self.buf[:idx], self.buf[idx:]
        return out

    def drain(self, quiet: float = 0.05) -> bytes:
        """Whatever arrives until the line has been quiet for `quiet` seconds."""
        while self._fill(time.monotonic() + quiet):
            pass
        out, self.buf = self.buf, b""
        return out

    def command(self, line: str, timeout: float = 5.0) -> str:
        """Send line + CR and return everything up to the final result code, decoded."""
        self.write(line + "\r")
        return self.read_final(timeout)

    def read_final(self, timeout: float = 5.0) -> str:
        """Read until a final result line (OK, ERROR, +CME ERROR: ...) ends; decoded text."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.buf.decode("latin-1")
            for final in ("\r\nOK\r\n", "\r\nERROR\r\n"):
                if final in text:
                    idx = text.index(final) + len(final)
                    self.buf = self.buf[idx:]
                    return text[:idx]
            if "+CME ERROR:" in text:
                start = text.index("+CME ERROR:")
                end = text.find("\r\n", start)
                if end >= 0:
                    self.buf = self.buf[end + 2 :]
                    return text[: end + 2]
            if not self._fill(deadline) and time.monotonic() >= deadline:
                raise TimeoutError(f"no final result; got {self.buf!r}")

    def __enter__(self) -> PortReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def wait_for(predicate: Any, timeout: float = 5.0, interval: float = 0.02) -> Any:
    """Poll predicate() until it returns something truthy; TimeoutError after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(interval)
