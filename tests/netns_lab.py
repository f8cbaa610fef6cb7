"""A small network lab in namespaces the test creates: one agent, N operators, veth between.

    agent ns (esa-ag-<sfx>)           operator i ns (esa-op<i>-<sfx>)
    m<i> 198.18.<i+1>.2/24  <--veth-->  u<i> 198.18.<i+1>.1/24   (the "gateway")
                                        lo   198.19.0.1/32        ("the Internet": same address
                                                                   in every operator)
Each operator runs a TCP server (port 8080), an HTTP 204 server (port 80) and a DNS server
(UDP 53) on 198.19.0.1 that record the source address of every request, so a test can see
which link a packet took. The agent namespace has no route to 198.19.0.1 of its own: only the
routes under test lead there. Everything is removed on exit, also when the test fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import pytest
from pyroute2 import IPRoute

from hw_fixtures.addressing import ContextAddress
from hw_fixtures.dataplane import DnsDatagrams, dns_answer, http_probe_reply
from hw_fixtures.dhcp_server import DISCOVER, RELEASE, REQUEST, DhcpServer
from hw_fixtures.netns_testing import create_netns, remove_netns, unique_name
from hw_fixtures.netns_testing import inside as in_netns

INTERNET = "198.19.0.1"
TCP_PORT = 8080
HTTP_PORT = 80
DNS_PORT = 53


def needs_root() -> pytest.MarkDecorator:
    """Skip marker for tests that create namespaces (root only; CI runs as root)."""
    return pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")


@dataclass
class Operator:
    """One operator namespace and what its servers saw (source addresses, per service)."""

    ns: str
    gateway: str
    seen: dict[str, list[str]] = field(
        default_factory=lambda: {"tcp": [], "http": [], "dns": [], "dhcp": []}
    )
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def record(self, kind: str, source: str) -> None:
        """A server saw a request from `source`."""
        self.seen[kind].append(source)
        self._changed.set()

    async def wait_seen(self, kind: str, count: int, timeout: float = 5.0) -> list[str]:
        """The sources seen by `kind`, once there are at least `count` of them."""
        async with asyncio.timeout(timeout):
            while len(self.seen[kind]) < count:
                self._changed.clear()
                await self._changed.wait()
        return self.seen[kind]


@dataclass
class Lab:
    """The namespaces and addresses of one test."""

    agent: str
    operators: list[Operator]

    def ifname(self, i: int) -> str:
        """The agent-side interface of operator i (the 'modem' interface)."""
        return f"m{i}"

    def address(self, i: int) -> str:
        """The agent's address on m<i>."""
        return f"198.18.{i + 1}.2"


def _link_up(ipr: IPRoute, ifname: str) -> int:
    idx = int(ipr.link_lookup(ifname=ifname)[0])
    ipr.link("set", index=idx, state="up")
    return idx


@contextlib.contextmanager
def make_lab(n: int) -> Iterator[Lab]:
    """Create the namespaces and veths; yield the Lab; remove all of it whatever happens.

    Names follow the emulator's esa-<pid>-<tag>-<what> scheme, so a crashed run's namespaces
    are swept by the session fixture like every other test's.
    """
    created: list[str] = []
    try:
        agent = create_netns(unique_name("agent"))
        created.append(agent)
        ops: list[Operator] = []
        for i in range(n):
            op = create_netns(unique_name(f"op{i}"))
            created.append(op)
            ops.append(Operator(ns=op, gateway=f"198.18.{i + 1}.1"))
        with IPRoute(netns=agent) as ipr:
            for i, op in enumerate(ops):
                ipr.link(
                    "add", ifname=f"m{i}", kind="veth", peer={"ifname": f"u{i}", "net_ns_fd": op.ns}
                )
                _link_up(ipr, f"m{i}")
        for i, op in enumerate(ops):
            with IPRoute(netns=op.ns) as ipr:
                lo = int(ipr.link_lookup(ifname="lo")[0])
                ipr.addr("add", index=lo, address=INTERNET, prefixlen=32)
                u = _link_up(ipr, f"u{i}")
                ipr.addr("add", index=u, address=op.gateway, prefixlen=24)
        yield Lab(agent=agent, operators=ops)
    finally:
        for name in reversed(created):
            remove_netns(name)


def add_agent_address(lab: Lab, i: int) -> None:
    """Put 198.18.<i+1>.2/24 on m<i> in the agent namespace (what the modem's DHCP would do)."""
    with IPRoute(netns=lab.agent) as ipr:
        idx = int(ipr.link_lookup(ifname=lab.ifname(i))[0])
        ipr.addr("add", index=idx, address=lab.address(i), prefixlen=24)


class _Dns:
    """The operator's DNS: records who asked, answers every A query with INTERNET."""

    def __init__(self, op: Operator) -> None:
        self.op = op
        self.datagrams = DnsDatagrams(self)

    def on_dns(self, data: bytes, addr: tuple[str, int]) -> None:
        self.op.record("dns", addr[0])
        answer = dns_answer(data, INTERNET)
        if answer is not None and self.datagrams.transport is not None:
            self.datagrams.transport.sendto(answer, addr)


@contextlib.asynccontextmanager
async def operator_servers(lab: Lab) -> AsyncIterator[None]:
    """Start each operator's TCP, HTTP and DNS servers; stop them on exit."""
    loop = asyncio.get_running_loop()
    servers: list[asyncio.Server] = []
    transports: list[asyncio.BaseTransport] = []

    for op in lab.operators:

        async def tcp(r: asyncio.StreamReader, w: asyncio.StreamWriter, op: Operator = op) -> None:
            op.record("tcp", w.get_extra_info("peername")[0])
            w.close()

        async def http(r: asyncio.StreamReader, w: asyncio.StreamWriter, op: Operator = op) -> None:
            op.record("http", w.get_extra_info("peername")[0])
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                head = await r.readuntil(b"\r\n\r\n")
                reply, _ = http_probe_reply(head.decode("latin-1").split("\r\n", 1)[0])
                w.write(reply)
                await w.drain()
            w.close()

        with in_netns(op.ns):
            socks = []
            for port in (TCP_PORT, HTTP_PORT):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((INTERNET, port))
                socks.append(s)
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            udp.bind((INTERNET, DNS_PORT))
        servers.append(await asyncio.start_server(tcp, sock=socks[0]))
        servers.append(await asyncio.start_server(http, sock=socks[1]))
        dns = _Dns(op)
        transport, _ = await loop.create_datagram_endpoint(lambda d=dns: d.datagrams, sock=udp)
        transports.append(transport)
    try:
        yield
    finally:
        for server in servers:
            server.close()
        for transport in transports:
            transport.close()


@contextlib.asynccontextmanager
async def dhcp_server(lab: Lab, i: int) -> AsyncIterator[None]:
    """Operator i answers DHCP on its end of the veth, offering the agent's usual address."""
    op = lab.operators[i]
    with in_netns(op.ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, f"u{i}".encode())
        sock.bind(("0.0.0.0", 67))
    grant = ContextAddress(lab.address(i), 24, op.gateway, (INTERNET,))
    kinds = {DISCOVER: "discover", REQUEST: "request", RELEASE: "release"}
    server = DhcpServer(
        sock,
        lambda: grant,
        lambda _source: None,
        on_request=lambda req: op.record("dhcp", kinds.get(req.msg_type, str(req.msg_type))),
    )
    await server.start()
    try:
        yield
    finally:
        server.close()
