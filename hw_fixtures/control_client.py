"""Clients for the emulator's control socket (JSON lines over a Unix socket)."""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

DEFAULT_TIMEOUT = 10.0


class ControlError(RuntimeError):
    """The emulator answered {"ok": false, "error": ...}."""


def _check(reply: Any) -> dict[str, Any]:
    if not isinstance(reply, dict):
        raise ControlError(f"malformed reply: {reply!r}")
    if not reply.get("ok"):
        raise ControlError(str(reply.get("error", "unknown error")))
    return reply


class ControlClient:
    """Synchronous client: one connection per call, so it is safe from any thread."""

    def __init__(self, path: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.path = path
        self.timeout = timeout

    def call(self, cmd: str, **params: Any) -> dict[str, Any]:
        """Send one request and return the reply; ControlError when it says ok=false."""
        request = json.dumps({"cmd": cmd, **params}).encode() + b"\n"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(self.timeout)
            sock.connect(self.path)
            sock.sendall(request)
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    raise ControlError("emulator closed the control connection")
                buf += chunk
        return _check(json.loads(buf))


class AsyncControlClient:
    """asyncio client with the same call() contract."""

    def __init__(self, path: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.path = path
        self.timeout = timeout

    async def call(self, cmd: str, **params: Any) -> dict[str, Any]:
        """Send one request and return the reply; ControlError when it says ok=false."""
        request = json.dumps({"cmd": cmd, **params}).encode() + b"\n"
        reader, writer = await asyncio.wait_for(
            asyncio.open_unix_connection(self.path, limit=4 * 1024 * 1024), self.timeout
        )
        try:
            writer.write(request)
            await asyncio.wait_for(writer.drain(), self.timeout)
            line = await asyncio.wait_for(reader.readline(), self.timeout)
        finally:
            writer.close()
        if not line:
            raise ControlError("emulator closed the control connection")
        return _check(json.loads(line))
