"""Bytes a probe puts on the wire, estimated from its protocol exchange with every header counted.

Pure arithmetic over the probe's own parameters (no I/O). docs/health.md shows the sums.
IPv4 header 20 B, IPv6 40 B, UDP 8 B, ICMP echo 8 B, TCP 20 B plus 12 B of timestamp options on
every segment after the handshake and 20 B of options (MSS, SACK-permitted, timestamps, window
scale) on SYN and SYN-ACK, as Linux sends them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

IPV4 = 20
IPV6 = 40
UDP = 8
ICMP_ECHO = 8
TCP_SYN = 40  # 20 B header + 20 B options
TCP_SEG = 32  # 20 B header + 12 B timestamps
DNS_HEADER = 12
DNS_QUESTION_TAIL = 4  # QTYPE + QCLASS
DNS_A_ANSWER = 16  # compressed name 2 + type, class, ttl, rdlength 10 + IPv4 4
#: A 204 answer's headers (status line, Date, Content-Length, Server): measured ~100-160 B.
HTTP_204_REPLY = 160
#: TLS 1.3 handshake with a typical certificate chain: client ~600 B, server ~5 kB.
TLS_CLIENT = 600
TLS_SERVER = 5000
#: Linux SYN retransmissions leave 1, 3, 7, 15 s after the first SYN (initial RTO 1 s).
SYN_RETRIES_AT = (1.0, 3.0, 7.0, 15.0)


class WireProbe(Protocol):
    """What the estimate needs from a probe: its kind, target and timeout."""

    kind: str
    target: str
    timeout: float


def _ip(host: str) -> int:
    return IPV6 if ":" in host else IPV4


def _host(probe: WireProbe) -> str:
    host = getattr(probe, "host", None) or getattr(probe, "server_host", None)
    return str(host) if host else probe.target


def _syns(timeout: float) -> int:
    return 1 + sum(1 for t in SYN_RETRIES_AT if t < timeout)


def exchange_bytes(probe: WireProbe, error: str | None = None) -> tuple[int, int]:
    """(sent, received) bytes of one run; error=None is a success, else the ProbeResult.error."""
    ip = _ip(_host(probe))
    kind = probe.kind
    if kind == "icmp":
        echo = ip + ICMP_ECHO + int(getattr(probe, "payload_size", 0))
        return (echo, echo) if error is None else (echo, 0)
    if kind == "dns":
        qname = str(getattr(probe, "qname", "")).strip().rstrip(".")
        name = len(qname) + 2 if qname else 1  # labels: one length byte per dot, plus root
        query = ip + UDP + DNS_HEADER + name + DNS_QUESTION_TAIL
        if error is None:
            return query, query + DNS_A_ANSWER
        if error == "timeout":
            return query, 0
        if error == "connection refused":
            return query, ip + ICMP_ECHO + query  # ICMP port unreachable quotes our datagram
        return query, query  # answered, but with an answer we did not accept
    if kind in ("tcp", "http"):
        syn = ip + TCP_SYN
        seg = ip + TCP_SEG
        if error == "timeout" and kind == "tcp":
            return syn * _syns(probe.timeout), 0
        if error == "connection refused":
            return syn, ip + 20  # SYN, then a bare RST
        if error is not None and kind == "tcp":
            return 0, 0  # no route, unreachable: nothing left the host
        # Handshake (SYN / SYN-ACK / ACK) and close (FIN / FIN-ACK / ACK).
        sent = syn + seg + seg + seg
        recv = syn + seg
        if kind == "http":
            request = len(getattr(probe, "request", b""))
            sent += seg + request + seg  # the GET, then our ACK of the answer
            recv += seg + HTTP_204_REPLY
            if getattr(probe, "tls", False):
                sent += TLS_CLIENT + 2 * seg
                recv += TLS_SERVER + 2 * seg
        return sent, recv
    return 0, 0


def round_bytes(probes: Sequence[WireProbe]) -> int:
    """Bytes both ways of one round in which every probe succeeds."""
    return sum(sum(exchange_bytes(p)) for p in probes)
