"""End to end: 1,100 idle control connections against a daemon limited to 1,024 descriptors.

The daemon caps its control connections well below its descriptor limit, so probes, modem ports
and MQTT keep their descriptors: it still fails over (the new layer's probes pass) and logs no
traceback storm.
"""

from __future__ import annotations

import asyncio
import resource
import socket
import struct
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from agent.daemon.control import control_call
from agent.demo.stack import DemoStack, mosquitto_available

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not mosquitto_available(), reason="needs mosquitto (apt install mosquitto)"),
]

STEP_S = 60.0
FLOOD = 1_100
DAEMON_NOFILE = 1_024
FLOOD_DEADLINE_S = 30.0


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[DemoStack]:
    s = DemoStack(tmp_path / "stack", broker="mosquitto")
    try:
        await s.start()
        await s.wait_json("state", lambda x: x.get("active_layer") == "primary", STEP_S)
        yield s
    finally:
        await s.close()


@pytest.fixture
def enough_descriptors() -> Any:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = FLOOD + 512
    if hard != resource.RLIM_INFINITY and hard < want:
        pytest.skip(f"the test itself needs {want} descriptors")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def flood(path: str) -> list[socket.socket]:
    """Open FLOOD connections one after the other and keep them open (each connect completes
    only once the daemon has room in its backlog, i.e. has accepted the ones before)."""
    held = []
    deadline = time.monotonic() + FLOOD_DEADLINE_S
    for _ in range(FLOOD):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # Blocking, so connect() waits for room in the backlog (a socket timeout would make it
        # fail at once with EAGAIN); SO_SNDTIMEO bounds that wait.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", 2, 0))
        held.append(s)
        try:
            s.connect(path)
        except OSError:
            if time.monotonic() > deadline:
                break
    return held


@pytest.mark.usefixtures("enough_descriptors")
async def test_connection_flood_at_the_descriptor_limit_does_not_stop_failover(
    stack: DemoStack,
) -> None:
    assert stack.daemon is not None
    resource.prlimit(stack.daemon.pid, resource.RLIMIT_NOFILE, (DAEMON_NOFILE, DAEMON_NOFILE))
    held = await asyncio.to_thread(flood, stack.socket)
    try:
        mark = stack.mark()
        await stack.control("link", modem="m0", state="down")
        failover = await stack.wait_transition(lambda d: d["to_layer"] == "failover", STEP_S, mark)
        assert failover["outcome"] == "switched"
        await stack.wait_json("health/failover", lambda h: h["status"] == "up", STEP_S)
    finally:
        for s in held:
            s.close()
    assert stack.daemon.poll() is None
    status = await control_call(stack.socket, "status", timeout=30)
    assert isinstance(status, dict)
    assert status["active_layer"] == "failover"
    log = stack.daemon_log.read_text(errors="replace")
    assert "Traceback" not in log
    assert "control_connections_capped" in log
