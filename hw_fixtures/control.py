"""Control socket: JSON lines over a Unix socket, one request object and one reply object per line."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import structlog

log = structlog.get_logger(__name__)

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
#: A streaming request: its first reply, then one line per item until the client goes.
Stream = Callable[[dict[str, Any]], AsyncIterator[dict[str, Any]]]
MAX_REQUEST = 1024 * 1024
IDLE_TIMEOUT = 3600.0


class ControlRequestError(ValueError):
    """A control request is malformed or names something that does not exist."""


def decode_request(line: bytes) -> dict[str, Any]:
    """Parse one request line; ControlRequestError unless it is a JSON object with a 'cmd'."""
    try:
        obj = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ControlRequestError(f"invalid JSON: {exc}") from exc
    if not isinstance(obj, dict) or not isinstance(obj.get("cmd"), str):
        raise ControlRequestError('request must be an object with a string "cmd"')
    return obj


def encode_reply(reply: dict[str, Any]) -> bytes:
    """One reply line."""
    return json.dumps(reply, separators=(",", ":"), default=str).encode() + b"\n"


class ControlServer:
    """Serves a handler on a Unix socket; errors become {"ok": false, "error": ...}."""

    def __init__(
        self, path: str, handler: Handler, streams: dict[str, Stream] | None = None
    ) -> None:
        self.path = path
        self._handler = handler
        self._streams = streams or {}
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        """Bind the socket (replacing a stale one) and start serving."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self._server = await asyncio.start_unix_server(self._serve, self.path, limit=MAX_REQUEST)

    async def close(self) -> None:
        """Stop serving and remove the socket file."""
        if self._server is not None:
            self._server.close()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                line = await asyncio.wait_for(reader.readline(), IDLE_TIMEOUT)
                if not line:
                    break
                if not line.strip():
                    continue
                stream = self._stream_for(line)
                if stream is not None:
                    # the connection now belongs to the stream until the client hangs up
                    async for item in stream:
                        writer.write(encode_reply(item))
                        await asyncio.wait_for(writer.drain(), 10.0)
                    break
                reply = await self._answer(line)
                writer.write(encode_reply(reply))
                await asyncio.wait_for(writer.drain(), 10.0)
        except (TimeoutError, ConnectionError, ValueError):
            pass
        finally:
            writer.close()

    def _stream_for(self, line: bytes) -> AsyncIterator[dict[str, Any]] | None:
        try:
            request = decode_request(line)
        except ControlRequestError:
            return None
        factory = self._streams.get(request["cmd"])
        return factory(request) if factory is not None else None

    async def _answer(self, line: bytes) -> dict[str, Any]:
        try:
            request = decode_request(line)
            reply = await self._handler(request)
        except (ControlRequestError, ValueError, KeyError, TypeError) as exc:
            log.info("emu_control_rejected", error=str(exc))
            return {"ok": False, "error": str(exc)}
        except Exception as exc:  # a failing request is reported, never a dropped connection
            log.exception("emu_control_failed", error=str(exc))
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        return {"ok": True, **reply}
