"""The emulated modem's data-connection commands (loopback mode: no root needed)."""

from __future__ import annotations

import socket
import struct
import subprocess
import sys
from collections.abc import Callable

import pytest

from hw_fixtures.addressing import contrdp_line, netns_context
from hw_fixtures.dhcp_server import ACK, DISCOVER, NAK, OFFER, REQUEST, parse, reply
from hw_fixtures.testing import EmulatorHandle, PortReader

Factory = Callable[..., EmulatorHandle]


def info_lines(reply_text: str) -> list[str]:
    """The information lines of a reply (no blank lines, no final result code)."""
    return [x for x in reply_text.split("\r\n") if x and x not in ("OK", "ERROR")]


def test_loopback_ready_line_is_unchanged(emu_factory: Factory) -> None:
    emu = emu_factory("--vendor", "quectel")
    assert set(emu.info) == {"port", "control", "modems"}
    assert set(emu.modem("m0")) == {
        "id",
        "port",
        "link",
        "vendor",
        "eid",
        "http_port",
        "tcp_port",
        "dns_port",
        "http_url",
    }


def test_pdp_context_definition_auth_and_dynamic_parameters(emu_factory: Factory) -> None:
    emu = emu_factory("--vendor", "generic")
    with PortReader(emu.port) as port:
        port.command("ATE0")
        assert '+CGDCONT: (1-15),"IPV4V6",,,(0-2),(0-4)' in port.command("AT+CGDCONT=?")
        assert port.command('AT+CGDCONT=2,"X.25","old"').endswith("ERROR\r\n")
        port.command('AT+CGDCONT=2,"ipv4v6","travel.example"')
        port.command('AT+CGAUTH=2,1,"alice","secret"')
        assert info_lines(port.command("AT+CGAUTH?")) == [
            '+CGAUTH: 1,0,""',
            '+CGAUTH: 2,1,"alice"',
        ]
        assert info_lines(port.command("AT+CGCONTRDP")) == [
            '+CGCONTRDP: 1,5,"internet","10.64.0.2.255.255.255.0","10.64.0.1","127.0.0.1",""'
        ]
        assert info_lines(port.command("AT+CGCONTRDP=2")) == []  # defined, not active
        assert port.command("AT+CGCONTRDP=9").endswith("ERROR\r\n")
        port.command("AT+CGACT=1,2")
        assert info_lines(port.command("AT+CGCONTRDP=?")) == ["+CGCONTRDP: (1,2)"]
        assert info_lines(port.command("AT+CGPADDR=2")) == ['+CGPADDR: 2,"10.64.0.3"']


def test_fibocom_prints_address_and_mask_apart(emu_factory: Factory) -> None:
    emu = emu_factory("--vendor", "fibocom")
    with PortReader(emu.port) as port:
        port.command("ATE0")
        line = info_lines(port.command("AT+CGCONTRDP=1"))[0]
    assert line == (
        '+CGCONTRDP: 1,5,"internet","10.64.0.2","255.255.255.0","10.64.0.1","127.0.0.1",""'
    )


def test_cgev_reports_context_changes_only_when_enabled(emu_factory: Factory) -> None:
    emu = emu_factory("--vendor", "generic")
    with PortReader(emu.port) as port:
        port.command("ATE0")
        assert info_lines(port.command("AT+CGEREP?")) == ["+CGEREP: 0,0"]
        # URCs a command causes come right after its final result, so before the next reply
        seen = "".join(port.command(c) for c in ("AT+CGACT=0,1", "AT+CGACT=1,1", "AT"))
        assert "+CGEV" not in seen

        port.command("AT+CGEREP=2,1")
        assert port.command("AT+CGACT=0,1") == "\r\nOK\r\n"
        port.read_until(b"\r\n+CGEV: ME PDN DEACT 1\r\n")
        port.command("AT+CGACT=1,1")
        port.read_until(b"\r\n+CGEV: ME PDN ACT 1\r\n")

        assert emu.control("pdp", op="drop")["dropped"] == [1]
        port.read_until(b"\r\n+CGEV: NW PDN DEACT 1\r\n")
        assert info_lines(port.command("AT+CGACT?")) == ["+CGACT: 1,0"]
        assert emu.status()["data_path"] == "down"
        # the network dropped it: it stays down until the host activates it again
        emu.control("set_registration", state="home")
        assert info_lines(port.command("AT+CGACT?")) == ["+CGACT: 1,0"]
        with pytest.raises(Exception, match="not active"):
            emu.control("pdp", op="drop", cid=1)
        port.command("AT+CGACT=1,1")
        assert emu.status()["data_path"] == "up"


def test_quectel_usbnet_mode_and_data_call(emu_factory: Factory) -> None:
    emu = emu_factory("--vendor", "quectel")
    with PortReader(emu.port) as port:
        port.command("ATE0")
        assert info_lines(port.command('AT+QCFG="usbnet"')) == ['+QCFG: "usbnet",1']
        status = emu.status()
        assert (status["usbnet"], status["dial_needed"], status["data_cid"]) == ("ecm", True, None)
        assert info_lines(port.command("AT+QNETDEVCTL?")) == ["+QNETDEVCTL: 0,1,0,0"]
        port.command("AT+QNETDEVCTL=1,1,1")
        assert info_lines(port.command("AT+QNETDEVCTL?")) == ["+QNETDEVCTL: 1,1,1,1"]
        assert emu.status()["data_cid"] == 1
        port.command("AT+QNETDEVCTL=0,1,0")
        assert emu.status()["data_cid"] is None
        assert port.command("AT+QNETDEVCTL=1,7,1").endswith("ERROR\r\n")  # undefined context

        # a new USB mode is stored and applies after the modem restarts
        port.command('AT+QCFG="usbnet",0')
        assert info_lines(port.command('AT+QCFG="usbnet"')) == ['+QCFG: "usbnet",0']
        assert emu.status()["usbnet"] == "ecm"
        port.write("AT+CFUN=1,1\r")
        port.read_until(b"+QIND: SMS DONE\r\n", timeout=5)
        port.command("ATE0")
        assert emu.status()["usbnet"] == "qmi"
        # QMI mode: no AT data call; whatever drives QMI brings the context up
        assert port.command("AT+QNETDEVCTL=1,1,1").endswith("ERROR\r\n")


def test_fibocom_gtrndis(emu_factory: Factory) -> None:
    emu = emu_factory("--vendor", "fibocom")
    with PortReader(emu.port) as port:
        port.command("ATE0")
        assert info_lines(port.command("AT+GTUSBMODE?")) == ["+GTUSBMODE: 33"]
        assert info_lines(port.command("AT+GTRNDIS?")) == ["+GTRNDIS: 0"]
        port.command("AT+GTRNDIS=1,1")
        assert info_lines(port.command("AT+GTRNDIS?")) == ["+GTRNDIS: 1,1"]
        assert emu.status()["data_cid"] == 1
        port.command("AT+GTRNDIS=0,1")
        assert info_lines(port.command("AT+GTRNDIS?")) == ["+GTRNDIS: 0"]


def test_sierra_scact_and_simcom_qcrmcall(emu_factory: Factory) -> None:
    sierra = emu_factory("--vendor", "sierra")
    with PortReader(sierra.port) as port:
        port.command("ATE0")
        assert info_lines(port.command("AT!SCACT?")) == ["!SCACT: 1,0"]
        port.command("AT!SCACT=1,1")
        assert info_lines(port.command("AT!SCACT?")) == ["!SCACT: 1,1"]
        port.command("AT!SCACT=0,1")
        assert info_lines(port.command("AT+CGACT?")) == ["+CGACT: 1,0"]
    simcom = emu_factory("--vendor", "simcom")
    with PortReader(simcom.port) as port:
        port.command("ATE0")
        assert info_lines(port.command("AT$QCRMCALL?")) == []
        assert info_lines(port.command("AT$QCRMCALL=1,1")) == ["$QCRMCALL: 1,V4"]
        assert info_lines(port.command("AT$QCRMCALL?")) == ["$QCRMCALL: 1,V4"]
        assert simcom.status()["data_cid"] == 1
        assert info_lines(port.command("AT$QCRMCALL=0,1")) == []
        assert simcom.status()["data_cid"] is None


def test_generic_and_dell_need_no_vendor_connect(emu_factory: Factory) -> None:
    for vendor in ("generic", "dell"):
        emu = emu_factory("--vendor", vendor)
        status = emu.status()
        assert status["dial_needed"] is False
        assert status["data_cid"] == 1  # the attach's default bearer carries traffic
        with PortReader(emu.port) as port:
            port.command("ATE0")
            for command in ("AT+QNETDEVCTL?", "AT+GTRNDIS?", "AT$QCRMCALL?", "AT!SCACT?"):
                assert port.command(command).endswith("ERROR\r\n")


def test_netns_options_need_netns_mode() -> None:
    # a subprocess: main() configures logging for the whole process it runs in
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "hw_fixtures.emulator",
            "--net",
            "loopback",
            "--agent-netns",
            "esa-x",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2
    assert "only with --net netns" in done.stderr


# ------------------------------------------------------------------ pure parts


def test_address_plan_and_contrdp_forms() -> None:
    ctx = netns_context(3, 1)
    assert (ctx.address, ctx.gateway, ctx.mask, ctx.network) == (
        "198.18.3.2",
        "198.18.3.1",
        "255.255.255.0",
        "198.18.3.0/24",
    )
    assert ctx.dns == ("198.18.3.1", "198.19.0.1")
    assert contrdp_line(1, "web", ctx) == (
        '+CGCONTRDP: 1,5,"web","198.18.3.2.255.255.255.0","198.18.3.1","198.18.3.1","198.19.0.1"'
    )
    assert '"198.18.3.2","255.255.255.0"' in contrdp_line(1, "web", ctx, "split")
    with pytest.raises(ValueError, match="modem index"):
        netns_context(300, 1)


def _dhcp_message(kind: int, requested: str | None = None, ciaddr: str = "0.0.0.0") -> bytes:
    fixed = struct.pack(
        "!BBBBIHH4s4s4s4s16s64s128s",
        1,
        1,
        6,
        0,
        0xCAFE,
        0,
        0x8000,
        socket.inet_aton(ciaddr),
        bytes(4),
        bytes(4),
        bytes(4),
        bytes.fromhex("020000000001") + bytes(10),
        bytes(64),
        bytes(128),
    )
    opts = bytes([53, 1, kind])
    if requested:
        opts += bytes([50, 4]) + socket.inet_aton(requested)
    return fixed + b"\x63\x82\x53\x63" + opts + b"\xff"


def _options(packet: bytes) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    pos = 240
    while packet[pos] != 255:
        out[packet[pos]] = packet[pos + 2 : pos + 2 + packet[pos + 1]]
        pos += 2 + packet[pos + 1]
    return out


def test_dhcp_server_offers_and_acks_the_granted_address() -> None:
    grant = netns_context(0, 1)
    discover = parse(_dhcp_message(DISCOVER))
    assert discover is not None
    offer = reply(discover, grant)
    assert offer is not None
    assert socket.inet_ntoa(offer[16:20]) == "198.18.0.2"
    opts = _options(offer)
    assert opts[53] == bytes([OFFER])
    assert socket.inet_ntoa(opts[3]) == "198.18.0.1"
    assert socket.inet_ntoa(opts[1]) == "255.255.255.0"
    assert opts[6] == socket.inet_aton("198.18.0.1") + socket.inet_aton("198.19.0.1")

    request = parse(_dhcp_message(REQUEST, requested="198.18.0.2"))
    assert request is not None
    ack = reply(request, grant)
    assert ack is not None
    assert _options(ack)[53] == bytes([ACK])
    wrong = parse(_dhcp_message(REQUEST, requested="10.0.0.9"))
    assert wrong is not None
    nak = reply(wrong, grant)
    assert nak is not None
    assert _options(nak)[53] == bytes([NAK])


def test_dhcp_parser_rejects_garbage() -> None:
    assert parse(b"") is None
    assert parse(b"\x01" * 300) is None
    truncated = _dhcp_message(DISCOVER)[:-3] + bytes([50, 9, 1])
    assert parse(truncated) is None
