"""A minimal DHCPv4 server for one client (RFC 2131/2132): test scaffolding, not a product.

It plays the DHCP server an ECM/RNDIS-mode modem runs for its host: whoever asks on the
operator side of the veth gets the one address the network granted, with gateway and DNS.
`reply()` is pure; `DhcpServer` puts it on a UDP socket bound to the interface.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from hw_fixtures.addressing import ContextAddress

MAGIC = b"\x63\x82\x53\x63"
DISCOVER, OFFER, REQUEST, DECLINE, ACK, NAK, RELEASE, INFORM = 1, 2, 3, 4, 5, 6, 7, 8
OPT_MASK, OPT_ROUTER, OPT_DNS, OPT_REQUESTED, OPT_LEASE, OPT_TYPE, OPT_SERVER = (
    1,
    3,
    6,
    50,
    51,
    53,
    54,
)
LEASE_SECONDS = 3600
_FIXED = struct.Struct("!BBBBIHH4s4s4s4s16s64s128s")


@dataclass(frozen=True)
class DhcpRequest:
    """The fields of a client message the server needs."""

    op: int
    xid: int
    flags: int
    ciaddr: str
    chaddr: bytes
    msg_type: int
    requested: str | None
    options: dict[int, bytes]


def parse(packet: bytes) -> DhcpRequest | None:
    """Decode a BOOTREQUEST; None for anything that is not a well-formed DHCP message."""
    if len(packet) < _FIXED.size + 4 or packet[_FIXED.size : _FIXED.size + 4] != MAGIC:
        return None
    op, _htype, _hlen, _hops, xid, _secs, flags, ciaddr, _yi, _si, _gi, chaddr, _sn, _fl = (
        _FIXED.unpack_from(packet)
    )
    if op != 1:
        return None
    options: dict[int, bytes] = {}
    pos = _FIXED.size + 4
    while pos < len(packet):
        code = packet[pos]
        if code == 255:
            break
        if code == 0:
            pos += 1
            continue
        if pos + 1 >= len(packet):
            return None
        length = packet[pos + 1]
        value = packet[pos + 2 : pos + 2 + length]
        if len(value) != length:
            return None
        options[code] = options.get(code, b"") + value
        pos += 2 + length
    kind = options.get(OPT_TYPE, b"")
    if len(kind) != 1:
        return None
    req = options.get(OPT_REQUESTED)
    return DhcpRequest(
        op=op,
        xid=xid,
        flags=flags,
        ciaddr=socket.inet_ntoa(ciaddr),
        chaddr=chaddr,
        msg_type=kind[0],
        requested=socket.inet_ntoa(req) if req is not None and len(req) == 4 else None,
        options=options,
    )


def _option(code: int, value: bytes) -> bytes:
    return bytes([code, len(value)]) + value


def reply(request: DhcpRequest, grant: ContextAddress) -> bytes | None:
    """The server's answer to one client message (None: stay silent)."""
    wanted = request.requested or (request.ciaddr if request.ciaddr != "0.0.0.0" else None)
    if request.msg_type == DISCOVER:
        kind, yiaddr = OFFER, grant.address
    elif request.msg_type == REQUEST:
        if wanted is not None and wanted != grant.address:
            kind, yiaddr = NAK, "0.0.0.0"
        else:
            kind, yiaddr = ACK, grant.address
    elif request.msg_type == INFORM:
        kind, yiaddr = ACK, "0.0.0.0"
    else:
        return None  # RELEASE, DECLINE: nothing to answer
    fixed = _FIXED.pack(
        2,
        1,
        6,
        0,
        request.xid,
        0,
        request.flags,
        socket.inet_aton(request.ciaddr),
        socket.inet_aton(yiaddr),
        socket.inet_aton(grant.gateway),
        bytes(4),
        request.chaddr,
        bytes(64),
        bytes(128),
    )
    opts = _option(OPT_TYPE, bytes([kind])) + _option(OPT_SERVER, socket.inet_aton(grant.gateway))
    if kind != NAK:
        opts += _option(OPT_MASK, socket.inet_aton(grant.mask))
        opts += _option(OPT_ROUTER, socket.inet_aton(grant.gateway))
        opts += _option(OPT_DNS, b"".join(socket.inet_aton(d) for d in grant.dns))
        if kind != ACK or yiaddr != "0.0.0.0":
            opts += _option(OPT_LEASE, struct.pack("!I", LEASE_SECONDS))
    return fixed + MAGIC + opts + b"\xff"


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, server: DhcpServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.server.on_packet(data, addr)


class DhcpServer:
    """Answers on a UDP port-67 socket already bound to the operator side of the veth."""

    def __init__(
        self,
        sock: socket.socket,
        grant: Callable[[], ContextAddress | None],
        log: Callable[[str], None],
        on_request: Callable[[DhcpRequest], None] | None = None,
    ) -> None:
        self._sock = sock
        self._grant = grant
        self._log = log
        #: Sees every well-formed client message, answered or not (RELEASE included).
        self._on_request = on_request
        self._proto: _Protocol | None = None

    async def start(self) -> None:
        """Serve on the socket."""
        loop = asyncio.get_running_loop()
        _, proto = await loop.create_datagram_endpoint(lambda: _Protocol(self), sock=self._sock)
        self._proto = proto

    def close(self) -> None:
        """Stop serving."""
        if self._proto is not None and self._proto.transport is not None:
            self._proto.transport.close()

    def on_packet(self, data: bytes, addr: tuple[str, int]) -> None:
        """Answer one datagram when the modem would (its data call is up)."""
        grant = self._grant()
        request = parse(data)
        if request is not None and self._on_request is not None:
            self._on_request(request)
        if grant is None or request is None:
            return
        self._log(addr[0])
        answer = reply(request, grant)
        if answer is None or self._proto is None or self._proto.transport is None:
            return
        # the client has no address yet: broadcast unless it is renewing from its own address
        dest = request.ciaddr if request.ciaddr != "0.0.0.0" else "255.255.255.255"
        with contextlib.suppress(OSError):
            self._proto.transport.sendto(answer, (dest, 68))
