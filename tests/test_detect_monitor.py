"""LayerMonitor driven by evidence, against real probes on loopback servers that stop answering."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable

import pytest
from msgspec.structs import replace

from agent.health.detect import Evidence
from agent.health.icmp import IcmpProbe, build_echo, icmp_checksum, match_echo_reply
from agent.health.layer import LayerHealth, ModemSignals, Thresholds
from agent.health.monitor import LayerMonitor
from agent.health.probes import HttpProbe, ProbeResult
from agent.health.wire import exchange_bytes

DEADLINE = 15.0
HOUR = 3600.0
# Generous for loopback on a loaded machine; the silent server makes every round use all of it.
PROBE_TIMEOUT = 1.0


class Http204:
    """An HTTP server answering 204 until `silent` is set; then it accepts and says nothing."""

    def __init__(self) -> None:
        self.silent = False
        self._server: asyncio.Server | None = None
        self.port = 0
        self._held: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        if self.silent:
            self._held.append(writer)  # the silent failure: the packets go nowhere
            return
        writer.write(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    async def stop(self) -> None:
        for w in self._held:
            w.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


class CountingProbe:
    """A real probe that counts its rounds and wakes waiters after each."""

    def __init__(self, inner: HttpProbe) -> None:
        self.inner = inner
        self.kind, self.target, self.timeout = inner.kind, inner.target, inner.timeout
        self.request = inner.request
        self.tls = False
        self.host = inner.host
        self.results: list[ProbeResult] = []
        self.ran = asyncio.Event()

    async def run(self) -> ProbeResult:
        result = await self.inner.run()
        self.results.append(result)
        self.ran.set()
        return result

    async def wait_runs(self, n: int) -> None:
        async with asyncio.timeout(DEADLINE):
            while len(self.results) < n:
                self.ran.clear()
                await self.ran.wait()


class Changes:
    def __init__(self) -> None:
        self.seen: list[LayerHealth] = []
        self._event = asyncio.Event()

    def __call__(self, _name: str, health: LayerHealth) -> None:
        self.seen.append(health)
        self._event.set()

    async def wait_for(self, state: str, after: int = 0) -> LayerHealth:
        async with asyncio.timeout(DEADLINE):
            while True:
                for health in self.seen[after:]:
                    if health.state == state:
                        return health
                self._event.clear()
                await self._event.wait()


async def until(monitor: LayerMonitor, condition: Callable[[], bool]) -> None:
    """Wait, round by round, for a condition the monitor reaches."""
    async with asyncio.timeout(DEADLINE):
        while not condition():
            await monitor.wait_round()


@pytest.fixture
async def server() -> AsyncIterator[Http204]:
    srv = Http204()
    await srv.start()
    yield srv
    await srv.stop()


def monitor_for(
    probe: CountingProbe, changes: Changes, interval: float, **kw: object
) -> LayerMonitor:
    return LayerMonitor(
        "wwan0",
        [("http0", probe, interval)],
        None,
        Thresholds(down_after=3, up_after=2),
        changes,
        failure_interval=0.05,
        **kw,  # type: ignore[arg-type]
    )


async def test_passive_evidence_triggers_confirmation_instead_of_the_next_round(
    server: Http204,
) -> None:
    # One regular round an hour: only confirmation at failure_interval can find the outage in time.
    probe = CountingProbe(HttpProbe(f"http://127.0.0.1:{server.port}/", PROBE_TIMEOUT))
    changes = Changes()
    monitor = monitor_for(probe, changes, HOUR)
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(monitor.run())
        assert (await changes.wait_for("up")).reason == "ok"
        assert len(probe.results) == 1
        server.silent = True
        monitor.evidence(Evidence(kind="pdn_deactivated", at=time.monotonic()))
        down = await changes.wait_for("down")
        # The URC was strike one; two confirmation rounds, both timed out, made it three.
        assert [r.error for r in probe.results[1:]] == ["timeout", "timeout"]
        assert down.reason == "probes_failing: http0"
        assert monitor.detection.strikes == 3
        task.cancel()


async def test_failed_round_is_confirmed_at_failure_interval(server: Http204) -> None:
    probe = CountingProbe(HttpProbe(f"http://127.0.0.1:{server.port}/", PROBE_TIMEOUT))
    changes = Changes()
    monitor = monitor_for(probe, changes, HOUR)
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(monitor.run())
        await changes.wait_for("up")
        server.silent = True
        # A round of our own (as a switch's verify does) fails: degraded, confirmation follows.
        assert (await monitor.check_once()).state == "degraded"
        down = await changes.wait_for("down")
        assert down.reason == "probes_failing: http0"
        assert len(probe.results) == 1 + 3
        # Recovery needs up_after good rounds: the first (ours again) starts a confirmation, so
        # the rest come at failure_interval, not at the next regular round an hour away.
        server.silent = False
        mark = len(changes.seen)
        assert await monitor.check_once() == LayerHealth(state="down", reason="recovering")
        up = await changes.wait_for("up", mark)
        assert up.reason == "ok"
        assert changes.seen[mark:] == [LayerHealth(state="down", reason="recovering"), up]
        task.cancel()


async def test_one_error_reply_to_a_status_query_is_not_an_outage(server: Http204) -> None:
    probe = CountingProbe(HttpProbe(f"http://127.0.0.1:{server.port}/", PROBE_TIMEOUT))
    changes = Changes()
    monitor = monitor_for(probe, changes, HOUR)
    good = ModemSignals(sim_ready=True, registration="home", data_active=True)
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(monitor.run())
        monitor.update_signals(good)
        await changes.wait_for("up")
        # AT+CPIN? answered ERROR once (the session reads it as "SIM not ready").
        monitor.update_signals(ModemSignals(sim_ready=False, registration="home"))
        assert monitor.detection.strikes == 1
        # The confirmation round comes at once, not in an hour, and the data path passes it.
        await until(monitor, lambda: monitor.detection.strikes == 0)
        assert len(probe.results) == 2
        assert probe.results[-1].ok
        monitor.update_signals(good)
        assert [h.state for h in changes.seen] == ["unknown", "up"]
        # The same reading confirmed (it persists and the data path fails with it) is down,
        # and the modem's reason names the cause.
        server.silent = True
        for _ in range(2):
            monitor.update_signals(ModemSignals(sim_ready=False))
        down = await changes.wait_for("down")
        assert down.reason == "sim_not_ready"
        task.cancel()


async def test_rounds_are_skipped_while_the_network_sends_traffic(server: Http204) -> None:
    probe = CountingProbe(HttpProbe(f"http://127.0.0.1:{server.port}/", PROBE_TIMEOUT))
    changes = Changes()
    reads = 0
    read_many = asyncio.Event()

    async def counters() -> tuple[int, int]:
        nonlocal reads
        reads += 1
        if reads >= 20:
            read_many.set()
        return 10_000 * reads, 1_000 * reads  # downloads flowing

    monitor = monitor_for(probe, changes, 0.01, counters=counters, counters_interval=HOUR)
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(monitor.run())
        async with asyncio.timeout(DEADLINE):
            await read_many.wait()
        # Twenty rounds came due; only the first (no traffic known yet) sent a probe.
        assert len(probe.results) == 1
        assert monitor.health.state == "up"
        task.cancel()


async def test_rx_stall_while_sending_starts_confirmation(server: Http204) -> None:
    probe = CountingProbe(HttpProbe(f"http://127.0.0.1:{server.port}/", PROBE_TIMEOUT))
    changes = Changes()
    tx = 0
    sending = False

    async def counters() -> tuple[int, int]:
        nonlocal tx
        if sending:
            tx += 5_000  # the user sends; nothing comes back
        return 1_000, tx

    monitor = LayerMonitor(
        "wwan0",
        [("http0", probe, HOUR)],
        None,
        Thresholds(down_after=3, up_after=2),
        changes,
        failure_interval=0.05,
        counters=counters,
        counters_interval=0.05,
    )
    # Stall needs 2 s of silence by default; the pure tests cover the threshold itself.
    monitor.detect_config = replace(monitor.detect_config, stall_after=0.1)
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(monitor.run())
        await changes.wait_for("up")
        server.silent = True
        sending = True
        down = await changes.wait_for("down")
        assert down.reason == "probes_failing: http0"
        assert len(probe.results) == 3  # the first round, then two confirmations
        task.cancel()


async def test_probe_bytes_are_counted(server: Http204) -> None:
    probe = CountingProbe(HttpProbe(f"http://127.0.0.1:{server.port}/", PROBE_TIMEOUT))
    changes = Changes()
    monitor = monitor_for(probe, changes, 0.01)
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(monitor.run())
        await probe.wait_runs(5)
        task.cancel()
    runs = monitor.snapshot().probes[0].samples  # rounds recorded (the last may be cut off)
    assert runs >= 4
    sent, recv = exchange_bytes(probe)
    assert monitor.take_probe_bytes() == (sent * runs, recv * runs)
    assert monitor.take_probe_bytes() == (0, 0)
    snap = monitor.snapshot()
    assert (snap.probe_tx_bytes, snap.probe_rx_bytes) == (sent * runs, recv * runs)


def test_budget_stretches_the_round_interval() -> None:
    probe = HttpProbe("http://127.0.0.1:9/", 1.0)
    monitor = LayerMonitor(
        "wwan0", [("http0", probe, 5.0)], None, Thresholds(), Changes(), probe_budget=1_000_000
    )
    per_round = sum(exchange_bytes(probe))
    assert monitor.detect_config.interval > 5.0
    assert per_round * 86_400 / monitor.detect_config.interval <= 1_000_000
    assert monitor.snapshot().round_interval_s == monitor.detect_config.interval


# --- ICMP ----------------------------------------------------------------------------------------


def test_icmp_packets() -> None:
    echo = build_echo(False, 0x1234, 7)
    assert icmp_checksum(echo) == 0  # a correct checksum sums to zero
    reply = bytes([0, 0]) + echo[2:]
    assert match_echo_reply(reply, False, 0x1234, 7)
    assert not match_echo_reply(reply, False, 0x1235, 7)
    assert not match_echo_reply(echo, False, 0x1234, 7)  # our own request seen on loopback
    assert not match_echo_reply(b"\x00", False, None, 7)
    assert build_echo(True, 1, 2)[0] == 128


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (raw socket) or ping_group_range")
async def test_icmp_probe_on_loopback() -> None:
    result = await IcmpProbe("127.0.0.1", 2.0).run()
    assert result.ok, result.error
    assert result.latency_ms is not None
