"""Data-path probes (TCP connect, HTTP status, DNS A query) that report results and never raise."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import ssl
import struct
import time
from typing import Protocol
from urllib.parse import urlsplit

import msgspec
import structlog

from agent.errors import AgentError, ParseError

log = structlog.get_logger(__name__)

DEFAULT_DNS_PORT = 53
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

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self.target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    async def run(self) -> ProbeResult:
        """Connect, close, report the connect time."""
        at = time.time()
        start = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout):
                _, writer = await asyncio.open_connection(self.host, self.port)
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
    if len(code) != 3 or not code.isdigit():
        raise ParseError("bad HTTP status code", text)
    return int(code)


class HttpProbe:
    """Succeeds when GET url answers with `expect_status` (204 by default) within the timeout."""

    kind = "http"

    def __init__(self, url: str, timeout: float, expect_status: int = 204) -> None:
        parts = urlsplit(url)
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
                reader, writer = await asyncio.open_connection(
                    self.host,
                    self.port,
                    ssl=ssl.create_default_context() if self.tls else None,
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


class DnsProbe:
    """Succeeds when server answers an A query for qname with NOERROR and at least one record."""

    kind = "dns"

    def __init__(self, server_host: str, server_port: int, qname: str, timeout: float) -> None:
        encode_qname(qname)
        self.server_host = server_host
        self.server_port = server_port
        self.qname = qname
        self.timeout = timeout
        server = f"[{server_host}]" if ":" in server_host else server_host
        self.target = f"{qname}@{server}:{server_port}"

    async def run(self) -> ProbeResult:
        """Send one query over UDP with a fresh random id and judge the first reply."""
        at = time.time()
        query_id = secrets.randbelow(0x10000)
        start = time.perf_counter()
        loop = asyncio.get_running_loop()
        transport: asyncio.DatagramTransport | None = None
        try:
            async with asyncio.timeout(self.timeout):
                transport, protocol = await loop.create_datagram_endpoint(
                    _OneDatagram, remote_addr=(self.server_host, self.server_port)
                )
                transport.sendto(build_dns_query(self.qname, query_id))
                data = await protocol.reply
        except TimeoutError:
            return _failure("timeout", at)
        except OSError as exc:
            return _failure(_describe_os_error(exc), at)
        finally:
            if transport is not None:
                transport.close()
        latency = (time.perf_counter() - start) * 1000.0
        problem = judge_dns_reply(data, query_id)
        if problem is not None:
            return _failure(problem, at)
        return ProbeResult(ok=True, latency_ms=latency, at=at)


# --- specs ---------------------------------------------------------------------------------------


def probe_from_spec(kind: str, target: str, timeout: float) -> Probe:
    """Build a probe from config: tcp `host:port`, http(s) URL, dns `server:port/qname` or
    `qname@server:port` (port defaults to 53)."""
    if timeout <= 0:
        raise ProbeSpecError("timeout must be positive", f"{kind} {target}")
    kind = kind.strip().lower()
    target = target.strip()
    if kind == "tcp":
        host, port = split_host_port(target)
        return TcpProbe(host, port, timeout)
    if kind in ("http", "https"):
        return HttpProbe(target, timeout)
    if kind == "dns":
        if "@" in target:
            qname, _, server = target.partition("@")
        elif "/" in target:
            server, _, qname = target.partition("/")
        else:
            raise ProbeSpecError("dns target needs 'server:port/qname' or 'qname@server'", target)
        host, port = split_host_port(server, DEFAULT_DNS_PORT)
        return DnsProbe(host, port, qname, timeout)
    raise ProbeSpecError("unknown probe kind (tcp, http, dns)", kind)
