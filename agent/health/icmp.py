"""ICMP echo probe: the cheapest exchange there is (56 B both ways on IPv4), so it can run often.

It uses an unprivileged ping socket (SOCK_DGRAM, allowed when the process's group is inside
net.ipv4.ping_group_range, which systemd opens to all groups) and falls back to a raw socket
(CAP_NET_RAW) when the kernel refuses. Never raises for network trouble.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import secrets
import socket
import struct
import time

from agent.health.probes import LinkBinding, ProbeResult, ProbeSpecError

ECHO_REQUEST_V4, ECHO_REPLY_V4 = 8, 0
ECHO_REQUEST_V6, ECHO_REPLY_V6 = 128, 129
_RECV_MAX = 2048


def icmp_checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of data."""
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def build_echo(v6: bool, ident: int, seq: int, payload: bytes = b"") -> bytes:
    """An echo request; the v4 checksum is filled in (the kernel does it for v6)."""
    kind = ECHO_REQUEST_V6 if v6 else ECHO_REQUEST_V4
    header = struct.pack("!BBHHH", kind, 0, 0, ident & 0xFFFF, seq & 0xFFFF)
    if v6:
        return header + payload
    csum = icmp_checksum(header + payload)
    return struct.pack("!BBHHH", kind, 0, csum, ident & 0xFFFF, seq & 0xFFFF) + payload


def match_echo_reply(data: bytes, v6: bool, ident: int | None, seq: int) -> bool:
    """Whether data (ICMP message, IPv4 header stripped) is the reply to our request."""
    if len(data) < 8:
        return False
    kind, _, _, rid, rseq = struct.unpack_from("!BBHHH", data)
    if kind != (ECHO_REPLY_V6 if v6 else ECHO_REPLY_V4) or rseq != seq:
        return False
    return ident is None or rid == ident


def _strip_ipv4(data: bytes) -> bytes:
    if len(data) < 20 or data[0] >> 4 != 4:
        return b""
    return data[(data[0] & 0x0F) * 4 :]


class IcmpProbe:
    """Succeeds when `host` (an IP address) answers an echo request within the timeout."""

    kind = "icmp"

    def __init__(self, host: str, timeout: float, *, link: LinkBinding | None = None) -> None:
        try:
            addr = ipaddress.ip_address(host.strip().strip("[]"))
        except ValueError:
            raise ProbeSpecError("an icmp target is an IP address", host) from None
        self.host = str(addr)
        self.v6 = addr.version == 6
        self.timeout = timeout
        self.target = self.host
        self.link = link
        self.payload_size = 0

    def _open(self) -> tuple[socket.socket, bool]:
        family = socket.AF_INET6 if self.v6 else socket.AF_INET
        proto = socket.IPPROTO_ICMPV6 if self.v6 else socket.IPPROTO_ICMP
        try:
            return socket.socket(family, socket.SOCK_DGRAM, proto), False
        except PermissionError:
            return socket.socket(family, socket.SOCK_RAW, proto), True

    def _bind(self, sock: socket.socket, raw: bool) -> None:
        # Through the layer's own link when it is bound (as the other probes: never Wi-Fi).
        link = self.link
        source = "::" if self.v6 else "0.0.0.0"
        if link is not None and link.bound:
            if link.interface is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, link.interface.encode())
            if link.fwmark is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, link.fwmark)
            if link.source is not None and (":" in link.source) == self.v6:
                source = link.source
        if not raw or source not in ("::", "0.0.0.0"):
            sock.bind((source, 0))

    async def run(self) -> ProbeResult:
        """Send one echo request and wait for its reply."""
        at = time.time()
        loop = asyncio.get_running_loop()
        try:
            sock, raw = self._open()
        except OSError as exc:
            return ProbeResult(
                ok=False, error=f"icmp socket: {(exc.strerror or str(exc)).lower()}", at=at
            )
        with sock:
            sock.setblocking(False)
            seq = secrets.randbelow(0x10000)
            ident = secrets.randbelow(0x10000) if raw else 0
            # A ping socket gets its identifier from the kernel, which also filters replies.
            want: int | None = ident if raw else None
            start = time.perf_counter()
            try:
                self._bind(sock, raw)
                async with asyncio.timeout(self.timeout):
                    await loop.sock_sendto(sock, build_echo(self.v6, ident, seq), (self.host, 0))
                    while True:
                        data = await loop.sock_recv(sock, _RECV_MAX)
                        if raw and not self.v6:
                            data = _strip_ipv4(data)
                        if match_echo_reply(data, self.v6, want, seq):
                            break
            except TimeoutError:
                return ProbeResult(ok=False, error="timeout", at=at)
            except OSError as exc:
                text = exc.strerror or str(exc) or type(exc).__name__
                return ProbeResult(ok=False, error=text.lower(), at=at)
        latency = (time.perf_counter() - start) * 1000.0
        return ProbeResult(ok=True, latency_ms=latency, at=at)


def icmp_available() -> bool:
    """Whether this process may open a ping or raw ICMP socket."""
    for kind in (socket.SOCK_DGRAM, socket.SOCK_RAW):
        with contextlib.suppress(OSError):
            socket.socket(socket.AF_INET, kind, socket.IPPROTO_ICMP).close()
            return True
    return False
