"""Control socket: a real Unix socket in tmp_path, the real server and the real client."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from agent.daemon.control import (
    CommandTable,
    ControlError,
    ControlServer,
    ControlTimeout,
    DaemonAlreadyRunning,
    DaemonNotRunning,
    control_call,
)
from agent.errors import Es10Error
from agent.models import ModemInfo, SimStatus


class Daemon:
    """The commands a test daemon offers; `release` un-blocks the slow one."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.entered = asyncio.Event()
        self.table = CommandTable(
            {
                "status": self.status,
                "profile_enable": self.profile_enable,
                "slow": self.slow,
                "crash": self.crash,
                "unencodable": self.unencodable,
                "echo": self.echo,
            }
        )

    async def status(self, args: dict[str, Any]) -> object:
        return {"modem": ModemInfo(sim=SimStatus(state="ready", iccid="8944"))}

    async def profile_enable(self, args: dict[str, Any]) -> object:
        raise Es10Error("EnableProfile", 1, "iccidOrAidNotFound")

    async def slow(self, args: dict[str, Any]) -> object:
        self.entered.set()
        async with asyncio.timeout(10):
            await self.release.wait()
        return "done"

    async def crash(self, args: dict[str, Any]) -> object:
        raise KeyError("oops")

    async def unencodable(self, args: dict[str, Any]) -> object:
        return {"socket": object()}

    async def echo(self, args: dict[str, Any]) -> object:
        return args


def exists(path: str) -> bool:
    return Path(path).exists()


def read(path: str) -> str:
    return Path(path).read_text()


def write(path: str, text: str) -> None:
    Path(path).write_text(text)


@pytest.fixture
def sock_path(tmp_path: Path) -> str:
    return str(tmp_path / "c.sock")


@pytest.fixture
async def daemon(sock_path: str) -> AsyncIterator[Daemon]:
    d = Daemon()
    server = ControlServer(sock_path, d.table, max_line=4096)
    await server.start()
    yield d
    d.release.set()
    await server.close()


async def raw_exchange(path: str, lines: list[bytes]) -> list[dict[str, Any]]:
    async with asyncio.timeout(5):
        reader, writer = await asyncio.open_unix_connection(path)
        replies = []
        for line in lines:
            writer.write(line)
            await writer.drain()
            replies.append(json.loads(await reader.readline()))
        writer.close()
    return replies


async def test_status_round_trip_encodes_structs(daemon: Daemon, sock_path: str) -> None:
    result = await control_call(sock_path, "status", {}, timeout=5)
    assert isinstance(result, dict)
    assert result["modem"]["sim"] == {"state": "ready", "iccid": "8944"}
    assert await control_call(sock_path, "echo", {"iccid": "894400", "n": [1, 2]}) == {
        "iccid": "894400",
        "n": [1, 2],
    }


async def test_error_replies_raise_typed_control_errors(daemon: Daemon, sock_path: str) -> None:
    with pytest.raises(ControlError) as info:
        await control_call(sock_path, "profile_enable", {"iccid": "1"})
    assert info.value.error_type == "Es10Error"
    assert "iccidOrAidNotFound" in info.value.message

    with pytest.raises(ControlError) as info:
        await control_call(sock_path, "reboot_universe")
    assert info.value.error_type == "UnknownCommand"
    assert "status" in info.value.message

    with pytest.raises(ControlError) as info:
        await control_call(sock_path, "crash")
    assert info.value.error_type == "InternalError"

    with pytest.raises(ControlError) as info:
        await control_call(sock_path, "unencodable")
    assert info.value.error_type == "InternalError"
    # The server is still serving after all of that.
    assert await control_call(sock_path, "echo", {"a": 1}) == {"a": 1}


async def test_malformed_requests_keep_the_connection(daemon: Daemon, sock_path: str) -> None:
    replies = await raw_exchange(
        sock_path,
        [
            b"this is not json\n",
            b'{"id": 7, "args": {}}\n',
            b'{"id": "x", "cmd": "echo", "args": [1]}\n',
            b'{"id": 8, "cmd": "echo", "args": {"k": "v"}}\n',
            b'{"id": 9, "cmd": "echo"}\n',
        ],
    )
    assert replies[0]["ok"] is False
    assert replies[0]["error"]["type"] == "BadRequest"
    assert replies[0]["id"] is None
    assert (replies[1]["id"], replies[1]["error"]["type"]) == (7, "BadRequest")
    assert (replies[2]["id"], replies[2]["error"]["type"]) == ("x", "BadRequest")
    assert replies[3] == {"id": 8, "ok": True, "result": {"k": "v"}}
    assert replies[4] == {"id": 9, "ok": True, "result": {}}


async def test_over_long_line_is_refused_and_closed(daemon: Daemon, sock_path: str) -> None:
    async with asyncio.timeout(5):
        reader, writer = await asyncio.open_unix_connection(sock_path)
        writer.write(b'{"cmd": "echo", "args": {"pad": "' + b"x" * 10_000)
        await writer.drain()
        reply = json.loads(await reader.readline())
        assert reply["error"]["type"] == "LineTooLong"
        assert await reader.read() == b""  # server hung up
        writer.close()
    assert await control_call(sock_path, "echo") == {}


async def test_socket_mode_and_removal_on_close(sock_path: str) -> None:
    server = ControlServer(sock_path, CommandTable())
    await server.start()
    st = os.stat(sock_path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o660
    await server.close()
    assert not exists(sock_path)
    with pytest.raises(DaemonNotRunning):
        await control_call(sock_path, "status")


async def test_stale_socket_is_replaced_but_a_live_one_is_not(sock_path: str) -> None:
    leftover = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    leftover.bind(sock_path)
    leftover.close()  # the file stays, nobody listens: a crashed daemon's socket
    with pytest.raises(DaemonNotRunning):
        await control_call(sock_path, "status")

    async with ControlServer(sock_path, Daemon().table):
        assert await control_call(sock_path, "echo", {"x": 1}) == {"x": 1}
        with pytest.raises(DaemonAlreadyRunning):
            await ControlServer(sock_path, CommandTable()).start()
        # The refused second server did not take the live socket away.
        assert await control_call(sock_path, "echo") == {}


async def test_refuses_to_replace_a_regular_file(sock_path: str) -> None:
    write(sock_path, "precious")
    with pytest.raises(ControlError, match="not a socket"):
        await ControlServer(sock_path, CommandTable()).start()
    assert read(sock_path) == "precious"


async def test_client_timeout_and_concurrent_connections(daemon: Daemon, sock_path: str) -> None:
    async with asyncio.TaskGroup() as tg:
        slow = tg.create_task(control_call(sock_path, "slow", timeout=10))
        async with asyncio.timeout(5):
            await daemon.entered.wait()
        # Another client is served while the first one's command is still running.
        assert await control_call(sock_path, "echo", {"y": 2}, timeout=5) == {"y": 2}
        with pytest.raises(ControlTimeout):
            await control_call(sock_path, "slow", timeout=0.2)
        daemon.release.set()
    assert slow.result() == "done"


async def test_no_daemon(tmp_path: Path) -> None:
    with pytest.raises(DaemonNotRunning):
        await control_call(str(tmp_path / "absent.sock"), "status", timeout=1)
