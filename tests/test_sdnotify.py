"""sd_notify against a real AF_UNIX datagram socket standing in for systemd."""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.daemon import sdnotify


@pytest.fixture
def manager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify.sock"
    sock.bind(str(path))
    sock.settimeout(2.0)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield sock
    sock.close()


def test_states_arrive_as_datagrams(manager: socket.socket) -> None:
    assert sdnotify.ready("probing modems")
    assert manager.recv(4096) == b"READY=1\nSTATUS=probing modems"
    assert sdnotify.status("2 layers up\nno newline injection")
    assert manager.recv(4096) == b"STATUS=2 layers up no newline injection"
    assert sdnotify.watchdog()
    assert manager.recv(4096) == b"WATCHDOG=1"
    assert sdnotify.stopping()
    assert manager.recv(4096) == b"STOPPING=1"


def test_reloading_carries_monotonic_usec(manager: socket.socket) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert sdnotify.reloading()
    lines = manager.recv(4096).decode().split("\n")
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert lines[0] == "RELOADING=1"
    key, _, value = lines[1].partition("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after


def test_abstract_namespace_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"esim-agent-test-{secrets.token_hex(6)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(2.0)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.ready()
        assert sock.recv(4096) == b"READY=1"


def test_noop_without_notify_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.ready() is False
    assert sdnotify.notify("WATCHDOG=1") is False


def test_unreachable_socket_is_reported_not_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone.sock"))
    assert sdnotify.ready() is False


@pytest.mark.parametrize(
    ("usec", "pid", "expect"),
    [
        (None, None, None),
        ("5000000", None, 5.0),
        ("5000000", "self", 5.0),
        ("5000000", "1", None),
        ("junk", None, None),
        ("0", None, None),
    ],
)
def test_watchdog_interval(
    monkeypatch: pytest.MonkeyPatch, usec: str | None, pid: str | None, expect: float | None
) -> None:
    for key, value in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", pid)):
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, str(os.getpid()) if value == "self" else value)
    assert sdnotify.watchdog_interval() == expect


async def test_run_watchdog_pets_while_alive(
    manager: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "100000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    manager.setblocking(False)
    loop = asyncio.get_running_loop()
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(sdnotify.run_watchdog(lambda: True))
        async with asyncio.timeout(5.0):
            assert await loop.sock_recv(manager, 64) == b"WATCHDOG=1"
            assert await loop.sock_recv(manager, 64) == b"WATCHDOG=1"
        task.cancel()


async def test_run_watchdog_returns_when_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    async with asyncio.timeout(1.0):
        await sdnotify.run_watchdog()
