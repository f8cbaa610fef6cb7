"""The modem emulator as a client sees it: a real pty driven with os.read/os.write."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.errors import ConfigError
from hw_fixtures.at_syntax import split_command_line
from hw_fixtures.card_api import CardEvents, ProfileSpec
from hw_fixtures.control_client import ControlError
from hw_fixtures.modem_core import ModemCore
from hw_fixtures.personalities import get_personality
from hw_fixtures.scenario import default_modem, load_scenario
from hw_fixtures.testing import EmulatorHandle, PortReader, wait_for

SCENARIOS = Path(__file__).resolve().parent.parent / "hw_fixtures" / "scenarios"
ICCID19 = "8944500102030405067"
ISD_R = "A0000005591010FFFFFFFF8900000100"


@pytest.fixture
def emu(emu_factory: Callable[..., EmulatorHandle]) -> EmulatorHandle:
    return emu_factory("--vendor", "generic", "--profile", f"{ICCID19}:Home:enabled")


@pytest.fixture
def port(emu: EmulatorHandle) -> Iterator[PortReader]:
    with PortReader(emu.port) as reader:
        yield reader


def info_lines(reply: str) -> list[str]:
    lines = [x for x in reply.split("\r\n") if x]
    if lines and lines[0].upper().startswith("AT"):
        lines = lines[1:]  # the echo
    return [x for x in lines if x not in ("OK", "ERROR")]


# ---------------------------------------------------------------- start-up and basics


def test_ready_line_describes_ports_and_endpoints(emu: EmulatorHandle) -> None:
    m0 = emu.modem("m0")
    assert emu.port == m0["port"]
    assert emu.port.startswith("/dev/pts/")
    assert os.path.realpath(m0["link"]) == emu.port
    assert m0["http_url"] == f"http://127.0.0.1:{m0['http_port']}/generate_204"
    assert os.path.exists(emu.control_path)


def test_echo_is_on_by_default_and_ate0_turns_it_off(port: PortReader) -> None:
    assert port.command("AT") == "AT\r\r\nOK\r\n"
    assert port.command("ATE0") == "ATE0\r\r\nOK\r\n"
    assert port.command("AT") == "\r\nOK\r\n"
    assert port.command("ATE1") == "\r\nOK\r\n"
    assert port.command("AT").startswith("AT\r")


@pytest.mark.parametrize("terminator", ["\r", "\r\n", "\n"])
def test_any_line_terminator_is_accepted(port: PortReader, terminator: str) -> None:
    port.write("ATE0" + terminator)
    port.read_final()
    port.write("at+csq" + terminator)
    assert re.fullmatch(r"\r\n\+CSQ: \d+,\d+\r\n\r\nOK\r\n", port.read_final())


def test_identity_commands(port: PortReader) -> None:
    port.command("ATE0")
    assert info_lines(port.command("AT+CGMI")) == ["Generic"]
    assert info_lines(port.command("AT+CGMM")) == ["EMU-LTE"]
    assert info_lines(port.command("AT+CGMR")) == ["EMU_1.0.0"]
    (imei,) = info_lines(port.command("AT+CGSN"))
    assert re.fullmatch(r"\d{15}", imei)
    assert info_lines(port.command("ATI"))[0] == "Generic"


def test_cmee_modes_change_how_failures_read(port: PortReader) -> None:
    port.command("ATE0")
    assert port.command("AT+NOSUCH") == "\r\nERROR\r\n"
    port.command("AT+CMEE=1")
    assert port.command("AT+NOSUCH") == "\r\n+CME ERROR: 100\r\n"
    assert port.command("AT+CMEE=5") == "\r\n+CME ERROR: 50\r\n"
    port.command("AT+CMEE=2")
    assert port.command("AT+CREG=9") == "\r\n+CME ERROR: Incorrect parameters\r\n"
    assert info_lines(port.command("AT+CMEE?")) == ["+CMEE: 2"]


def test_several_commands_on_one_line(port: PortReader) -> None:
    port.command("ATE0")
    reply = port.command("AT+CREG=2;+CREG?;+CEREG?")
    assert info_lines(reply) == ['+CREG: 2,1,"1A2B","01A2B3C4",7', "+CEREG: 0,1"]
    # a failing command stops the line: nothing after it runs
    assert port.command("AT+CEREG=1;+BOGUS;+CEREG=2") == "\r\nERROR\r\n"
    assert info_lines(port.command("AT+CEREG?")) == ["+CEREG: 1,1"]


def test_cpin_and_missing_sim(emu: EmulatorHandle, port: PortReader) -> None:
    port.command("ATE0")
    assert info_lines(port.command("AT+CPIN?")) == ["+CPIN: READY"]
    emu.control("sim", state="absent")
    port.command("AT+CMEE=1")
    assert port.command("AT+CPIN?") == "\r\n+CME ERROR: 10\r\n"
    assert port.command("AT+CCID") == "\r\n+CME ERROR: 10\r\n"


def test_sim_pin_unlocks(emu: EmulatorHandle, port: PortReader) -> None:
    emu.control("sim", state="pin")
    port.command("ATE0;+CMEE=1")
    assert info_lines(port.command("AT+CPIN?")) == ["+CPIN: SIM PIN"]
    assert port.command('AT+CPIN="0000"') == "\r\n+CME ERROR: 16\r\n"
    assert port.command('AT+CPIN="1234"') == "\r\nOK\r\n"
    port.read_until(b"+CPIN: READY\r\n")


# --------------------------------------------------------------------- ICCID per vendor


@pytest.mark.parametrize(
    ("vendor", "command", "expected"),
    [
        ("generic", "AT+CCID", f"+CCID: {ICCID19}"),
        ("quectel", "AT+QCCID", f"+QCCID: {ICCID19}F"),
        ("sierra", "AT!ICCID?", f"!ICCID: {ICCID19}"),
        ("fibocom", "AT+ICCID", f"+ICCID: {ICCID19}"),
        ("simcom", "AT+CICCID", f"+ICCID: {ICCID19}"),
    ],
)
def test_iccid_form_per_vendor(
    emu_factory: Callable[..., EmulatorHandle], vendor: str, command: str, expected: str
) -> None:
    handle = emu_factory("--vendor", vendor, "--profile", f"{ICCID19}:Home:enabled")
    with PortReader(handle.port) as p:
        p.command("ATE0")
        assert info_lines(p.command(command)) == [expected]


# ---------------------------------------------------------------- network and signal


def test_registration_urcs_follow_set_registration(emu: EmulatorHandle, port: PortReader) -> None:
    port.command("ATE0;+CREG=2;+CEREG=1")
    emu.control("set_registration", state="roaming", tac="BEEF", cell_id=0x123456)
    port.read_until(b'+CREG: 5,"1A2B","00123456",7\r\n')
    port.read_until(b"+CEREG: 5\r\n")
    emu.control("set_registration", state="denied")
    port.read_until(b"+CREG: 3\r\n")
    port.read_until(b"+CEREG: 3\r\n")
    assert info_lines(port.command("AT+CEREG?")) == ["+CEREG: 1,3"]
    assert emu.status()["registration"]["state"] == "denied"


def test_signal_commands_reflect_set_signal(emu: EmulatorHandle, port: PortReader) -> None:
    port.command("ATE0")
    emu.control("set_signal", rssi_dbm=-53, rsrp_dbm=-80, rsrq_db=-7)
    assert info_lines(port.command("AT+CSQ")) == ["+CSQ: 30,99"]
    assert info_lines(port.command("AT+CESQ")) == ["+CESQ: 99,99,255,255,26,61"]
    emu.control("set_signal", rssi_dbm=None)
    assert info_lines(port.command("AT+CSQ")) == ["+CSQ: 99,99"]


def test_cops_formats_and_scan(emu: EmulatorHandle, port: PortReader) -> None:
    port.command("ATE0")
    emu.control("set_operator", name="Cafe Mobile", short="Cafe", mcc_mnc="24491")
    emu.control(
        "operators",
        operators=[
            {"name": "Other Net", "short": "Other", "mcc_mnc": "24405"},
            {"name": "Closed", "short": "Cl", "mcc_mnc": "24412", "status": "forbidden"},
        ],
    )
    assert info_lines(port.command("AT+COPS?")) == ['+COPS: 0,0,"Cafe Mobile",7']
    assert info_lines(port.command("AT+COPS=3,1;+COPS?")) == ['+COPS: 0,1,"Cafe",7']
    assert info_lines(port.command("AT+COPS=3,2;+COPS?")) == ['+COPS: 0,2,"24491",7']
    (scan,) = info_lines(port.command("AT+COPS=?"))
    assert scan.startswith('+COPS: (2,"Cafe Mobile","Cafe","24491",7),')
    assert '(1,"Other Net","Other","24405",7)' in scan
    assert '(3,"Closed","Cl","24412",7)' in scan


def test_cops_scan_is_slow(emu: EmulatorHandle, port: PortReader) -> None:
    emu.control("set_delays", cops_scan=0.6)
    port.command("ATE0")
    port.write("AT+COPS=?\r")
    with pytest.raises(TimeoutError):
        port.read_final(timeout=0.3)
    assert "+COPS: (" in port.read_final(timeout=3)


def test_pdp_contexts(port: PortReader) -> None:
    port.command("ATE0")
    port.command('AT+CGDCONT=2,"IPV4V6","travel.example"')
    assert info_lines(port.command("AT+CGDCONT?")) == [
        '+CGDCONT: 1,"IP","internet","0.0.0.0",0,0',
        '+CGDCONT: 2,"IPV4V6","travel.example","0.0.0.0",0,0',
    ]
    assert info_lines(port.command("AT+CGACT?")) == ["+CGACT: 1,1", "+CGACT: 2,0"]
    port.command("AT+CGACT=1,2")
    lines = info_lines(port.command("AT+CGPADDR"))
    assert len(lines) == 2
    assert all(re.match(r'\+CGPADDR: \d,"10\.64\.', x) for x in lines)
    port.command("AT+CGACT=0,1")
    assert info_lines(port.command("AT+CGPADDR=1")) == ['+CGPADDR: 1,"0.0.0.0"']


def test_cfun_off_and_on(emu: EmulatorHandle, port: PortReader) -> None:
    port.command("ATE0;+CEREG=1")
    port.command("AT+CFUN=4")
    port.read_until(b"+CEREG: 0\r\n")
    assert info_lines(port.command("AT+CFUN?")) == ["+CFUN: 4"]
    assert emu.status()["data_path"] == "down"
    port.command("AT+CFUN=1")
    port.read_until(b"+CEREG: 2\r\n")
    port.read_until(b"+CEREG: 1\r\n")
    assert emu.status()["data_path"] == "up"


def test_cfun_reset_goes_silent_and_reannounces(
    emu_factory: Callable[..., EmulatorHandle],
) -> None:
    handle = emu_factory("--vendor", "quectel")
    handle.control("set_delays", reset=0.5)
    with PortReader(handle.port) as p:
        p.command("ATE0;+CMEE=2;+CEREG=1")
        assert p.command("AT+CFUN=1,1") == "\r\nOK\r\n"
        p.write("AT\r")  # lost: the modem is rebooting
        boot = p.read_until(b"+QIND: SMS DONE\r\n", timeout=3)
        assert (
            boot
            == b"\r\nRDY\r\n\r\n+CFUN: 1\r\n\r\n+CPIN: READY\r\n\r\n+QUSIM: 1\r\n\r\n+QIND: SMS DONE\r\n"
        )
        # echo and CMEE are back at their defaults; registration returns by itself
        assert p.command("AT+NOSUCH") == "AT+NOSUCH\r\r\nERROR\r\n"
        wait_for(lambda: handle.status()["registration"]["state"] == "home")


def test_test_commands_rejected_by_some_vendors(
    emu_factory: Callable[..., EmulatorHandle],
) -> None:
    sierra = emu_factory("--vendor", "sierra")
    generic = emu_factory("--vendor", "generic")
    with PortReader(sierra.port) as s, PortReader(generic.port) as g:
        assert s.command("AT+CREG=?").endswith("\r\nERROR\r\n")
        assert "+CREG: (0-2)" in g.command("AT+CREG=?")
        assert s.command("AT+CREG?").endswith("\r\nOK\r\n")


# ------------------------------------------------------------------------ eUICC access


def ccho(p: PortReader) -> str:
    return p.command(f'AT+CCHO="{ISD_R}"')


@pytest.mark.parametrize(
    ("vendor", "pattern"),
    [
        ("generic", r"\+CCHO: (\d+)"),
        ("quectel", r"\+CCHO: (\d+)"),
        ("sierra", r"\+CCHO: ([0-9a-f]{16})"),
        ("fibocom", r"(\d+)"),
    ],
)
def test_logical_channel_session_id_forms(
    emu_factory: Callable[..., EmulatorHandle], vendor: str, pattern: str
) -> None:
    handle = emu_factory("--vendor", vendor)
    with PortReader(handle.port) as p:
        p.command("ATE0")
        (line,) = info_lines(ccho(p))
        m = re.fullmatch(pattern, line)
        assert m is not None, line
        sid = m.group(1)
        # GET EID; lower-case hex must be accepted, the answer comes upper case
        apdu = "81e2910006bf3e035c015a"
        (reply,) = info_lines(p.command(f'AT+CGLA={sid},{len(apdu)},"{apdu}"'))
        eid = handle.modem("m0")["eid"]
        assert reply == f'+CGLA: {len(eid) + 14},"BF3E125A10{eid}9000"'
        closed = p.command(f"AT+CCHC={sid}")
        assert closed.endswith("ERROR\r\n") if vendor == "sierra" else closed == "\r\nOK\r\n"


def test_simcom_apdu_replies_have_no_space(emu_factory: Callable[..., EmulatorHandle]) -> None:
    handle = emu_factory("--vendor", "simcom")
    with PortReader(handle.port) as p:
        p.command("ATE0")
        ccho(p)
        assert info_lines(p.command('AT+CGLA=1,10,"81CA00FF00"')) == ['+CGLA:4,"6D00"']


def test_cgla_length_must_match(port: PortReader) -> None:
    port.command("ATE0;+CMEE=1")
    ccho(port)
    assert port.command('AT+CGLA=1,12,"81CA00FF00"') == "\r\n+CME ERROR: 50\r\n"


def test_modem_without_channels_offers_csim(emu_factory: Callable[..., EmulatorHandle]) -> None:
    handle = emu_factory("--vendor", "dell")
    with PortReader(handle.port) as p:
        p.command("ATE0")
        assert ccho(p) == "\r\nERROR\r\n"
        p.command("AT+CMEE=1")
        assert ccho(p) == "\r\n+CME ERROR: 3\r\n"
        (opened,) = info_lines(p.command('AT+CSIM=10,"0070000001"'))
        m = re.fullmatch(r'\+CSIM: 6,"0(\d)9000"', opened)
        assert m is not None, opened
        channel = m.group(1)
        select = f"0{channel}A4040010{ISD_R}"
        assert info_lines(p.command(f'AT+CSIM={len(select)},"{select}"'))[0].endswith('9000"')


def enable_apdu(iccid: str) -> str:
    digits = iccid.ljust(20, "F")
    bcd = "".join(digits[i + 1] + digits[i] for i in range(0, 20, 2))
    body = f"BF3111A00C5A0A{bcd}8101FF"
    return f"81E29100{len(body) // 2:02X}{body}"


def test_enabling_a_profile_reregisters_on_its_operator(
    emu_factory: Callable[..., EmulatorHandle],
) -> None:
    handle = emu_factory("--scenario", str(SCENARIOS / "travel.toml"))
    with PortReader(handle.port) as p:
        p.command("ATE0;+CEREG=1;+COPS=3,2")
        ccho(p)
        apdu = enable_apdu("8988247000001234567")
        (reply,) = info_lines(p.command(f'AT+CGLA=1,{len(apdu)},"{apdu}"'))
        assert reply == '+CGLA: 14,"BF3103800100"' or reply.endswith('9000"')
        p.read_until(b"+CEREG: 2\r\n")
        p.read_until(b"+CEREG: 1\r\n")
        assert info_lines(p.command("AT+COPS?")) == ['+COPS: 0,2,"20801",7']
        assert info_lines(p.command("AT+QCCID")) == ["+QCCID: 8988247000001234567F"]


def test_broken_profile_never_registers(emu_factory: Callable[..., EmulatorHandle]) -> None:
    handle = emu_factory("--scenario", str(SCENARIOS / "travel.toml"))
    handle.control("profile", op="broken", iccid="8988247000001234567")
    with PortReader(handle.port) as p:
        p.command("ATE0;+CEREG=1")
        ccho(p)
        apdu = enable_apdu("8988247000001234567")
        p.command(f'AT+CGLA=1,{len(apdu)},"{apdu}"')
        p.read_until(b"+CEREG: 2\r\n")
        with pytest.raises(TimeoutError):
            p.read_until(b"+CEREG: 1\r\n", timeout=0.8)  # reattach is 0.2 s with --fast
    assert handle.status()["registration"]["state"] == "searching"


def test_sierra_needs_a_cfun_cycle_after_a_switch(
    emu_factory: Callable[..., EmulatorHandle],
) -> None:
    handle = emu_factory(
        "--vendor", "sierra", "--profile", "8944500102030405067:A:enabled",
        "--profile", "8988247000001234567:B",
    )  # fmt: skip
    with PortReader(handle.port) as p:
        p.command("ATE0;+CEREG=1")
        (line,) = info_lines(ccho(p))
        sid = line.split(": ")[1]
        apdu = enable_apdu("8988247000001234567")
        p.command(f'AT+CGLA={sid},{len(apdu)},"{apdu}"')
        p.read_until(b"+CEREG: 2\r\n")
        wait_for(lambda: handle.status()["registration"]["pending_refresh"])
        p.command("AT+CFUN=0")
        p.command("AT+CFUN=1")
        p.read_until(b"+CEREG: 1\r\n")
    assert handle.status()["operator"]["mcc_mnc"] == "00102"


# ------------------------------------------------------------------ scenarios and control


def test_travel_scenario_has_two_distinct_modems(
    emu_factory: Callable[..., EmulatorHandle],
) -> None:
    handle = emu_factory("--scenario", str(SCENARIOS / "travel.toml"))
    m0, m1 = handle.modem("m0"), handle.modem("m1")
    assert (m0["vendor"], m1["vendor"]) == ("quectel", "sierra")
    assert m0["port"] != m1["port"]
    assert m0["http_port"] != m1["http_port"]
    with PortReader(m1["link"]) as p:
        p.command("ATE0")
        assert info_lines(p.command("AT!ICCID?")) == ["!ICCID: 8931440000012345678"]
        assert info_lines(p.command("AT+CREG?")) == ["+CREG: 0,5"]
    handle.control("set_registration", modem="m1", state="searching")
    statuses = {m["id"]: m for m in handle.control("status")["modems"]}
    assert statuses["m1"]["registration"]["state"] == "searching"
    assert statuses["m0"]["registration"]["state"] == "home"
    assert statuses["m0"]["operator"]["name"] == "Home Mobile"


def test_replies_table_replays_recorded_text(
    emu_factory: Callable[..., EmulatorHandle], tmp_path: Path
) -> None:
    scenario = tmp_path / "rec.toml"
    scenario.write_text(
        '[[modem]]\nvendor = "quectel"\n[modem.replies]\n'
        '"AT+QENG=\\"servingcell\\"" = "\\n+QENG: \\"servingcell\\",\\"LIMSRV\\"\\n\\nOK\\n"\n'
    )
    handle = emu_factory("--scenario", str(scenario))
    with PortReader(handle.port) as p:
        p.command("ATE0")
        assert (
            p.command('AT+QENG="servingcell"') == '\r\n+QENG: "servingcell","LIMSRV"\r\n\r\nOK\r\n'
        )


def test_control_rejects_bad_requests(emu: EmulatorHandle) -> None:
    with pytest.raises(ControlError, match="unknown cmd"):
        emu.control("frobnicate")
    with pytest.raises(ControlError, match="no modem"):
        emu.control("status", modem="m9")
    with pytest.raises(ControlError, match="state must be"):
        emu.control("set_registration", state="asleep")


def test_shutdown_removes_socket_and_link(emu: EmulatorHandle) -> None:
    link = emu.modem("m0")["link"]
    emu.control("shutdown")
    assert emu.proc.wait(10) == 0
    assert not os.path.exists(emu.control_path)
    assert not os.path.lexists(link)


def test_scenario_rejects_unknown_keys(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[[modem]]\nvendor = "quectel"\ncolour = "blue"\n')
    with pytest.raises(ConfigError, match="colour"):
        load_scenario(bad)
    assert [m.id for m in load_scenario(SCENARIOS / "single.toml")] == ["m0"]


# ------------------------------------------------------------- sans-IO core, fake card


class FakeClock:
    """Timers that fire only when the test advances time."""

    def __init__(self) -> None:
        self.now = 0.0
        self.timers: list[tuple[float, int, Callable[[], None], list[bool]]] = []
        self._seq = 0

    def schedule(self, delay: float, fn: Callable[[], None]) -> _Handle:
        self._seq += 1
        flag = [False]
        self.timers.append((self.now + delay, self._seq, fn, flag))
        return _Handle(flag)

    def advance(self, seconds: float) -> None:
        end = self.now + seconds
        while True:
            due = sorted(t for t in self.timers if t[0] <= end and not t[3][0])
            if not due:
                break
            when, seq, fn, _flag = due[0]
            self.timers = [t for t in self.timers if t[1] != seq]
            self.now = when
            fn()
        self.now = end


class _Handle:
    def __init__(self, flag: list[bool]) -> None:
        self.flag = flag

    def cancel(self) -> None:
        self.flag[0] = True


class RecordingCard:
    """A card that records how the modem routed each APDU."""

    eid = "89049032123451234512345678901235"

    def __init__(self, events: CardEvents) -> None:
        self.events = events
        self.profiles = [
            ProfileSpec(iccid="8944000000000000011", enabled=True, mcc_mnc="00101"),
            ProfileSpec(iccid="8944000000000000029", operator_name="Other", mcc_mnc="00102"),
        ]
        self.seen: list[tuple[int, str]] = []

    def enabled_profile(self) -> ProfileSpec | None:
        return next((p for p in self.profiles if p.enabled), None)

    def open_channel(self, aid: bytes) -> int:
        return 3

    def close_channel(self, channel: int) -> None:
        pass

    def transmit(self, channel: int, apdu: bytes) -> bytes:
        self.seen.append((channel, apdu.hex().upper()))
        if apdu[1] == 0x31:  # test-local "switch" instruction
            self.profiles[0].enabled, self.profiles[1].enabled = False, True
            self.events.on_profile_change(self.profiles[1])
        return b"\x90\x00"

    def transmit_basic(self, apdu: bytes) -> bytes:
        return b"\x6d\x00"


def make_core(vendor: str = "sierra") -> tuple[ModemCore, RecordingCard, FakeClock, bytearray]:
    clock = FakeClock()
    out = bytearray()
    events = CardEvents()
    card = RecordingCard(events)
    cfg = default_modem(0, vendor)
    core = ModemCore(cfg, get_personality(vendor), card, write=out.extend, schedule=clock.schedule)
    events.on_profile_change = core.on_profile_change
    return core, card, clock, out


def test_cgla_routes_by_session_id_whatever_the_cla_says() -> None:
    core, card, _clock, out = make_core("sierra")
    core.feed(b'ATE0\rAT+CCHO="A0000005591010FFFFFFFF8900000100"\r')
    token = re.search(rb"\+CCHO: ([0-9a-f]+)", bytes(out))
    assert token is not None
    sid = token.group(1).decode().upper()  # the token is matched case-insensitively
    core.feed(f'AT+CGLA={sid},10,"80CA00FF00"\rAT+CGLA={sid},10,"83ca00ff00"\r'.encode())
    assert card.seen == [(3, "80CA00FF00"), (3, "83CA00FF00")]
    assert bytes(out).count(b'+CGLA: 4,"9000"') == 2


def test_profile_switch_waits_for_reattach_delay() -> None:
    core, _card, clock, out = make_core("generic")
    core.feed(b'ATE0;+CEREG=1\rAT+CCHO="A0"\rAT+CGLA=3,8,"80310000"\r')
    clock.advance(0.0)
    assert out.endswith(b"\r\n+CEREG: 2\r\n")
    clock.advance(core.delays.reattach - 0.1)
    assert core.reg_stat() == 2
    clock.advance(0.2)
    assert out.endswith(b"\r\n+CEREG: 1\r\n")
    assert core.operator.mcc_mnc == "00102"


def test_refresh_read_before_the_deferred_switch_still_registers() -> None:
    # On a busy machine the host's CFUN=0/CFUN=1 can be read before the card's deferred
    # profile-change callback runs; the modem must still register on the new profile.
    core, _card, clock, out = make_core("sierra")
    core.feed(b'ATE0\rAT+CCHO="A0"\r')
    token = re.search(rb"\+CCHO: ([0-9a-f]+)", bytes(out))
    assert token is not None
    sid = token.group(1).decode()
    core.feed(f'AT+CGLA={sid},8,"80310000"\rAT+CFUN=0\rAT+CFUN=1\r'.encode())
    clock.advance(core.delays.reattach + 0.1)
    assert core.reg_stat() == 1
    assert core.operator.mcc_mnc == "00102"


def test_command_line_splitting() -> None:
    cmds = split_command_line('ATE0V1+CMEE=2;+CGDCONT=1,"IP","a;b";!GSTATUS?')
    assert cmds is not None
    assert [(c.name, c.kind, c.args) for c in cmds] == [
        ("E", "exec", "0"),
        ("V", "exec", "1"),
        ("+CMEE", "set", "2"),
        ("+CGDCONT", "set", '1,"IP","a;b"'),
        ("!GSTATUS", "query", ""),
    ]
    assert split_command_line("hello") is None


@pytest.mark.parametrize(
    ("vendor", "command", "prefix"),
    [
        ("quectel", "AT+QCSQ", '+QCSQ: "LTE",-71,-95,165,-10'),
        ("quectel", 'AT+QENG="servingcell"', '+QENG: "servingcell","NOCONN","LTE","FDD",001,01'),
        ("sierra", "AT!GSTATUS?", "!GSTATUS:"),
        ("simcom", "AT+CPSI?", "+CPSI: LTE,Online,001-01,0x1A2B,"),
        ("fibocom", "AT+GTCCINFO?", "+GTCCINFO:"),
    ],
)
def test_vendor_signal_extensions(
    emu_factory: Callable[..., EmulatorHandle], vendor: str, command: str, prefix: str
) -> None:
    handle = emu_factory("--vendor", vendor)
    generic = emu_factory("--vendor", "generic")
    with PortReader(handle.port) as p, PortReader(generic.port) as g:
        p.command("ATE0")
        assert info_lines(p.command(command))[0].startswith(prefix)
        assert g.command(command).endswith("\r\nERROR\r\n")


def test_quectel_reports_signal_changes_unsolicited(
    emu_factory: Callable[..., EmulatorHandle],
) -> None:
    handle = emu_factory("--vendor", "quectel")
    with PortReader(handle.port) as p:
        handle.control("set_signal", rssi_dbm=-91)
        assert p.read_until(b"\r\n", timeout=3) == b"\r\n"
        assert p.read_until(b"\r\n", timeout=3) == b'+QIND: "csq",11,99\r\n'


def test_numeric_result_codes_with_atv0(port: PortReader) -> None:
    port.command("ATE0")
    port.write("ATV0\r")
    assert port.read_until(b"\r", timeout=3) == b"0\r"
    port.write("AT+CSQ\r")
    assert port.read_until(b"0\r", timeout=3).startswith(b"+CSQ: ")
    port.write("AT+NOSUCH\r")
    assert port.read_until(b"\r", timeout=3) == b"4\r"


def test_each_reply_follows_its_own_echo() -> None:
    core, _card, _clock, out = make_core("generic")
    core.feed(b"AT\r\nAT+CMEE?\r")
    assert bytes(out) == b"AT\r\n\r\nOK\r\nAT+CMEE?\r\r\n+CMEE: 0\r\n\r\nOK\r\n"


def test_cops_deregister_and_automatic() -> None:
    core, _card, clock, out = make_core("generic")
    core.feed(b"ATE0;+CEREG=1\rAT+COPS=2\r")
    assert out.endswith(b"\r\nOK\r\n\r\n+CEREG: 0\r\n")
    core.feed(b"AT+COPS?\r")
    assert out.endswith(b"\r\n+COPS: 2\r\n\r\nOK\r\n")
    core.feed(b"AT+COPS=0\r")
    clock.advance(core.delays.reattach + 0.1)
    assert out.endswith(b"\r\n+CEREG: 1\r\n")
