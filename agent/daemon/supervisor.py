"""Supervised asyncio tasks: a crashed task is logged and restarted with capped, jittered backoff."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import structlog

from agent.backoff import Backoff

log = structlog.get_logger(__name__)

BACKOFF_INITIAL_S = 0.5
BACKOFF_MAX_S = 30.0
#: A task that ran this long before crashing starts its backoff afresh.
HEALTHY_RUN_S = 60.0


@dataclass
class TaskRecord:
    """What the supervisor knows of one named task (shown by `esim-agent status`)."""

    name: str
    restarts: int = 0
    last_error: str | None = None
    running: bool = False
    task: asyncio.Task[None] | None = field(default=None, repr=False)


class Supervisor:
    """Runs named coroutine factories forever; never lets one vanish silently."""

    def __init__(self) -> None:
        self.records: dict[str, TaskRecord] = {}
        self._stopping = False

    def start(self, name: str, factory: Callable[[], Awaitable[None]]) -> TaskRecord:
        """Start factory() under supervision; a normal return ends it, an exception restarts it."""
        record = TaskRecord(name=name)
        self.records[name] = record
        record.task = asyncio.create_task(self._run(record, factory), name=name)
        return record

    async def _run(self, record: TaskRecord, factory: Callable[[], Awaitable[None]]) -> None:
        backoff = Backoff(BACKOFF_INITIAL_S, BACKOFF_MAX_S)
        loop = asyncio.get_running_loop()
        while not self._stopping:
            started = loop.time()
            record.running = True
            try:
                await factory()
            except asyncio.CancelledError:
                record.running = False
                raise
            except Exception as exc:
                record.running = False
                record.restarts += 1
                record.last_error = f"{type(exc).__name__}: {exc}"
                if loop.time() - started > HEALTHY_RUN_S:
                    backoff.reset()
                wait = backoff.next()
                log.error(
                    "task_crashed",
                    task=record.name,
                    error=record.last_error,
                    restarts=record.restarts,
                    restart_in_s=round(wait, 2),
                    exc_info=exc,
                )
                await asyncio.sleep(wait)
                continue
            record.running = False
            log.info("task_finished", task=record.name)
            return

    async def stop_task(self, name: str, timeout: float = 10.0) -> None:
        """Cancel one named task and wait for it (bounded); unknown names are ignored."""
        record = self.records.pop(name, None)
        if record is None or record.task is None:
            return
        record.task.cancel()
        await asyncio.wait([record.task], timeout=timeout)
        record.running = False

    async def stop(self, timeout: float = 10.0) -> None:
        """Cancel every task and wait for them (bounded)."""
        self._stopping = True
        tasks = [r.task for r in self.records.values() if r.task is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)

    def snapshot(self) -> list[dict[str, object]]:
        """Task names, state, restart counts and last errors."""
        return [
            {
                "name": r.name,
                "running": r.running,
                "restarts": r.restarts,
                "last_error": r.last_error,
            }
            for r in self.records.values()
        ]
