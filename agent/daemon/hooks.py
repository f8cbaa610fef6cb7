"""Transition hooks: run operator executables with the event as JSON on stdin, never via a shell."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Mapping

import msgspec
import structlog

log = structlog.get_logger(__name__)

STDERR_TAIL_BYTES = 2048
# After SIGKILL the process is gone within milliseconds; this only bounds a kernel oddity.
REAP_TIMEOUT_S = 5.0


class HookResult(msgspec.Struct, kw_only=True):
    """How one hook ended: exit status (None if it never ran or was killed), stderr tail, error."""

    path: str
    returncode: int | None
    stderr_tail: str
    timed_out: bool = False
    error: str | None = None
    duration_ms: float = 0.0

    @property
    def ok(self) -> bool:
        """True when the hook ran to completion and exited 0."""
        return self.returncode == 0 and not self.timed_out and self.error is None


def _tail(data: bytes) -> str:
    return data[-STDERR_TAIL_BYTES:].decode("utf-8", errors="replace")


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    # Hooks are started in their own session, so the group id is the hook's pid: this also
    # reaches anything the hook spawned and left holding our pipes.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


async def run_hook(path: str, payload: bytes, timeout: float) -> HookResult:
    """Run one executable with payload on stdin; never raises for hook failures."""
    start = time.perf_counter()

    def elapsed() -> float:
        return (time.perf_counter() - start) * 1000.0

    try:
        proc = await asyncio.create_subprocess_exec(
            path,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        log.error("hook_start_failed", hook=path, error=reason)
        return HookResult(path=path, returncode=None, stderr_tail="", error=reason)
    try:
        async with asyncio.timeout(timeout):
            _, stderr = await proc.communicate(payload)
    except TimeoutError:
        _kill_group(proc)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(REAP_TIMEOUT_S):
                await proc.wait()
        log.error("hook_timed_out", hook=path, timeout=timeout, pid=proc.pid)
        return HookResult(
            path=path,
            returncode=None,
            stderr_tail="",
            timed_out=True,
            error=f"timed out after {timeout:g}s",
            duration_ms=elapsed(),
        )
    except BaseException:
        _kill_group(proc)
        raise
    result = HookResult(
        path=path, returncode=proc.returncode, stderr_tail=_tail(stderr), duration_ms=elapsed()
    )
    if result.returncode == 0:
        log.info("hook_ran", hook=path, duration_ms=round(result.duration_ms, 1))
    else:
        log.warning(
            "hook_failed", hook=path, returncode=result.returncode, stderr=result.stderr_tail
        )
    return result


async def run_hooks(
    executables: list[str], event: Mapping[str, object], timeout: float
) -> list[HookResult]:
    """Run each hook in order, one at a time, each with its own timeout; results in the same order."""
    payload = msgspec.json.encode(event) + b"\n"
    return [await run_hook(path, payload, timeout) for path in executables]


class HookQueue:
    """Runs the hooks of consecutive transitions in order, one transition at a time: a slow
    hook delays the next transition's hooks instead of racing them."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[tuple[tuple[str, ...], dict[str, object], float]] = (
            asyncio.Queue()
        )
        self.done = 0

    def submit(self, executables: list[str], event: Mapping[str, object], timeout: float) -> None:
        """Queue one transition's hooks (nothing to do without executables)."""
        if executables:
            self._queue.put_nowait((tuple(executables), dict(event), timeout))

    @property
    def pending(self) -> int:
        """Transitions whose hooks have not started yet."""
        return self._queue.qsize()

    async def run(self) -> None:
        """Work the queue until cancelled."""
        while True:
            executables, event, timeout = await self._queue.get()
            try:
                await run_hooks(list(executables), event, timeout)
            finally:
                self.done += 1
                self._queue.task_done()
