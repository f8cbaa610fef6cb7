"""Per-modem loopback endpoints that answer only while the modem's data path is up.

TCP echo and HTTP `GET /generate_204` listeners are closed while the path is down, so a connect
is refused; the UDP DNS responder stays bound but stays silent.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Callable
from typing import Protocol, cast

import structlog

log = structlog.get_logger(__name__)

HOST = "127.0.0.1"
IO_TIMEOUT = 10.0


def dns_answer(query: bytes, address: str = HOST) -> bytes | None:
    """Reply to a DNS query: A records resolve to address, other types get no answers.

    None when the packet is not a well-formed single-question query.
    """
    if len(query) < 12:
        return None
    qid, flags, qdcount = struct.unpack("!HHH", query[:6])
    if flags & 0x8000 or qdcount != 1:
        return None
    pos = 12
    while True:
        if pos >= len(query):
            return None
        length = query[pos]
        if length == 0:
            pos += 1
            break
        if length & 0xC0:
            return None
        pos += 1 + length
    if pos + 4 > len(query):
        return None
    qtype, qclass = struct.unpack("!HH", query[pos : pos + 4])
    question = query[12 : pos + 4]
    rd = flags & 0x0100
    answers = b""
    ancount = 0
    if qtype == 1 and qclass == 1:
        ancount = 1
        answers = struct.pack("!HHHIH", 0xC00C, 1, 1, 60, 4) + socket.inet_aton(address)
    header = struct.pack("!HHHHHH", qid, 0x8080 | rd, 1, ancount, 0, 0)
    return header + question + answers


def http_probe_reply(request_line: str) -> tuple[bytes, bool]:
    """The reply to one HTTP request line, and whether it was the probe: `GET|HEAD
    /generate_204` gets 204, anything else 404; never a body, the connection closes."""
    parts = request_line.split()
    probe = len(parts) >= 2 and parts[0] in ("GET", "HEAD") and parts[1] == "/generate_204"
    status = b"204 No Content" if probe else b"404 Not Found"
    return b"HTTP/1.1 " + status + b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", probe


class DnsHandler(Protocol):
    """Whatever answers the emulator's DNS datagrams (loopback plane, operator network)."""

    def on_dns(self, data: bytes, addr: tuple[str, int]) -> None: ...


class DnsDatagrams(asyncio.DatagramProtocol):
    """Hands each DNS datagram to its owner; keeps the transport for the replies."""

    def __init__(self, owner: DnsHandler) -> None:
        self.owner = owner
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.owner.on_dns(data, addr)


class DataPlane:
    """TCP echo, HTTP 204 and DNS endpoints for one modem, gated by state()."""

    def __init__(
        self,
        state: Callable[[], str],
        delay: Callable[[], float],
        count: Callable[[int, int], object] | None = None,
    ) -> None:
        self._state = state
        self._delay = delay
        # count(rx, tx): bytes the device received (downlink) and sent (uplink) through us
        self._count = count
        self.tcp_port = 0
        self.http_port = 0
        self.dns_port = 0
        self._tcp: asyncio.Server | None = None
        self._http: asyncio.Server | None = None
        self._dns: DnsDatagrams | None = None
        self._conns: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._lock = asyncio.Lock()
        self._dns_count = 0
        self.served = {"tcp": 0, "http": 0, "dns": 0}

    async def start(self) -> None:
        """Reserve the ports and open whatever the current state allows."""
        loop = asyncio.get_running_loop()
        transport, proto = await loop.create_datagram_endpoint(
            lambda: DnsDatagrams(self), local_addr=(HOST, 0)
        )
        self._dns = proto
        self.dns_port = transport.get_extra_info("sockname")[1]
        self._tcp = await asyncio.start_server(self._serve_tcp, HOST, 0, reuse_address=True)
        self.tcp_port = self._tcp.sockets[0].getsockname()[1]
        self._http = await asyncio.start_server(self._serve_http, HOST, 0, reuse_address=True)
        self.http_port = self._http.sockets[0].getsockname()[1]
        await self.sync()

    def _answering(self) -> bool:
        return self._state() != "down"

    async def sync(self) -> None:
        """Open or close the TCP listeners so they match the data-path state now."""
        async with self._lock:
            if self._answering():
                try:
                    if self._tcp is None:
                        self._tcp = await asyncio.start_server(
                            self._serve_tcp, HOST, self.tcp_port, reuse_address=True
                        )
                    if self._http is None:
                        self._http = await asyncio.start_server(
                            self._serve_http, HOST, self.http_port, reuse_address=True
                        )
                except OSError as exc:
                    # while closed, another process's outgoing connection may have taken the
                    # ephemeral port: stay closed (connect refused) and retry at the next sync
                    log.warning("emu_dataplane_rebind_failed", error=str(exc))
                return
            for server in (self._tcp, self._http):
                if server is not None:
                    server.close()
            self._tcp = self._http = None
            for writer in list(self._conns):
                writer.transport.abort()
            self._conns.clear()

    def sync_soon(self) -> None:
        """Schedule sync() from synchronous code (modem state callbacks)."""
        task = asyncio.get_running_loop().create_task(self.sync())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Close every endpoint."""
        async with self._lock:
            for server in (self._tcp, self._http):
                if server is not None:
                    server.close()
            self._tcp = self._http = None
            for writer in list(self._conns):
                writer.transport.abort()
            if self._dns is not None and self._dns.transport is not None:
                self._dns.transport.close()

    def _traffic(self, rx: int, tx: int) -> None:
        if self._count is not None and (rx or tx):
            self._count(rx, tx)

    async def _pause(self) -> None:
        if self._state() == "degraded":
            await asyncio.sleep(self._delay())

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._conns.add(writer)
        self.served["tcp"] += 1
        try:
            while True:
                data = await asyncio.wait_for(reader.read(4096), IO_TIMEOUT)
                if not data or not self._answering():
                    break
                self._traffic(0, len(data))
                await self._pause()
                writer.write(data)
                self._traffic(len(data), 0)
                await asyncio.wait_for(writer.drain(), IO_TIMEOUT)
        except (TimeoutError, ConnectionError):
            pass
        finally:
            self._conns.discard(writer)
            writer.close()

    async def _serve_http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._conns.add(writer)
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), IO_TIMEOUT)
            request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
            if self._answering():
                self._traffic(0, len(head))
            await self._pause()
            if not self._answering():
                return
            reply, probe = http_probe_reply(request_line)
            if probe:
                self.served["http"] += 1
            writer.write(reply)
            self._traffic(len(reply), 0)
            await asyncio.wait_for(writer.drain(), IO_TIMEOUT)
        except (
            TimeoutError,
            ConnectionError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
        ):
            pass
        finally:
            self._conns.discard(writer)
            writer.close()

    def on_dns(self, data: bytes, addr: tuple[str, int]) -> None:
        """Answer a DNS datagram according to the data-path state."""
        state = self._state()
        if state == "down":
            return
        self._traffic(0, len(data))
        reply = dns_answer(data)
        if reply is None:
            return
        if state == "degraded":
            self._dns_count += 1
            if self._dns_count % 2 == 0:
                return  # a degraded link loses every other query
            loop = asyncio.get_running_loop()
            loop.call_later(self._delay(), self._send_dns, reply, addr)
            return
        self._send_dns(reply, addr)

    def _send_dns(self, reply: bytes, addr: tuple[str, int]) -> None:
        if self._dns is not None and self._dns.transport is not None and self._answering():
            self.served["dns"] += 1
            with contextlib.suppress(OSError):
                self._dns.transport.sendto(reply, addr)
            self._traffic(len(reply), 0)
