"""Supervised tasks: a crash is logged and restarted, a clean return ends the task."""

from __future__ import annotations

import asyncio

import pytest

from agent.daemon import supervisor as sup
from agent.daemon.supervisor import Supervisor


async def test_a_crashed_task_is_restarted_and_recorded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sup, "BACKOFF_INITIAL_S", 0.01)
    runs = 0
    third_run = asyncio.Event()

    async def flaky() -> None:
        nonlocal runs
        runs += 1
        if runs < 3:
            raise RuntimeError(f"boom {runs}")
        third_run.set()
        await asyncio.Event().wait()  # then stays up

    s = Supervisor()
    record = s.start("flaky", flaky)
    async with asyncio.timeout(5):
        await third_run.wait()
    assert record.restarts == 2
    assert record.last_error == "RuntimeError: boom 2"
    assert record.running
    snap = s.snapshot()
    assert snap == [
        {"name": "flaky", "running": True, "restarts": 2, "last_error": "RuntimeError: boom 2"}
    ]
    await s.stop()
    assert record.task is not None
    assert record.task.done()


async def test_a_task_that_returns_is_not_restarted() -> None:
    calls = 0

    async def once() -> None:
        nonlocal calls
        calls += 1

    s = Supervisor()
    record = s.start("once", once)
    assert record.task is not None
    await asyncio.wait_for(record.task, 5)
    assert calls == 1
    assert record.restarts == 0
    assert not record.running
