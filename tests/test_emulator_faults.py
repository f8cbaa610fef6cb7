"""Injected faults, unplug/replug and the loopback data path, seen from outside the emulator."""

from __future__ import annotations

import errno
import os
import socket
import struct
import time
import urllib.request
from collections.abc import Callable, Iterator

import pytest

from hw_fixtures.dataplane import dns_answer
from hw_fixtures.testing import EmulatorHandle, PortReader, wait_for


@pytest.fixture
def emu(emu_factory: Callable[..., EmulatorHandle]) -> EmulatorHandle:
    return emu_factory("--vendor", "quectel")


@pytest.fixture
def port(emu: EmulatorHandle) -> Iterator[PortReader]:
    with PortReader(emu.port) as reader:
        reader.command("ATE0")
        yield reader


# ---------------------------------------------------------------------------- faults


def test_hang_until_cleared(emu: EmulatorHandle, port: PortReader) -> None:
    emu.control("fault", kind="hang")
    port.write("AT\r")
    with pytest.raises(TimeoutError):
        port.read_final(timeout=0.4)
    assert emu.status()["faults"]["hang"] is True
    emu.control("clear")
    assert port.command("AT") == "\r\nOK\r\n"  # the command sent while hung was lost


def test_hang_for_a_duration(emu: EmulatorHandle, port: PortReader) -> None:
    emu.control("fault", kind="hang", duration=0.3)
    wait_for(lambda: not emu.status()["faults"]["hang"], timeout=5)
    assert port.command("AT") == "\r\nOK\r\n"


def test_slow_answers(emu: EmulatorHandle, port: PortReader) -> None:
    emu.control("fault", kind="slow", delay=0.5)
    started = time.monotonic()
    assert port.command("AT+CSQ", timeout=5).endswith("\r\nOK\r\n")
    assert time.monotonic() - started >= 0.5
    emu.control("clear", kind="slow")
    started = time.monotonic()
    port.command("AT")
    assert time.monotonic() - started < 0.5


def test_garbage_now_and_inside_next_response(emu: EmulatorHandle, port: PortReader) -> None:
    emu.control("fault", kind="garbage", hex="DEADBEEF")
    port.read_until(b"\xde\xad\xbe\xef")
    emu.control("fault", kind="garbage", text="~~noise~~", when="next")
    reply = port.command("AT+CSQ")
    assert reply.startswith("\r\n+CSQ: ")
    assert "~~noise~~" in reply
    assert reply.endswith("\r\nOK\r\n")
    assert "noise" not in port.command("AT+CSQ")


def test_random_garbage_has_the_requested_length(emu: EmulatorHandle, port: PortReader) -> None:
    emu.control("fault", kind="garbage", count=32)
    assert len(port.drain(quiet=0.2)) == 32
    assert port.command("AT") == "\r\nOK\r\n"


def test_partial_line_then_normal_service(emu: EmulatorHandle, port: PortReader) -> None:
    emu.control("fault", kind="partial", text="+CSQ: 1")
    assert port.read_until(b"+CSQ: 1") == b"\r\n+CSQ: 1"
    assert port.drain(quiet=0.1) == b""  # no terminator follows
    assert port.command("AT").endswith("\r\nOK\r\n")


def test_urc_inside_the_next_responses(emu: EmulatorHandle, port: PortReader) -> None:
    emu.control("fault", kind="urc_interleave", count=2, urc='+QIND: "csq",5,99')
    for _ in range(2):
        reply = port.command("AT+CGDCONT?")
        first, rest = reply.split('+QIND: "csq",5,99', 1)
        assert "+CGDCONT: 1," in first
        assert rest.endswith("OK\r\n")
    assert "QIND" not in port.command("AT+CGDCONT?")


def test_error_once_answers_one_command_with_a_cme_error(
    emu: EmulatorHandle, port: PortReader
) -> None:
    port.command("AT+CMEE=1")
    emu.control("fault", kind="error_once", command="at+cpin?", code=10)
    assert port.command("AT+CSQ").endswith("\r\nOK\r\n")  # other commands are untouched
    assert port.command("AT+CPIN?") == "\r\n+CME ERROR: 10\r\n"
    assert "READY" in port.command("AT+CPIN?")  # once only


def test_spontaneous_reset(emu: EmulatorHandle, port: PortReader) -> None:
    port.command("AT+CEREG=1")
    emu.control("set_delays", reattach=30)
    emu.control("fault", kind="reset")
    port.read_until(b"\r\nRDY\r\n", timeout=3)
    port.read_until(b"+QIND: SMS DONE\r\n", timeout=3)
    # settings were lost (echo back on, CEREG URCs off) and the modem is searching again
    assert port.command("AT+CEREG?") == "AT+CEREG?\r\r\n+CEREG: 0,2\r\n\r\nOK\r\n"


def test_unknown_fault_is_refused(emu: EmulatorHandle) -> None:
    with pytest.raises(Exception, match="unknown fault"):
        emu.control("fault", kind="gremlins")


# ------------------------------------------------------------------ unplug and replug


def test_unplug_and_replug(emu: EmulatorHandle) -> None:
    link = emu.modem("m0")["link"]
    old = PortReader(emu.port)
    try:
        old.command("ATE0")
        emu.control("fault", kind="unplug")
        with pytest.raises(EOFError):
            old.read_until(b"never", timeout=2)
        with pytest.raises(OSError, match="Input/output error") as info:
            old.write("AT\r")
        assert info.value.errno == errno.EIO
    finally:
        old.close()
    assert not os.path.lexists(link)
    assert emu.status()["plugged"] is False
    new_port = emu.control("replug")["port"]
    assert os.path.realpath(link) == new_port
    with PortReader(link) as p:
        assert p.command("AT").endswith("\r\nOK\r\n")


def test_unplug_for_a_duration_comes_back(emu: EmulatorHandle) -> None:
    emu.control("unplug", duration=0.3)
    status = wait_for(lambda: (s := emu.status())["plugged"] and s, timeout=5)
    assert os.path.realpath(emu.modem("m0")["link"]) == status["port"]
    with PortReader(status["port"]) as p:
        assert p.command("AT").endswith("OK\r\n")


# ----------------------------------------------------------------------- data path


def http_status(url: str) -> int:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return int(resp.status)


def tcp_echo(port: int, payload: bytes = b"ping") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(payload)
        return sock.recv(100)


def dns_query(port: int, qid: int, timeout: float = 2.0) -> bytes | None:
    name = b"".join(bytes([len(p)]) + p for p in b"probe.example".split(b".")) + b"\0"
    query = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + name + struct.pack("!HH", 1, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(query, ("127.0.0.1", port))
        try:
            return sock.recv(512)
        except TimeoutError:
            return None


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def test_endpoints_answer_while_the_link_is_up(emu: EmulatorHandle) -> None:
    m = emu.modem("m0")
    assert http_status(m["http_url"]) == 204
    assert tcp_echo(m["tcp_port"]) == b"ping"
    reply = dns_query(m["dns_port"], 0x1234)
    assert reply is not None
    assert reply[:2] == b"\x12\x34"
    assert reply.endswith(b"\x7f\0\0\1")


def test_link_down_refuses_and_link_up_restores(emu: EmulatorHandle) -> None:
    m = emu.modem("m0")
    reply = emu.control("link", state="down")
    assert (reply["link"], reply["data_path"]) == ("down", "down")
    assert reply["link_path"] == m["link"]
    assert refused(m["tcp_port"])
    assert refused(m["http_port"])
    assert dns_query(m["dns_port"], 7, timeout=0.3) is None
    emu.control("link", state="up")
    assert http_status(m["http_url"]) == 204
    assert tcp_echo(m["tcp_port"]) == b"ping"


def test_radio_off_takes_the_data_path_down(emu: EmulatorHandle) -> None:
    m = emu.modem("m0")
    with PortReader(emu.port) as p:
        p.command("AT+CFUN=0")
    # every control reply is sent after the listeners match the state it reports
    wait_for(lambda: emu.status()["data_path"] == "down", timeout=5)
    assert refused(m["tcp_port"])
    with PortReader(emu.port) as p:
        p.command("AT+CFUN=1")
    wait_for(lambda: emu.status()["data_path"] == "up", timeout=5)
    assert http_status(m["http_url"]) == 204


def test_degraded_link_is_slow_and_loses_dns(emu: EmulatorHandle) -> None:
    m = emu.modem("m0")
    emu.control("link", state="degraded", delay=0.4)
    started = time.monotonic()
    assert http_status(m["http_url"]) == 204
    assert time.monotonic() - started >= 0.4
    answers = [dns_query(m["dns_port"], i, timeout=0.9) for i in range(4)]
    assert sum(a is not None for a in answers) == 2


def test_dns_answer_is_a_pure_function() -> None:
    name = b"\x01a\x00"
    query_a = struct.pack("!HHHHHH", 9, 0x0100, 1, 0, 0, 0) + name + struct.pack("!HH", 1, 1)
    reply = dns_answer(query_a)
    assert reply is not None
    assert struct.unpack("!HHHH", reply[:8]) == (9, 0x8180, 1, 1)
    query_aaaa = query_a[:-4] + struct.pack("!HH", 28, 1)
    reply6 = dns_answer(query_aaaa)
    assert reply6 is not None
    assert struct.unpack("!H", reply6[6:8]) == (0,)
    assert dns_answer(b"\x00" * 5) is None
