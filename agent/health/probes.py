"""Data-path probes (TCP connect, HTTP status, DNS A query) that report results and never raise."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import secrets
import socket
import ssl
import struct
import time
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit

import msgspec
import structlog

from agent.errors import AgentError, ParseError

log = structlog.get_logger(__name__)

DEFAULT_DNS_PORT = 53
#: A DNS probe target server that means "the DNS servers the layer's data connection gave".
LINK_DNS = "link"
HTTP_STATUS_LINE_LIMIT = 1024
DNS_MAX_REPLY = 4096
DNS_TYPE_A = 1
DNS_CLASS_IN = 1
DNS_RCODE_NAMES = {
    0: "NOERROR",
    1: "FORMERR",
    2: "SERVFAIL",
    3: "NXDOMAIN",
    4: "NOTIMP",
    5: "REFUSED",
}


class ProbeSpecError(AgentError, ValueError):
    """A probe kind or target string could not be understood; carries the offending spec."""

    def __init__(self, message: str, spec: str) -> None:
        super().__init__(f"{message}: {spec!r}")
        self.spec = spec


class ProbeResult(msgspec.Struct, kw_only=True, frozen=True):
    """One probe round: ok, latency in ms when it succeeded, a short error otherwise, wall time `at`."""

    ok: bool
    latency_ms: float | None = None
    error: str | None = None
    at: float = 0.0


class Probe(Protocol):
    """Anything that checks the data path once per `run()` and reports instead of raising."""

    kind: str
    target: str
    timeout: float

    async def run(self) -> ProbeResult:
        """Check once; network failures and timeouts come back as `ok=False`."""
        ...


@dataclass(slots=True)
class LinkBinding:
    """Where a layer's probes leave: its interface, fwmark, source address and DNS servers.

    One mutable object per layer, shared by its probes and updated by the data path as the
    link comes and goes. `interface=None` means unbound: probes use the host's routes, as they
    do with the loopback emulator or `interface = "none"`.
    """

    interface: str | None = None
    fwmark: int | None = None
    source: str | None = None
    dns: tuple[str, ...] = ()

    @property
    def bound(self) -> bool:
        """Whether probes should be tied to the link."""
        return self.interface is not None


def _bound_socket(family: int, kind: int, link: LinkBinding) -> socket.socket:
    """A non-blocking socket tied to `link`: SO_BINDTODEVICE, SO_MARK, source address.

    SO_BINDTODEVICE makes the kernel send only through the interface (never Wi-Fi, never the
    other modem) even when the main table points elsewhere; the mark selects the layer's own
    table so the packet finds a route there.
    """
    sock = socket.socket(family, kind)
    try:
        sock.setblocking(False)
        if link.interface is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, link.interface.encode())
        if link.fwmark is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, link.fwmark)
        if link.source is not None and _family_of(link.source) == family:
            sock.bind((link.source, 0))
    except BaseException:
        sock.close()
        raise
    return sock


def _family_of(host: str) -> int | None:
    try:
        return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        return None


async def _resolve_on_link(host: str, link: LinkBinding, timeout: float) -> str:
    """An address for `host`: literal as is, else an A query to the link's own DNS servers.

    Without servers from the data connection the system resolver answers (it may use another
    link; the connection itself still goes through this one).
    """
    if _family_of(host) is not None:
        return host
    for server in link.dns:
        with contextlib.suppress(OSError, TimeoutError, ParseError):
            addresses = await _query_a(server, DEFAULT_DNS_PORT, host, link, timeout)
            if addresses:
                return addresses[0]
    if link.dns:
        raise OSError(f"cannot resolve {host} through the link's DNS servers")
    infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    return str(infos[0][4][0])


async def _open_stream(
    host: str,
    port: int,
    link: LinkBinding | None,
    timeout: float,
    *,
    tls: bool = False,
    limit: int = 2**16,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """asyncio.open_connection, but through `link` when it is bound; call under a timeout."""
    ssl_ctx = ssl.create_default_context() if tls else None
    if link is None or not link.bound:
        return await asyncio.open_connection(host, port, ssl=ssl_ctx, limit=limit)
    sock = await connect_on_link(host, port, link, timeout)
    try:
        return await asyncio.open_connection(
            sock=sock, ssl=ssl_ctx, server_hostname=host if tls else None, limit=limit
        )
    except BaseException:
        sock.close()
        raise


async def connect_on_link(host: str, port: int, link: LinkBinding, timeout: float) -> socket.socket:
    """A TCP socket connected to host:port through `link` (its interface, mark, source address
    and DNS servers); call under a timeout. Other rooms' traffic that must leave by a layer's
    link (ES9+ downloads) uses it too."""
    address = await _resolve_on_link(host, link, timeout)
    family = _family_of(address) or socket.AF_INET
    sock = _bound_socket(family, socket.SOCK_STREAM, link)
    try:
        await asyncio.get_running_loop().sock_connect(sock, (address, port))
    except BaseException:
        sock.close()
        raise
    return sock


def _failure(error: str, at: float) -> ProbeResult:
    return ProbeResult(ok=False, latency_ms=None, error=error, at=at)


def _describe_os_error(exc: OSError) -> str:
    # The errno text is what an operator can act on; the Python class name adds nothing.
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ConnectionResetError):
        return "connection reset"
    text = exc.strerror or str(exc) or type(exc).__name__
    return text.lower()


def split_host_port(text: str, default_port: int | None = None) -> tuple[str, int]:
    """Split `host:port` or `[v6]:port` (port optional when a default is given)."""
    text = text.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not host:
            raise ProbeSpecError("unbalanced brackets", text)
        port_text = rest[1:] if rest.startswith(":") else ""
        if rest and not rest.startswith(":"):
            raise ProbeSpecError("junk after ']'", text)
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    elif ":" in text:
        # A bare IPv6 literal cannot carry a port without brackets.
        host, port_text = text, ""
    else:
        host, port_text = text, ""
    if not host:
        raise ProbeSpecError("missing host", text)
    if not port_text:
        if default_port is None:
            raise ProbeSpecError("missing port", text)
        return host, default_port
    try:
        port = int(port_text)
    except ValueError:
        raise ProbeSpecError("port is not a number", text) from None
    if not 0 < port < 65536:
        raise ProbeSpecError("port out of range", text)
    return host, port


# --- TCP -----------------------------------------------------------------------------------------


class TcpProbe:
    """Succeeds when a TCP connection to host:port is established within the timeout."""

    kind = "tcp"

    def __init__(
        self, host: str, port: int, timeout: float, link: LinkBinding | None = None
    ) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self.link = link
        self.target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    async def run(self) -> ProbeResult:
        """Connect, close, report the connect time."""
        at = time.time()
        start = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout):
                _, writer = await _open_stream(self.host, self.port, self.link, self.timeout)
        except TimeoutError:
            return _failure("timeout", at)
        except OSError as exc:
            return _failure(_describe_os_error(exc), at)
        latency = (time.perf_counter() - start) * 1000.0
        await _close_writer(writer, self.timeout)
        return ProbeResult(ok=True, latency_ms=latency, at=at)


async def _close_writer(writer: asyncio.StreamWriter, timeout: float) -> None:
    writer.close()
    with contextlib.suppress(OSError, TimeoutError, ssl.SSLError):
        async with asyncio.timeout(timeout):
            await writer.wait_closed()


# --- HTTP ----------------------------------------------------------------------------------------


def build_http_get(host_header: str, path: str) -> bytes:
    """Encode a minimal HTTP/1.1 GET that asks the server to close after answering."""
    if any(c in host_header + path for c in "\r\n "):
        raise ProbeSpecError("whitespace in host or path", host_header + path)
    return (
        f"GET {path} HTTP/1.1\r\n"
        f"Host: {host_header}\r\n"
        "User-Agent: esim-agent-probe\r\n"
        "Accept: */*\r\n"
        "Connection: close\r\n"
        "\r\n"
    ).encode("ascii")


def parse_http_status_line(line: bytes) -> int:
    """Return the status code of `HTTP/1.x NNN reason`; raise ParseError otherwise."""
    text = line.decode("latin-1").strip()
    parts = text.split(None, 2)
    if len(parts) < 2 or not parts[0].upper().startswith("HTTP/"):
        raise ParseError("not an HTTP status line", text)
    code = parts[1]
    # str.isdigit() also accepts superscripts and other scripts' digits that int() refuses.
    if len(code) != 3 or not code.isascii() or not code.isdigit():
        raise ParseError("bad HTTP status code", text)
    return int(code)


class HttpProbe:
    """Succeeds when GET url answers with `expect_status` (204 by default) within the timeout."""

    kind = "http"

    def __init__(
        self,
        url: str,
        timeout: float,
        expect_status: int = 204,
        link: LinkBinding | None = None,
    ) -> None:
        parts = urlsplit(url)
        self.link = link
        if parts.scheme not in ("http", "https"):
            raise ProbeSpecError("url scheme must be http or https", url)
        if not parts.hostname:
            raise ProbeSpecError("url has no host", url)
        self.url = url
        self.target = url
        self.timeout = timeout
        self.expect_status = expect_status
        self.host = parts.hostname
        self.tls = parts.scheme == "https"
        try:
            self.port = parts.port or (443 if self.tls else 80)
        except ValueError:
            raise ProbeSpecError("bad port in url", url) from None
        self.path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.request = build_http_get(parts.netloc.rpartition("@")[2], self.path)

    async def run(self) -> ProbeResult:
        """Send the GET, read the status line only, report the time to it."""
        at = time.time()
        start = time.perf_counter()
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(self.timeout):
                reader, writer = await _open_stream(
                    self.host,
                    self.port,
                    self.link,
                    self.timeout,
                    tls=self.tls,
                    limit=HTTP_STATUS_LINE_LIMIT,
                )
                writer.write(self.request)
                await writer.drain()
                line = await reader.readline()
        except TimeoutError:
            return _failure("timeout", at)
        except ssl.SSLError as exc:
            return _failure(f"tls: {exc.reason or exc}", at)
        except ValueError:
            # StreamReader signals an over-long line with ValueError.
            return _failure("status line too long", at)
        except OSError as exc:
            return _failure(_describe_os_error(exc), at)
        finally:
            if writer is not None:
                await _close_writer(writer, self.timeout)
        latency = (time.perf_counter() - start) * 1000.0
        if not line:
            return _failure("connection closed before status line", at)
        try:
            status = parse_http_status_line(line)
        except ParseError:
            return _failure("malformed status line", at)
        if status != self.expect_status:
            return _failure(f"http status {status}, expected {self.expect_status}", at)
        return ProbeResult(ok=True, latency_ms=latency, at=at)


# --- DNS -----------------------------------------------------------------------------------------


class DnsReply(msgspec.Struct, kw_only=True, frozen=True):
    """The parts of a DNS reply a probe judges: id, flags of interest, rcode, IPv4 answers."""

    id: int
    truncated: bool
    rcode: int
    answer_count: int
    addresses: list[str]


def encode_qname(qname: str) -> bytes:
    """Encode a domain name as DNS labels; raise ProbeSpecError on names DNS cannot carry."""
    name = qname.strip().rstrip(".")
    if not name:
        raise ProbeSpecError("empty query name", qname)
    try:
        raw = name.encode("ascii")
    except UnicodeEncodeError:
        raise ProbeSpecError("query name must be ASCII (use the xn-- form)", qname) from None
    if len(raw) > 253:
        raise ProbeSpecError("query name longer than 253 bytes", qname)
    out = bytearray()
    for label in raw.split(b"."):
        if not 0 < len(label) < 64:
            raise ProbeSpecError("empty or over-long label", qname)
        out.append(len(label))
        out += label
    out.append(0)
    return bytes(out)


def build_dns_query(qname: str, query_id: int) -> bytes:
    """Encode a recursive A/IN query for qname with the given 16-bit id."""
    header = struct.pack("!HHHHHH", query_id & 0xFFFF, 0x0100, 1, 0, 0, 0)
    return header + encode_qname(qname) + struct.pack("!HH", DNS_TYPE_A, DNS_CLASS_IN)


def _skip_name(data: bytes, offset: int) -> int:
    """Return the offset just past the (possibly compressed) name starting at offset."""
    while True:
        if offset >= len(data):
            raise ParseError("name runs past the end", data)
        length = data[offset]
        if length & 0xC0 == 0xC0:
            if offset + 2 > len(data):
                raise ParseError("truncated compression pointer", data)
            return offset + 2
        if length & 0xC0:
            raise ParseError("unknown label type", data)
        if length == 0:
            return offset + 1
        offset += 1 + length


def parse_dns_reply(data: bytes) -> DnsReply:
    """Decode header, skip questions, collect A answers; raise ParseError on truncated data."""
    if len(data) < 12:
        raise ParseError("reply shorter than a DNS header", data)
    query_id, flags, qdcount, ancount, _, _ = struct.unpack_from("!HHHHHH", data)
    if not flags & 0x8000:
        raise ParseError("not a response (QR bit clear)", data)
    offset = 12
    for _ in range(qdcount):
        offset = _skip_name(data, offset) + 4
        if offset > len(data):
            raise ParseError("reply ends inside a question", data)
    addresses: list[str] = []
    for _ in range(ancount):
        offset = _skip_name(data, offset)
        if offset + 10 > len(data):
            raise ParseError("truncated answer record", data)
        rtype, rclass, _, rdlength = struct.unpack_from("!HHIH", data, offset)
        offset += 10
        if offset + rdlength > len(data):
            raise ParseError("truncated answer data", data)
        if rtype == DNS_TYPE_A and rclass == DNS_CLASS_IN and rdlength == 4:
            addresses.append(".".join(str(b) for b in data[offset : offset + 4]))
        offset += rdlength
    return DnsReply(
        id=query_id,
        truncated=bool(flags & 0x0200),
        rcode=flags & 0x000F,
        answer_count=ancount,
        addresses=addresses,
    )


def judge_dns_reply(data: bytes, query_id: int) -> str | None:
    """Return None when the reply answers our query with records, else a short reason."""
    try:
        reply = parse_dns_reply(data)
    except ParseError as exc:
        return f"malformed reply: {exc}"
    if reply.id != query_id:
        return "id mismatch"
    if reply.truncated:
        return "truncated reply"
    if reply.rcode != 0:
        name = DNS_RCODE_NAMES.get(reply.rcode, "?")
        return f"rcode {reply.rcode} ({name})"
    if reply.answer_count == 0:
        return "no answer records"
    return None


class _OneDatagram(asyncio.DatagramProtocol):
    """Resolves a future with the first datagram or the first socket error."""

    def __init__(self) -> None:
        self.reply: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: object) -> None:
        if not self.reply.done():
            self.reply.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self.reply.done():
            self.reply.set_exception(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.reply.done():
            self.reply.set_exception(exc or ConnectionResetError("socket closed"))


async def _exchange(server: str, port: int, query: bytes, link: LinkBinding | None) -> bytes:
    """Send one UDP datagram to server:port (through `link` when bound); the first reply."""
    loop = asyncio.get_running_loop()
    transport: asyncio.DatagramTransport | None = None
    try:
        if link is None or not link.bound:
            transport, protocol = await loop.create_datagram_endpoint(
                _OneDatagram, remote_addr=(server, port)
            )
        else:
            sock = _bound_socket(_family_of(server) or socket.AF_INET, socket.SOCK_DGRAM, link)
            try:
                sock.connect((server, port))
            except BaseException:
                sock.close()
                raise
            transport, protocol = await loop.create_datagram_endpoint(_OneDatagram, sock=sock)
        transport.sendto(query)
        return await protocol.reply
    finally:
        if transport is not None:
            transport.close()


async def _query_a(
    server: str, port: int, qname: str, link: LinkBinding | None, timeout: float
) -> list[str]:
    """The A records server gives for qname; OSError/TimeoutError/ParseError otherwise."""
    query_id = secrets.randbelow(0x10000)
    async with asyncio.timeout(timeout):
        data = await _exchange(server, port, build_dns_query(qname, query_id), link)
    reply = parse_dns_reply(data)
    if reply.id != query_id or reply.rcode != 0:
        raise ParseError("no usable answer", data)
    return reply.addresses


class DnsProbe:
    """Succeeds when server answers an A query for qname with NOERROR and at least one record.

    server_host `link` (LINK_DNS) means the DNS servers the layer's data connection gave.
    """

    kind = "dns"

    def __init__(
        self,
        server_host: str,
        server_port: int,
        qname: str,
        timeout: float,
        link: LinkBinding | None = None,
    ) -> None:
        encode_qname(qname)
        self.server_host = server_host
        self.server_port = server_port
        self.qname = qname
        self.timeout = timeout
        self.link = link
        server = f"[{server_host}]" if ":" in server_host else server_host
        self.target = f"{qname}@{server}:{server_port}"

    def _server(self) -> str | None:
        if self.server_host != LINK_DNS:
            return self.server_host
        return self.link.dns[0] if self.link is not None and self.link.dns else None

    async def run(self) -> ProbeResult:
        """Send one query over UDP with a fresh random id and judge the first reply."""
        at = time.time()
        server = self._server()
        if server is None:
            return _failure("no DNS server from the data connection", at)
        query_id = secrets.randbelow(0x10000)
        start = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout):
                data = await _exchange(
                    server, self.server_port, build_dns_query(self.qname, query_id), self.link
                )
        except TimeoutError:
            return _failure("timeout", at)
        except OSError as exc:
            return _failure(_describe_os_error(exc), at)
        latency = (time.perf_counter() - start) * 1000.0
        problem = judge_dns_reply(data, query_id)
        if problem is not None:
            return _failure(problem, at)
        return ProbeResult(ok=True, latency_ms=latency, at=at)


# --- specs ---------------------------------------------------------------------------------------


def probe_from_spec(
    kind: str, target: str, timeout: float, link: LinkBinding | None = None
) -> Probe:
    """Build a probe from config: tcp `host:port`, http(s) URL, dns `server:port/qname` or
    `qname@server:port` (port defaults to 53; server `link`: the layer's own DNS servers),
    icmp: an IP address.

    With a `link` the probe leaves through that layer's interface (see LinkBinding)."""
    if timeout <= 0:
        raise ProbeSpecError("timeout must be positive", f"{kind} {target}")
    kind = kind.strip().lower()
    target = target.strip()
    if kind == "tcp":
        host, port = split_host_port(target)
        return TcpProbe(host, port, timeout, link)
    if kind in ("http", "https"):
        return HttpProbe(target, timeout, link=link)
    if kind == "dns":
        if "@" in target:
            qname, _, server = target.partition("@")
        elif "/" in target:
            server, _, qname = target.partition("/")
        else:
            raise ProbeSpecError("dns target needs 'server:port/qname' or 'qname@server'", target)
        host, port = split_host_port(server, DEFAULT_DNS_PORT)
        return DnsProbe(host, port, qname, timeout, link)
    if kind == "icmp":
        from agent.health.icmp import IcmpProbe  # icmp.py imports this module

        return IcmpProbe(target, timeout, link=link)
    raise ProbeSpecError("unknown probe kind (tcp, http, dns, icmp)", kind)
