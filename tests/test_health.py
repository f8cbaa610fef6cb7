"""Link-health probes, windows, layer rules and the monitor against real loopback servers."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator
from typing import cast

import msgspec
import pytest

from agent.health.layer import (
    LayerHealth,
    ModemSignals,
    Thresholds,
    evaluate,
    signals_from_modem_info,
)
from agent.health.monitor import LayerMonitor
from agent.health.probes import (
    DnsProbe,
    HttpProbe,
    ProbeResult,
    ProbeSpecError,
    TcpProbe,
    build_dns_query,
    parse_dns_reply,
    probe_from_spec,
)
from agent.health.window import ProbeWindow
from agent.models import ModemInfo, Registration, Signal, SimStatus

DEADLINE = 5.0


# --- loopback servers ----------------------------------------------------------------------------


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class TcpServer:
    """A listener that accepts and closes; optionally answers HTTP with a fixed status."""

    def __init__(self, port: int, http_status: int | None = None, silent: bool = False) -> None:
        self.port = port
        self.http_status = http_status
        self.silent = silent
        self.requests: list[bytes] = []
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()
        self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if self.silent:
                await reader.read()  # hold the connection until the client gives up
            elif self.http_status is not None:
                head = await reader.readuntil(b"\r\n\r\n")
                self.requests.append(head)
                writer.write(
                    f"HTTP/1.1 {self.http_status} Whatever\r\nContent-Length: 0\r\n"
                    "Connection: close\r\n\r\n".encode()
                )
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


def dns_answer(query: bytes, mode: str) -> bytes:
    qid, _, qdcount, _, _, _ = struct.unpack_from("!HHHHHH", query)
    question = query[12:]
    if mode == "wrong_id":
        qid ^= 0x5555
    flags = 0x8180
    ancount = 1
    if mode == "nxdomain":
        flags |= 3
        ancount = 0
    if mode == "truncated_flag":
        flags |= 0x0200
    answer = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + bytes([127, 0, 0, 9])
    reply = struct.pack("!HHHHHH", qid, flags, qdcount, ancount, 0, 0) + question
    reply += answer if ancount else b""
    if mode == "cut":
        reply = reply[:-3]
    return reply


class DnsResponder(asyncio.DatagramProtocol):
    """A UDP DNS server answering every A query with 127.0.0.9 (or a configured fault)."""

    def __init__(self, mode: str = "ok") -> None:
        self.mode = mode
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        if self.mode != "silent":
            self.transport.sendto(dns_answer(data, self.mode), addr)


async def start_dns(port: int, mode: str = "ok") -> DnsResponder:
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_datagram_endpoint(
        lambda: DnsResponder(mode), local_addr=("127.0.0.1", port)
    )
    return proto


@pytest.fixture
async def http204() -> AsyncIterator[TcpServer]:
    server = TcpServer(free_port(), http_status=204)
    await server.start()
    yield server
    if server._server is not None:
        await server.stop()


# --- probes --------------------------------------------------------------------------------------


async def test_tcp_probe_up_and_refused() -> None:
    server = TcpServer(free_port())
    await server.start()
    probe = TcpProbe("127.0.0.1", server.port, timeout=2.0)
    good = await probe.run()
    assert good.ok
    assert good.latency_ms is not None
    assert good.latency_ms >= 0
    assert good.error is None
    await server.stop()
    bad = await probe.run()
    assert not bad.ok
    assert bad.error == "connection refused"
    assert bad.latency_ms is None


async def test_http_probe_sends_get_and_checks_status(http204: TcpServer) -> None:
    probe = HttpProbe(f"http://127.0.0.1:{http204.port}/generate_204?x=1", timeout=2.0)
    result = await probe.run()
    assert result.ok, result.error
    request = http204.requests[0].decode()
    assert request.startswith("GET /generate_204?x=1 HTTP/1.1\r\n")
    assert f"Host: 127.0.0.1:{http204.port}\r\n" in request
    assert "Connection: close\r\n" in request


async def test_http_probe_wrong_status_is_failure() -> None:
    server = TcpServer(free_port(), http_status=302)
    await server.start()
    try:
        result = await HttpProbe(f"http://127.0.0.1:{server.port}/", timeout=2.0).run()
    finally:
        await server.stop()
    assert not result.ok
    assert result.error == "http status 302, expected 204"


async def test_http_probe_times_out_on_a_silent_server() -> None:
    server = TcpServer(free_port(), silent=True)
    await server.start()
    try:
        result = await HttpProbe(f"http://127.0.0.1:{server.port}/", timeout=0.2).run()
    finally:
        await server.stop()
    assert not result.ok
    assert result.error == "timeout"


async def test_http_probe_connection_closed_without_answer() -> None:
    server = TcpServer(free_port())  # accepts and closes
    await server.start()
    try:
        result = await HttpProbe(f"http://127.0.0.1:{server.port}/", timeout=2.0).run()
    finally:
        await server.stop()
    assert not result.ok
    assert result.error is not None


@pytest.mark.parametrize(
    ("mode", "ok", "error"),
    [
        ("ok", True, None),
        ("wrong_id", False, "id mismatch"),
        ("truncated_flag", False, "truncated reply"),
        ("nxdomain", False, "rcode 3 (NXDOMAIN)"),
        ("cut", False, "malformed reply: truncated answer data"),
    ],
)
async def test_dns_probe_judges_replies(mode: str, ok: bool, error: str | None) -> None:
    responder = await start_dns(free_port(socket.SOCK_DGRAM), mode)
    assert responder.transport is not None
    port = responder.transport.get_extra_info("sockname")[1]
    try:
        result = await DnsProbe("127.0.0.1", port, "probe.example", timeout=2.0).run()
    finally:
        responder.transport.close()
    assert result.ok is ok
    assert result.error == error


async def test_dns_probe_timeout_and_refused() -> None:
    responder = await start_dns(free_port(socket.SOCK_DGRAM), "silent")
    assert responder.transport is not None
    port = responder.transport.get_extra_info("sockname")[1]
    silent = await DnsProbe("127.0.0.1", port, "a.example", timeout=0.2).run()
    responder.transport.close()
    refused = await DnsProbe("127.0.0.1", port, "a.example", timeout=2.0).run()
    assert (silent.ok, silent.error) == (False, "timeout")
    assert (refused.ok, refused.error) == (False, "connection refused")


def test_dns_query_encoding_round_trips_through_the_parser() -> None:
    query = build_dns_query("www.Example.org.", 0xBEEF)
    assert query[:2] == b"\xbe\xef"
    assert b"\x03www\x07Example\x03org\x00\x00\x01\x00\x01" in query
    reply = parse_dns_reply(dns_answer(query, "ok"))
    assert reply.id == 0xBEEF
    assert reply.addresses == ["127.0.0.9"]
    assert reply.rcode == 0


@pytest.mark.parametrize(
    ("kind", "target", "expect"),
    [
        ("tcp", "10.0.0.1:443", TcpProbe("10.0.0.1", 443, 1.0)),
        ("TCP", "[::1]:80", TcpProbe("::1", 80, 1.0)),
        ("dns", "9.9.9.9:5353/example.com", DnsProbe("9.9.9.9", 5353, "example.com", 1.0)),
        ("dns", "9.9.9.9/example.com", DnsProbe("9.9.9.9", 53, "example.com", 1.0)),
        ("dns", "example.com@[2620:fe::fe]:53", DnsProbe("2620:fe::fe", 53, "example.com", 1.0)),
    ],
)
def test_probe_from_spec_targets(kind: str, target: str, expect: TcpProbe | DnsProbe) -> None:
    probe = probe_from_spec(kind, target, 1.0)
    assert probe.__class__ is expect.__class__
    assert probe.target == expect.target
    assert probe.kind == kind.lower()


def test_probe_from_spec_http() -> None:
    probe = probe_from_spec("http", "http://[::1]:8080/gen_204", 2.0)
    assert isinstance(probe, HttpProbe)
    assert (probe.host, probe.port, probe.path) == ("::1", 8080, "/gen_204")
    assert b"Host: [::1]:8080\r\n" in probe.request


@pytest.mark.parametrize(
    ("kind", "target"),
    [
        ("tcp", "host-without-port"),
        ("tcp", "host:99999"),
        ("tcp", "host:http"),
        ("http", "ftp://example.com/"),
        ("http", "http:///nohost"),
        ("dns", "example.com"),
        ("dns", "1.1.1.1/" + "a" * 64 + ".com"),
        ("dns", "1.1.1.1/bücher.de"),
        ("icmp", "one.one.one.one"),
        ("smtp", "1.1.1.1:25"),
    ],
)
def test_probe_from_spec_rejects_bad_specs(kind: str, target: str) -> None:
    with pytest.raises(ProbeSpecError):
        probe_from_spec(kind, target, 1.0)


# --- window and rules ----------------------------------------------------------------------------


def test_probe_window_ratio_and_runs() -> None:
    assert ProbeWindow(4).ratio is None
    window = ProbeWindow(4)
    for ok in [True, True, False, False, False, True]:
        window.add(ok)
    # window holds the last four: F F F T
    assert window.ratio == 0.25
    assert window.consecutive_successes == 1
    assert window.consecutive_failures == 0
    for _ in range(6):
        window.add(False)
    assert window.consecutive_failures == 6  # runs outlive the window
    assert window.ratio == 0.0


def windows(**outcomes: list[bool]) -> dict[str, ProbeWindow]:
    result = {}
    for name, seq in outcomes.items():
        w = ProbeWindow(10)
        for ok in seq:
            w.add(ok)
        result[name] = w
    return result


T = Thresholds(rssi_dbm_min=-100, rsrp_dbm_min=-115, down_after=3, up_after=2, degraded_ratio=0.7)
GOOD = ModemSignals(sim_ready=True, registration="home", rsrp_dbm=-90, data_active=True)


@pytest.mark.parametrize(
    ("modem", "probes", "state", "reason"),
    [
        (None, {}, "unknown", "no_data"),
        (GOOD, windows(tcp=[]), "unknown", "waiting_for_probes"),
        (GOOD, {}, "up", "ok"),
        (ModemSignals(sim_ready=True), {}, "unknown", "no_data"),
        (ModemSignals(sim_ready=False), windows(tcp=[True]), "down", "sim_not_ready"),
        (ModemSignals(registration="denied"), windows(tcp=[True]), "down", "not_registered"),
        (ModemSignals(data_active=False), windows(tcp=[True]), "down", "data_inactive"),
        (None, windows(tcp=[False] * 3, dns=[False] * 5), "down", "probes_failing: dns, tcp"),
        (None, windows(tcp=[False] * 2, dns=[False] * 5), "degraded", "probes_failing: dns, tcp"),
        (None, windows(tcp=[True], dns=[False] * 5), "degraded", "probes_failing: dns"),
        (ModemSignals(rssi_dbm=-109), windows(tcp=[True]), "degraded", "weak_signal"),
        (ModemSignals(rsrp_dbm=-120.5), windows(tcp=[True]), "degraded", "weak_signal"),
        (None, windows(tcp=[True, False, False, True]), "degraded", "probes_flaky: tcp"),
        (None, windows(tcp=[True, False, False, True, True]), "up", "ok"),
        (GOOD, windows(tcp=[True], dns=[True]), "up", "ok"),
        (ModemSignals(registration="roaming"), windows(tcp=[True]), "up", "ok"),
    ],
)
def test_evaluate_rules(
    modem: ModemSignals | None, probes: dict[str, ProbeWindow], state: str, reason: str
) -> None:
    assert evaluate(modem, probes, T) == LayerHealth(state=state, reason=reason)  # type: ignore[arg-type]


def test_evaluate_needs_up_after_successes_to_leave_down() -> None:
    down = LayerHealth(state="down", reason="probes_failing: tcp")
    one = windows(tcp=[False] * 5 + [True])
    two = windows(tcp=[False] * 5 + [True, True])
    assert evaluate(None, one, T, previous=down) == LayerHealth(state="down", reason="recovering")
    # Two good rounds end the hold; the window still shows mostly failures, yet that is no flake.
    assert evaluate(None, two, T, previous=down) == LayerHealth(state="up", reason="ok")
    # While merely degrading, one success restores health (mwan3 does the same).
    degrading = windows(tcp=[True] * 5 + [False, False, True])
    assert evaluate(None, degrading, T, previous=LayerHealth(state="degraded", reason="x")) == (
        LayerHealth(state="up", reason="ok")
    )


def test_signals_from_modem_info() -> None:
    info = ModemInfo(
        sim=SimStatus(state="ready"),
        signal=Signal(rssi_dbm=-71, rsrp_dbm=-98.0),
        registration=Registration(state="roaming"),
    )
    signals = signals_from_modem_info(info, data_active=True)
    assert signals.registered is True
    assert evaluate(signals, {}, T).state == "up"
    assert signals_from_modem_info(ModemInfo()).sim_ready is None


# --- monitor -------------------------------------------------------------------------------------


class Changes:
    """Collects on_change calls and lets a test wait for a state with a deadline."""

    def __init__(self) -> None:
        self.seen: list[LayerHealth] = []
        self._event = asyncio.Event()

    def __call__(self, name: str, health: LayerHealth) -> None:
        assert name == "wwan0"
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


async def test_monitor_goes_down_and_comes_back_up(http204: TcpServer) -> None:
    tcp = TcpServer(free_port())
    await tcp.start()
    dns_port = free_port(socket.SOCK_DGRAM)
    dns = await start_dns(dns_port)
    thresholds = Thresholds(down_after=2, up_after=3, degraded_ratio=0.5)
    changes = Changes()
    monitor = LayerMonitor(
        "wwan0",
        [
            ("tcp", TcpProbe("127.0.0.1", tcp.port, 1.0), 0.02),
            ("http", probe_from_spec("http", f"http://127.0.0.1:{http204.port}/", 1.0), 0.02),
            ("dns", probe_from_spec("dns", f"127.0.0.1:{dns_port}/x.test", 1.0), 0.02),
        ],
        None,
        thresholds,
        changes,
    )
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(monitor.run())
        assert (await changes.wait_for("up")).reason == "ok"

        await tcp.stop()
        mark = len(changes.seen)
        assert (await changes.wait_for("degraded", mark)).reason == "probes_failing: tcp"

        await http204.stop()
        assert dns.transport is not None
        assert dns.transport is not None
        dns.transport.close()
        down = await changes.wait_for("down", mark)
        assert down.reason == "probes_failing: dns, http, tcp"
        snap = msgspec.to_builtins(monitor.snapshot())
        assert snap["state"] == "down"
        assert all(p["consecutive_failures"] >= 2 for p in snap["probes"])
        assert all(p["last"]["error"] for p in snap["probes"])

        mark = len(changes.seen)
        await tcp.start()
        partial = await changes.wait_for("degraded", mark)
        assert partial.reason == "probes_failing: dns, http"
        tcp_stats = next(p for p in monitor.snapshot().probes if p.name == "tcp")
        assert tcp_stats.consecutive_successes >= thresholds.up_after
        assert tcp_stats.latency_ms is not None
        # Between down and the first good verdict the layer is held down as "recovering".
        held = changes.seen[mark : changes.seen.index(partial, mark)]
        assert held == [LayerHealth(state="down", reason="recovering")]

        await http204.start()
        dns = await start_dns(dns_port)
        assert (await changes.wait_for("up", mark)).reason == "ok"
        assert dns.transport is not None
        dns.transport.close()
        await tcp.stop()
        task.cancel()


class WatchedProbe:
    """A real probe that also counts failures and signals each completed round."""

    def __init__(self, inner: TcpProbe) -> None:
        self.inner = inner
        self.kind, self.target, self.timeout = inner.kind, inner.target, inner.timeout
        self.failures = 0
        self.ran = asyncio.Event()

    async def run(self) -> ProbeResult:
        result = await self.inner.run()
        self.failures += not result.ok
        self.ran.set()
        return result


async def test_monitor_pause_holds_decisions_until_resume() -> None:
    tcp = TcpServer(free_port())
    await tcp.start()
    changes = Changes()
    signals = ModemSignals(sim_ready=True, registration="home", rsrp_dbm=-80.0, data_active=True)
    polled = asyncio.Event()

    async def source() -> ModemSignals:
        polled.set()
        return signals

    probe = WatchedProbe(TcpProbe("127.0.0.1", tcp.port, 1.0))
    monitor = LayerMonitor(
        "wwan0",
        [("tcp", probe, 0.02)],
        source,
        Thresholds(down_after=2, up_after=1),
        changes,
        signals_interval=0.02,
    )
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(monitor.run())
        await changes.wait_for("up")
        async with asyncio.timeout(DEADLINE):
            await polled.wait()
        assert monitor.snapshot().signals == signals

        monitor.pause()
        mark = len(changes.seen)
        await tcp.stop()
        # Probes keep running while paused: wait until they have seen the outage.
        async with asyncio.timeout(DEADLINE):
            while probe.failures < 3:
                probe.ran.clear()
                await probe.ran.wait()
        assert changes.seen[mark:] == []
        assert monitor.health.state == "up"
        assert monitor.snapshot().paused

        monitor.resume()
        assert changes.seen[mark:] == [LayerHealth(state="down", reason="probes_failing: tcp")]

        signals = ModemSignals(sim_ready=False)
        down = await changes.wait_for("down", len(changes.seen))
        assert down.reason == "sim_not_ready"
        task.cancel()


async def test_check_once_and_failing_signal_source() -> None:
    tcp = TcpServer(free_port())
    await tcp.start()
    changes = Changes()

    async def broken() -> ModemSignals:
        raise OSError("port gone")

    monitor = LayerMonitor(
        "wwan0",
        [("tcp", TcpProbe("127.0.0.1", tcp.port, 1.0), 3600.0)],
        broken,
        Thresholds(),
        changes,
        signals_interval=3600.0,
    )
    assert await monitor.check_once() == LayerHealth(state="up", reason="ok")
    await tcp.stop()
    health = await monitor.check_once()
    assert health == LayerHealth(state="degraded", reason="probes_failing: tcp")
    assert [h.state for h in changes.seen] == ["up", "degraded"]
    last = monitor.snapshot().probes[0].last
    assert isinstance(last, ProbeResult)
    assert last.error == "connection refused"
