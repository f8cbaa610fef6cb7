"""`--net netns`: each emulated modem has a real interface and an operator network behind it.

These tests need root (namespaces, veth pairs); they skip with that reason otherwise. Every
namespace is made by the fixtures (esa-<pid>-...) and removed after the test.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from hw_fixtures.netns_testing import (
    cleanup_emulator,
    configure_interface,
    create_netns,
    inside,
    is_root,
    link_info,
    links,
    list_netns,
    remove_netns,
    run_in_netns,
    sweep_stale,
    wait_until,
)
from hw_fixtures.testing import EmulatorHandle, PortReader

pytestmark = pytest.mark.skipif(not is_root(), reason="needs root: network namespaces and veth")

Factory = Callable[..., EmulatorHandle]
BLOCKED_TIMEOUT = 1.0
IO_TIMEOUT = 5.0


def info_lines(reply: str) -> list[str]:
    """The information lines of a reply (no blank lines, no final result code)."""
    return [x for x in reply.split("\r\n") if x and x not in ("OK", "ERROR")]


def tcp_echo(ns: str, host: str, payload: bytes = b"ping", timeout: float = IO_TIMEOUT) -> bytes:
    """Send payload to the echo server at host:7 from inside ns; what comes back."""
    with inside(ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with sock:
        sock.settimeout(timeout)
        sock.connect((host, 7))
        sock.sendall(payload)
        return sock.recv(len(payload))


def http_status(ns: str, host: str, timeout: float = IO_TIMEOUT) -> int:
    """GET /generate_204 from inside ns; the status code."""
    with inside(ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with sock:
        sock.settimeout(timeout)
        sock.connect((host, 80))
        sock.sendall(b"GET /generate_204 HTTP/1.1\r\nHost: probe\r\n\r\n")
        head = b""
        while b"\r\n" not in head:
            chunk = sock.recv(1024)
            if not chunk:
                break
            head += chunk
        return int(head.split()[1])


def dns_a(ns: str, server: str, name: str = "probe.example", timeout: float = IO_TIMEOUT) -> str:
    """One A query from inside ns; the first answer's address."""
    qname = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\x00"
    query = struct.pack("!HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0) + qname + struct.pack("!HH", 1, 1)
    with inside(ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        sock.settimeout(timeout)
        sock.sendto(query, (server, 53))
        answer = sock.recv(512)
    assert struct.unpack("!H", answer[:2])[0] == 0x1234
    return socket.inet_ntoa(answer[-4:])


def blocked(call: Callable[[], object]) -> bool:
    """True when a request from the agent gets no answer (timeout, reset, refused)."""
    try:
        call()
    except OSError:
        return True
    return False


def contrdp(port: PortReader, cid: int = 1) -> dict[str, str]:
    """Address, mask, gateway and DNS from AT+CGCONTRDP (dotted 8-octet or split form)."""
    line = info_lines(port.command(f"AT+CGCONTRDP={cid}"))[0]
    fields = [f.strip().strip('"') for f in line.split(":", 1)[1].split(",")]
    local = fields[3].split(".")
    if len(local) == 8:
        address, mask, rest = ".".join(local[:4]), ".".join(local[4:]), fields[4:]
    else:
        address, mask, rest = fields[3], fields[4], fields[5:]
    return {"address": address, "mask": mask, "gateway": rest[0], "dns": rest[1]}


def prefixlen(mask: str) -> int:
    """A dotted mask as a prefix length."""
    return sum(bin(int(octet)).count("1") for octet in mask.split("."))


def scenario(tmp_path: Path, vendor: str, pdp_auto: bool, usbnet: str | None = None) -> str:
    """A one-modem scenario file."""
    extra = f'usbnet = "{usbnet}"\n' if usbnet else ""
    path = tmp_path / "scenario.toml"
    path.write_text(
        f'[[modem]]\nvendor = "{vendor}"\npdp_auto = {str(pdp_auto).lower()}\n{extra}',
        encoding="utf-8",
    )
    return str(path)


def bring_up(emu: EmulatorHandle, ns: str, port: PortReader, modem: str = "m0") -> dict[str, str]:
    """Configure the agent side from AT+CGCONTRDP, as a non-router agent does."""
    grant = contrdp(port)
    facts = emu.modem(modem)
    configure_interface(
        ns, facts["interface"], grant["address"], prefixlen(grant["mask"]), grant["gateway"]
    )
    emu.status(modem)  # the control reply comes after the gate matches the modem's state
    return grant


# ----------------------------------------------------------------------------- tests


def test_interfaces_appear_in_the_agent_namespace(
    netns_emu_factory: Factory, agent_netns: str
) -> None:
    emu = netns_emu_factory("--vendor", "generic", modems=2)
    names = [m["interface"] for m in emu.modems]
    assert len(set(names)) == 2
    assert all(len(n) <= 15 for n in names)
    assert set(names) <= set(links(agent_netns))
    for i, m in enumerate(emu.modems):
        assert m["netns"] in list_netns()
        assert m["netns"].startswith("esa-")
        assert m["agent_netns"] == agent_netns
        assert (m["gateway"], m["address"]) == (f"198.18.{i}.1", f"198.18.{i}.2")
        info = wait_until(lambda m=m: _carrier(agent_netns, m["interface"]))
        assert info["carrier"] == 1
    assert emu.info["net"] == "netns"


def _carrier(ns: str, ifname: str) -> dict[str, object] | None:
    info = link_info(ns, ifname)
    return info if info["carrier"] == 1 else None


def test_traffic_passes_only_after_pdp_activation(
    netns_emu_factory: Factory, agent_netns: str, tmp_path: Path
) -> None:
    emu = netns_emu_factory("--scenario", scenario(tmp_path, "generic", pdp_auto=False))
    facts = emu.modem("m0")
    with PortReader(emu.port) as port:
        port.command("ATE0")
        # before activation the agent can put the granted address up, but nothing passes
        configure_interface(agent_netns, facts["interface"], facts["address"], 24, facts["gateway"])
        assert blocked(lambda: tcp_echo(agent_netns, facts["server"], timeout=BLOCKED_TIMEOUT))
        assert blocked(lambda: dns_a(agent_netns, facts["gateway"], timeout=BLOCKED_TIMEOUT))
        assert emu.control("requests")["requests"] == {"http": [], "tcp": [], "dns": [], "dhcp": []}

        port.command('AT+CGDCONT=1,"IP","internet"')
        port.command("AT+CGACT=1,1")
        assert info_lines(port.command("AT+CGACT?")) == ["+CGACT: 1,1"]
        grant = bring_up(emu, agent_netns, port)
    assert grant == {
        "address": "198.18.0.2",
        "mask": "255.255.255.0",
        "gateway": "198.18.0.1",
        "dns": "198.18.0.1",
    }
    assert tcp_echo(agent_netns, facts["server"], b"hello") == b"hello"
    assert http_status(agent_netns, facts["server"]) == 204
    assert dns_a(agent_netns, grant["dns"]) == facts["server"]
    seen = emu.control("requests", reset=True)["requests"]
    assert seen["tcp"] == ["198.18.0.2"]
    assert seen["http"] == ["198.18.0.2"]
    assert seen["dns"] == ["198.18.0.2"]
    assert emu.control("requests")["requests"]["tcp"] == []


def test_each_modem_reaches_only_its_own_operator(
    netns_emu_factory: Factory, netns_factory: Callable[..., str]
) -> None:
    # two agent namespaces, one modem each, the same server address: each request is seen
    # only by the operator namespace behind the interface it left through
    ns_a, ns_b = netns_factory("a"), netns_factory("b")
    emu_a = netns_emu_factory("--vendor", "generic", netns=ns_a)
    emu_b = netns_emu_factory("--vendor", "generic", "--modems", "2", netns=ns_b)
    for emu, ns, modem in ((emu_a, ns_a, "m0"), (emu_b, ns_b, "m1")):
        facts = emu.modem(modem)
        configure_interface(ns, facts["interface"], facts["address"], 24, facts["gateway"])
        emu.status(modem)
        assert http_status(ns, facts["server"]) == 204
    assert emu_a.control("requests")["requests"]["http"] == ["198.18.0.2"]
    assert emu_b.control("requests", modem="m1")["requests"]["http"] == ["198.18.1.2"]
    assert emu_b.control("requests", modem="m0")["requests"]["http"] == []


def test_router_mode_needs_the_vendor_connect_and_serves_dhcp(
    netns_emu_factory: Factory, agent_netns: str
) -> None:
    emu = netns_emu_factory("--vendor", "quectel")
    facts = emu.modem("m0")
    assert facts["usbnet"] == "ecm"
    assert facts["dhcp"] is True
    with PortReader(emu.port) as port:
        port.command("ATE0")
        assert info_lines(port.command('AT+QCFG="usbnet"')) == ['+QCFG: "usbnet",1']
        # the default bearer is up after attach, but ECM passes nothing before QNETDEVCTL
        assert info_lines(port.command("AT+CGACT?")) == ["+CGACT: 1,1"]
        assert emu.status()["net"]["state"] == "down"
        dhcp = [
            sys.executable,
            "-m",
            "pyroute2.dhcp.cli",
            facts["interface"],
            "--exit-on-timeout",
            "1.5",
            "--no-release",
            "--lease-type",
            "pyroute2.dhcp.leases.JSONStdoutLease",
            "--log-level",
            "WARNING",
        ]
        configure_interface(agent_netns, facts["interface"], "0.0.0.0", 32)
        assert run_in_netns(agent_netns, dhcp, cwd=str(Path.cwd())).returncode != 0
        port.command("AT+QNETDEVCTL=1,1,1")
        assert info_lines(port.command("AT+QNETDEVCTL?")) == ["+QNETDEVCTL: 1,1,1,1"]
        emu.status()
        dhcp[5] = "10"
        done = run_in_netns(agent_netns, dhcp)
        assert done.returncode == 0, done.stderr
    info = link_info(agent_netns, facts["interface"])
    assert "198.18.0.2/24" in info["addresses"]
    assert emu.control("requests")["requests"]["dhcp"]  # the DHCP server logged the client
    assert http_status(agent_netns, facts["server"]) == 204
    assert emu.control("requests")["requests"]["http"] == ["198.18.0.2"]
    with PortReader(emu.port) as port:
        port.command("ATE0;+QNETDEVCTL=0,1,0")
    emu.status()
    assert blocked(lambda: http_status(agent_netns, facts["server"], timeout=BLOCKED_TIMEOUT))


def test_link_down_is_silent_while_the_modem_stays_registered(
    netns_emu_factory: Factory, agent_netns: str
) -> None:
    emu = netns_emu_factory("--vendor", "sierra")
    facts = emu.modem("m0")
    with PortReader(emu.port) as port:
        port.command("ATE0")
        port.command("AT!SCACT=1,1")
        assert info_lines(port.command("AT!SCACT?")) == ["!SCACT: 1,1"]
        bring_up(emu, agent_netns, port)
        assert tcp_echo(agent_netns, facts["server"]) == b"ping"

        assert emu.control("link", state="down")["net"]["state"] == "down"
        assert blocked(lambda: tcp_echo(agent_netns, facts["server"], timeout=BLOCKED_TIMEOUT))
        assert blocked(lambda: dns_a(agent_netns, facts["gateway"], timeout=BLOCKED_TIMEOUT))
        assert info_lines(port.command("AT+CREG?")) == ["+CREG: 0,1"]
        assert info_lines(port.command("AT+CEREG?")) == ["+CEREG: 0,1"]
        assert info_lines(port.command("AT+CGACT?")) == ["+CGACT: 1,1"]
    assert link_info(agent_netns, facts["interface"])["carrier"] == 1

    emu.control("link", state="up")
    assert tcp_echo(agent_netns, facts["server"]) == b"ping"


def test_unplug_drops_the_carrier_and_replug_restores_it(
    netns_emu_factory: Factory, agent_netns: str
) -> None:
    emu = netns_emu_factory("--vendor", "generic")
    facts = emu.modem("m0")
    configure_interface(agent_netns, facts["interface"], facts["address"], 24, facts["gateway"])
    emu.status()
    assert tcp_echo(agent_netns, facts["server"]) == b"ping"
    assert emu.control("unplug")["net"]["carrier"] is False
    wait_until(lambda: link_info(agent_netns, facts["interface"])["carrier"] == 0)
    assert blocked(lambda: tcp_echo(agent_netns, facts["server"], timeout=BLOCKED_TIMEOUT))
    assert emu.control("replug")["net"]["carrier"] is True
    wait_until(lambda: link_info(agent_netns, facts["interface"])["carrier"] == 1)
    assert tcp_echo(agent_netns, facts["server"]) == b"ping"


def test_degraded_link_adds_delay(netns_emu_factory: Factory, agent_netns: str) -> None:
    emu = netns_emu_factory("--vendor", "generic")
    facts = emu.modem("m0")
    configure_interface(agent_netns, facts["interface"], facts["address"], 24, facts["gateway"])
    emu.status()
    start = time.monotonic()
    assert http_status(agent_netns, facts["server"]) == 204
    baseline = time.monotonic() - start

    delay = max(0.5, baseline * 4)
    reply = emu.control("link", state="degraded", delay=delay, loss=0)
    assert reply["net"]["state"] == "degraded"
    start = time.monotonic()
    assert http_status(agent_netns, facts["server"], timeout=delay * 10) == 204
    assert time.monotonic() - start >= delay  # at least the configured delay was added


def test_context_drop_reports_cgev_and_stops_traffic(
    netns_emu_factory: Factory, agent_netns: str
) -> None:
    emu = netns_emu_factory("--vendor", "simcom")
    facts = emu.modem("m0")
    with PortReader(emu.port) as port:
        port.command("ATE0")
        port.command("AT+CGEREP=2,1")
        assert "$QCRMCALL: 1,V4" in port.command("AT$QCRMCALL=1,1")
        bring_up(emu, agent_netns, port)
        assert tcp_echo(agent_netns, facts["server"]) == b"ping"

        assert emu.control("pdp", op="drop", cid=1)["dropped"] == [1]
        port.read_until(b"+CGEV: NW PDN DEACT 1\r\n")
        assert info_lines(port.command("AT+CGACT?")) == ["+CGACT: 1,0"]
        assert info_lines(port.command("AT$QCRMCALL?")) == []
        assert blocked(lambda: tcp_echo(agent_netns, facts["server"], timeout=BLOCKED_TIMEOUT))

        # the agent re-establishes it: activation is reported, traffic flows again
        port.write("AT$QCRMCALL=1,1\r")
        port.read_until(b"+CGEV: ME PDN ACT 1\r\n")
        emu.status()
    assert tcp_echo(agent_netns, facts["server"]) == b"ping"


def test_mbim_modem_has_no_at_data_function(netns_emu_factory: Factory, agent_netns: str) -> None:
    emu = netns_emu_factory("--vendor", "dell")
    facts = emu.modem("m0")
    assert facts["usbnet"] == "mbim"
    assert facts["dhcp"] is False
    with PortReader(emu.port) as port:
        port.command("ATE0")
        for command in ("AT+QNETDEVCTL=1,1,1", "AT+GTRNDIS=1,1", "AT$QCRMCALL=1,1", "AT!SCACT=1,1"):
            assert port.command(command).endswith("ERROR\r\n")
        # whatever brought the MBIM session up (here: the attach), the interface carries it
        bring_up(emu, agent_netns, port)
    assert http_status(agent_netns, facts["server"]) == 204


def test_everything_is_removed_when_the_emulator_stops(
    netns_emu_factory: Factory, agent_netns: str
) -> None:
    emu = netns_emu_factory("--vendor", "generic", modems=2)
    spaces = [m["netns"] for m in emu.modems]
    names = [m["interface"] for m in emu.modems]
    assert emu.stop() == 0
    assert not set(spaces) & set(list_netns())
    wait_until(lambda: not set(names) & set(links(agent_netns)))


def test_sigkilled_emulator_is_cleaned_up(netns_emu_factory: Factory, agent_netns: str) -> None:
    emu = netns_emu_factory("--vendor", "generic", modems=2)
    spaces = [m["netns"] for m in emu.modems]
    names = [m["interface"] for m in emu.modems]
    os.kill(emu.proc.pid, signal.SIGKILL)
    emu.proc.wait(10)
    assert set(spaces) <= set(list_netns())  # a killed emulator cannot clean up itself
    assert sorted(cleanup_emulator(emu)) == sorted(spaces)
    assert not set(spaces) & set(list_netns())
    wait_until(lambda: not set(names) & set(links(agent_netns)))


def test_sweep_removes_namespaces_of_dead_runs_only(netns_sweep: list[str]) -> None:
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    dead = f"esa-{int(child.stdout)}-dead00-t"
    mine = f"esa-{os.getpid()}-live00-t"
    create_netns(dead)
    create_netns(mine)
    try:
        removed = sweep_stale()
        assert dead in removed
        assert mine not in removed
        assert mine in list_netns()
        assert dead not in list_netns()
    finally:
        remove_netns(dead)
        remove_netns(mine)


def test_netns_exec_runs_a_command_inside_a_namespace(
    netns_emu_factory: Factory, agent_netns: str
) -> None:
    emu = netns_emu_factory("--vendor", "generic")
    code = "import socket; print(' '.join(n for _, n in socket.if_nameindex()))"
    done = run_in_netns(agent_netns, [sys.executable, "-c", code])
    assert done.returncode == 0, done.stderr
    assert emu.modem("m0")["interface"] in done.stdout.split()
    missing = run_in_netns("esa-0-nonexistent-x", [sys.executable, "-c", "pass"])
    assert missing.returncode == 2
    assert "no network namespace" in missing.stderr
