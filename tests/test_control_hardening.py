"""Control socket transport under hostile peers: credentials, caps, timeouts, nesting, fields."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.daemon.control import CommandTable, ControlServer, control_call
from agent.limits import json_depth

NOBODY = 65534


class Calls:
    """Handlers that record that they ran."""

    def __init__(self) -> None:
        self.ran: list[str] = []

    async def status(self, args: dict[str, Any]) -> object:
        self.ran.append("status")
        return {"ok": True}

    async def switch(self, args: dict[str, Any]) -> object:
        self.ran.append("switch")
        return {"iccid": args["iccid"]}


@pytest.fixture
def calls() -> Calls:
    return Calls()


async def serve(tmp_path: Path, calls: Calls, **kwargs: Any) -> ControlServer:
    table = CommandTable({"status": calls.status, "switch": calls.switch})
    server = ControlServer(str(tmp_path / "control.sock"), table, **kwargs)
    await server.start()
    return server


@pytest.fixture
async def server(tmp_path: Path, calls: Calls) -> AsyncIterator[ControlServer]:
    srv = await serve(tmp_path, calls, idle_timeout=0.5, max_connections=3)
    yield srv
    await srv.close()


async def exchange(path: str, data: bytes) -> dict[str, Any]:
    reader, writer = await asyncio.open_unix_connection(path, limit=1 << 20)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(10):
            line = await reader.readline()
    finally:
        writer.close()
    result: dict[str, Any] = json.loads(line)
    return result


async def test_deep_nesting_gets_a_typed_error(server: ControlServer) -> None:
    deep = b'{"id": 7, "cmd": "status", "args": {"x": ' + b"[" * 30_000 + b"]" * 30_000 + b"}}\n"
    reply = await exchange(server.path, deep)
    assert reply["ok"] is False
    assert reply["error"]["type"] == "BadRequest"
    assert "nested" in reply["error"]["message"]
    # The server still answers afterwards.
    assert await control_call(server.path, "status") == {"ok": True}


async def test_missing_argument_is_a_bad_request_naming_it(
    server: ControlServer, calls: Calls
) -> None:
    reply = await exchange(server.path, b'{"id": 1, "cmd": "switch", "args": {}}\n')
    assert reply["error"] == {"type": "BadRequest", "message": "missing argument 'iccid'"}


@pytest.mark.parametrize("data", [b"", b'{"id": 1, "cmd": "sta'])
async def test_idle_and_half_sent_requests_are_hung_up(server: ControlServer, data: bytes) -> None:
    reader, writer = await asyncio.open_unix_connection(server.path)
    writer.write(data)
    await writer.drain()
    async with asyncio.timeout(10):
        rest = await reader.read()
    writer.close()
    assert rest == b""
    assert server.connections == 0


async def test_connections_over_the_cap_are_refused_at_once(server: ControlServer) -> None:
    held = [await asyncio.open_unix_connection(server.path) for _ in range(3)]
    await asyncio.sleep(0)
    reader, writer = await asyncio.open_unix_connection(server.path)
    async with asyncio.timeout(10):
        refused = json.loads(await reader.readline())
        assert await reader.read() == b""
    writer.close()
    assert refused["error"]["type"] == "Busy"
    for _, w in held:
        w.close()
    async with asyncio.timeout(10):
        while server.connections:  # noqa: ASYNC110 - the server notices the hang-ups on its own
            await asyncio.sleep(0.01)
    assert await control_call(server.path, "status") == {"ok": True}


def test_json_depth_counts_only_structure() -> None:
    assert json_depth(b'{"a": "[[[[", "b": [1, {"c": []}]}') == 4


def test_json_depth_ignores_brackets_in_strings() -> None:
    assert json_depth(b'{"a": "[[[[\\"[[", "b": [1, {"c": []}]}') == 4


# A refused peer is answered and hung up on at once, maybe before its request is sent: the
# send may fail (EPIPE), the answer is still there to read.
CLIENT = """
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
try:
    s.sendall(b'{"id": 1, "cmd": "status", "args": {}}\\n')
except OSError:
    pass
s.settimeout(10)
print(s.makefile("rb").readline().decode(), end="")
"""


def as_user(uid: int, gid: int) -> None:
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)


# The system interpreter: the test venv may live where another user cannot execute it.
SYSTEM_PYTHON = shutil.which("python3", path="/usr/bin:/bin") or "/usr/bin/python3"


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory other users can reach (pytest's own tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="esa-ctl-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def client_as(path: str, uid: int, gid: int) -> dict[str, Any]:
    proc = await asyncio.to_thread(
        subprocess.run,
        [SYSTEM_PYTHON, "-c", CLIENT, path],
        capture_output=True,
        timeout=30,
        check=False,
        preexec_fn=lambda: as_user(uid, gid),
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


@pytest.mark.skipif(os.geteuid() != 0, reason="changing user needs root")
async def test_peers_other_than_root_or_the_service_user_or_group_are_refused(
    shared_dir: Path, calls: Calls
) -> None:
    srv = await serve(shared_dir, calls, mode=0o666, allowed_gids=frozenset({4242}))
    try:
        stranger = await client_as(srv.path, NOBODY, NOBODY)
        member = await client_as(srv.path, NOBODY, 4242)
        root = await client_as(srv.path, 0, 0)
    finally:
        await srv.close()
    assert stranger["error"]["type"] == "PermissionDenied"
    assert member["ok"] is True
    assert root["ok"] is True
    assert calls.ran == ["status", "status"]
