"""Log lines reach journald with their priority; a terminal sees the same lines as before."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from pathlib import Path

SNIPPET = (
    "from agent import log; log.configure('debug'); import structlog; "
    "l = structlog.get_logger(); l.info('an_info', k=1); l.warning('a_warning'); "
    "l.error('an_error'); l.debug('a_debug')"
)


def run_logging(stderr_path: Path, journal_stream: str | None) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    with stderr_path.open("wb") as err:
        if journal_stream == "match":
            st = os.fstat(err.fileno())
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        elif journal_stream is not None:
            env["JOURNAL_STREAM"] = journal_stream
        subprocess.run([sys.executable, "-c", SNIPPET], stderr=err, env=env, check=True, timeout=60)
    return stderr_path.read_text().splitlines()


def test_journald_stream_gets_syslog_priorities(tmp_path: Path) -> None:
    lines = run_logging(tmp_path / "err", "match")
    prefixes = [line[:3] for line in lines]
    assert prefixes == ["<6>", "<4>", "<3>", "<7>"]
    events = [json.loads(line[3:])["event"] for line in lines]
    assert events == ["an_info", "a_warning", "an_error", "a_debug"]


def test_no_prefix_when_stderr_is_not_the_journal(tmp_path: Path) -> None:
    # JOURNAL_STREAM inherited from a parent but stderr redirected elsewhere: plain JSON lines.
    lines = run_logging(tmp_path / "err", "1:1")
    assert [json.loads(line)["level"] for line in lines] == ["info", "warning", "error", "debug"]
    assert run_logging(tmp_path / "err2", None)[0].startswith("{")


def test_terminal_output_is_human_and_unprefixed() -> None:
    leader, follower = pty.openpty()
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    try:
        proc = subprocess.Popen([sys.executable, "-c", SNIPPET], stderr=follower, env=env)
        os.close(follower)
        out = b""
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # EIO: the child closed the pty
                break
            if not chunk:
                break
            out += chunk
        assert proc.wait(timeout=60) == 0
    finally:
        os.close(leader)
    lines = out.decode().splitlines()
    assert len(lines) == 4
    assert not any(line.startswith(("<", "{")) for line in lines)
    assert "[warning  ] a_warning" in lines[1]
