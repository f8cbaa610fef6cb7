"""Transition hooks run real scripts: JSON on stdin, exit status, stderr tail, kill on timeout."""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

from agent.daemon.hooks import STDERR_TAIL_BYTES, run_hooks


def script(tmp_path: Path, name: str, body: str, mode: int = 0o755) -> str:
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(mode)
    return str(path)


def read(path: str | Path) -> str:
    return Path(path).read_text()


async def test_hook_gets_event_json_on_stdin_and_runs_in_order(tmp_path: Path) -> None:
    out = tmp_path / "seen"
    first = script(tmp_path, "first", f'cat > "{out}.1"; echo one >> "{out}.order"\n')
    second = script(tmp_path, "second", f'cat > "{out}.2"; echo two >> "{out}.order"\n')
    event = {"event": "layer_change", "layer": "wwan0", "state": "down", "n": 3}
    results = await run_hooks([first, second], event, timeout=5.0)
    assert [r.ok for r in results] == [True, True]
    assert [r.path for r in results] == [first, second]
    assert json.loads(read(f"{out}.1")) == event
    assert json.loads(read(f"{out}.2")) == event
    assert read(f"{out}.order").split() == ["one", "two"]


async def test_hook_exit_status_and_stderr_tail(tmp_path: Path) -> None:
    noisy = script(
        tmp_path,
        "noisy",
        # Far more stderr than the tail keeps, then a recognisable last line and exit 3.
        "i=0; while [ $i -lt 400 ]; do echo 'xxxxxxxxxxxxxxxxxxxxxxxx' >&2; i=$((i+1)); done\n"
        "echo 'route add failed' >&2\nexit 3\n",
    )
    (result,) = await run_hooks([noisy], {"event": "x"}, timeout=5.0)
    assert result.returncode == 3
    assert not result.ok
    assert not result.timed_out
    assert result.stderr_tail.endswith("route add failed\n")
    assert len(result.stderr_tail) <= STDERR_TAIL_BYTES


async def test_hook_that_ignores_stdin_is_fine(tmp_path: Path) -> None:
    quiet = script(tmp_path, "quiet", "exit 0\n")
    (result,) = await run_hooks([quiet], {"event": "x", "blob": "y" * 200_000}, timeout=5.0)
    assert result.ok


async def test_hook_timeout_kills_it_and_its_children(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    hang = script(tmp_path, "hang", f'sleep 30 & echo $! > "{pidfile}"\nwait\n')
    after = script(tmp_path, "after", "exit 0\n")
    start = time.monotonic()
    results = await run_hooks([hang, after], {"event": "x"}, timeout=0.5)
    assert time.monotonic() - start < 5.0
    assert results[0].timed_out
    assert results[0].returncode is None
    assert not results[0].ok
    assert results[1].ok  # one hung hook does not stop the next
    child = int(read(pidfile))
    try:
        os.kill(child, 0)
        # A killed child may linger briefly as a zombie of init; it must at least be dying.
        status = read(f"/proc/{child}/stat").split(")")[1].split()[0]
        assert status in ("Z", "X")
    except (ProcessLookupError, FileNotFoundError):
        pass


async def test_missing_and_non_executable_hooks_are_errors_not_crashes(tmp_path: Path) -> None:
    not_exec = script(tmp_path, "plain", "exit 0\n", mode=stat.S_IRUSR | stat.S_IWUSR)
    missing = str(tmp_path / "nope")
    good = script(tmp_path, "good", "exit 0\n")
    results = await run_hooks([missing, not_exec, good], {"event": "x"}, timeout=5.0)
    assert [r.ok for r in results] == [False, False, True]
    assert results[0].error is not None
    assert "no such file" in results[0].error.lower()
    assert results[1].error is not None
    assert "permission denied" in results[1].error.lower()


async def test_hook_is_not_run_through_a_shell(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    (result,) = await run_hooks([f"true; touch {marker}"], {"event": "x"}, timeout=5.0)
    assert not result.ok
    assert not marker.exists()
