"""The modem driver against the emulator: vendor detection, ICCID learning, charsets, signal merge."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from agent.at.channel import AtChannel
from agent.modem.driver import Modem
from agent.modem.vendors import vendor_by_name, vendor_for_manufacturer
from hw_fixtures.testing import EmulatorHandle, PortReader, start_emulator

ICCID = "8944500102030405067"
# personality -> (vendor profile the driver should pick, ICCID command the personality answers)
PERSONALITIES = {
    "generic": ("generic", "AT+CCID"),
    "quectel": ("quectel", "AT+QCCID"),
    "sierra": ("sierra", "AT!ICCID?"),
    "fibocom": ("fibocom", "AT+ICCID"),
    "simcom": ("simcom", "AT+CICCID"),
    "dell": ("dell", "AT+CCID"),
}


def sent_since(emu: EmulatorHandle, count_before: int) -> list[str]:
    """Command lines the emulator executed since its counter stood at count_before."""
    status = emu.status()
    new = status["commands"] - count_before
    assert new <= len(status["history"]), "history window too short for this check"
    history: list[str] = status["history"]
    return history[len(history) - new :] if new else []


@pytest.fixture(scope="module", params=list(PERSONALITIES))
def vendor_emu(request: pytest.FixtureRequest) -> Iterator[EmulatorHandle]:
    with start_emulator(
        "--vendor", request.param, "--fast", "--profile", f"{ICCID}:Home:enabled"
    ) as handle:
        yield handle


@pytest.fixture
async def vendor_modem(vendor_emu: EmulatorHandle) -> AsyncIterator[Modem]:
    modem = Modem(await AtChannel.open(vendor_emu.port))
    try:
        await modem.probe()
        yield modem
    finally:
        await modem.close()


async def open_probed(port: str, vendor: str | None = None) -> Modem:
    modem = Modem(await AtChannel.open(port), vendor_by_name(vendor) if vendor else None)
    await modem.probe()
    return modem


async def test_vendor_is_detected_from_cgmi(
    vendor_emu: EmulatorHandle, vendor_modem: Modem
) -> None:
    expected, _ = PERSONALITIES[vendor_emu.status()["vendor"]]
    assert vendor_modem.vendor.name == expected


async def test_iccid_command_is_learned_and_reused(
    vendor_emu: EmulatorHandle, vendor_modem: Modem
) -> None:
    _, command = PERSONALITIES[vendor_emu.status()["vendor"]]
    assert await vendor_modem.read_iccid() == ICCID
    before = vendor_emu.status()["commands"]
    assert await vendor_modem.read_iccid() == ICCID
    assert sent_since(vendor_emu, before) == [command]


async def test_generic_profile_finds_a_vendor_iccid_command_and_keeps_it() -> None:
    with start_emulator("--vendor", "sierra", "--fast", "--profile", f"{ICCID}:Home") as emu:
        modem = await open_probed(emu.port, vendor="generic")
        try:
            assert modem.vendor.name == "generic"  # forced: no auto-detection
            before = emu.status()["commands"]
            assert await modem.read_iccid() == ICCID
            tried = sent_since(emu, before)
            assert tried[-1] == "AT!ICCID?"
            assert tried[0] == "AT+CCID"
            before = emu.status()["commands"]
            assert await modem.read_iccid() == ICCID
            assert sent_since(emu, before) == ["AT!ICCID?"]
        finally:
            await modem.close()


@pytest.mark.parametrize("form", ["plain", "padded", "swapped"])
async def test_every_iccid_form_reads_as_digits(tmp_path: Path, form: str) -> None:
    scenario = tmp_path / "iccid.toml"
    scenario.write_text(
        "[[modem]]\n"
        'vendor = "generic"\n'
        f'iccid_form = "{form}"\n'
        "[[modem.profiles]]\n"
        f'iccid = "{ICCID}"\n'
        'name = "Home"\n'
        "enabled = true\n",
        encoding="utf-8",
    )
    with start_emulator("--scenario", str(scenario), "--fast") as emu:
        modem = await open_probed(emu.port)
        try:
            assert (await modem.sim_status()).iccid == ICCID
        finally:
            await modem.close()


@pytest.fixture
def quectel() -> Iterator[EmulatorHandle]:
    with start_emulator("--vendor", "quectel", "--fast") as handle:
        yield handle


async def test_ucs2_charset_decodes_operator_name(quectel: EmulatorHandle) -> None:
    with PortReader(quectel.port) as port:
        assert "OK" in port.command('AT+CSCS="UCS2"')
    # "Orange" in UCS2 hex, as the modem sends names when +CSCS is UCS2
    quectel.control("set_operator", name="004F00720061006E00670065", mcc_mnc="20801")
    modem = await open_probed(quectel.port)
    try:
        assert await modem.operator() == type(await modem.operator())(
            name="Orange", mcc_mnc="20801"
        )
    finally:
        await modem.close()


async def test_ira_charset_keeps_plain_names_and_still_decodes_ucs2_hex(
    quectel: EmulatorHandle,
) -> None:
    modem = await open_probed(quectel.port)
    try:
        quectel.control("set_operator", name="Home Mobile", mcc_mnc="23410")
        assert (await modem.operator()).name == "Home Mobile"
        # some modems send UCS2 names whatever +CSCS says
        quectel.control("set_operator", name="00540065006C00E9", mcc_mnc="20801")
        assert (await modem.operator()).name == "Telé"
        # a short name made of hex digits is a name, not UCS2
        quectel.control("set_operator", name="CAFE", mcc_mnc="20801")
        assert (await modem.operator()).name == "CAFE"
    finally:
        await modem.close()


async def test_signal_merges_csq_cesq_and_vendor_values(quectel: EmulatorHandle) -> None:
    quectel.control("set_signal", rssi_dbm=-83, ber=None, rsrp_dbm=-104, rsrq_db=-12, sinr_db=7)
    modem = await open_probed(quectel.port)
    try:
        sig = await modem.signal()
        assert sig.rssi_dbm == -83  # AT+CSQ
        assert (sig.rsrp_dbm, sig.rsrq_db) == (-104, -12)  # AT+CESQ
        assert sig.sinr_db == 7  # only AT+QCSQ / AT+QENG report it
        assert sig.ber is None
    finally:
        await modem.close()


async def test_vendor_signal_fills_in_when_cesq_is_rejected(tmp_path: Path) -> None:
    scenario = tmp_path / "nocesq.toml"
    scenario.write_text(
        '[[modem]]\nvendor = "quectel"\n[modem.replies]\n"AT+CESQ" = "\\nERROR\\n"\n',
        encoding="utf-8",
    )
    with start_emulator("--scenario", str(scenario), "--fast") as emu:
        emu.control("set_signal", rssi_dbm=-91, rsrp_dbm=-110, rsrq_db=-14, sinr_db=3)
        modem = await open_probed(emu.port)
        try:
            sig = await modem.signal()
            assert sig.rssi_dbm == -91
            assert (sig.rsrp_dbm, sig.rsrq_db, sig.sinr_db) == (-110, -14, 3)
        finally:
            await modem.close()


async def test_generic_modem_has_no_sinr_and_no_vendor_commands() -> None:
    with start_emulator("--vendor", "generic", "--fast") as emu:
        emu.control("set_signal", rssi_dbm=-75, rsrp_dbm=-99, rsrq_db=-9, sinr_db=11)
        modem = await open_probed(emu.port)
        try:
            before = emu.status()["commands"]
            sig = await modem.signal()
            assert sent_since(emu, before) == ["AT+CSQ", "AT+CESQ"]
            assert (sig.rssi_dbm, sig.rsrp_dbm, sig.rsrq_db, sig.sinr_db) == (-75, -99, -9, None)
        finally:
            await modem.close()


async def test_rejected_vendor_signal_command_is_not_sent_again(tmp_path: Path) -> None:
    scenario = tmp_path / "noqcsq.toml"
    scenario.write_text(
        '[[modem]]\nvendor = "quectel"\n[modem.replies]\n"AT+QCSQ" = "\\nERROR\\n"\n',
        encoding="utf-8",
    )
    with start_emulator("--scenario", str(scenario), "--fast") as emu:
        modem = await open_probed(emu.port)
        try:
            first = await modem.signal()
            before = emu.status()["commands"]
            second = await modem.signal()
            sent = sent_since(emu, before)
            assert "AT+QCSQ" not in sent
            assert 'AT+QENG="servingcell"' in sent
            assert first == second
            assert second.sinr_db is not None  # QENG still gives it
        finally:
            await modem.close()


async def test_signal_unknown_when_radio_is_off(quectel: EmulatorHandle) -> None:
    modem = await open_probed(quectel.port)
    try:
        await modem.set_cfun(4)
        sig = await modem.signal()
        assert (sig.rssi_dbm, sig.rsrp_dbm, sig.rsrq_db) == (None, None, None)
        assert (await modem.registration()).state != "home"
        assert await modem.cfun() == 4
    finally:
        await modem.close()


def _scenario(tmp_path: Path, vendor: str, replies: dict[str, str], **extra: str) -> Path:
    path = tmp_path / "replies.toml"
    lines = ["[[modem]]", f'vendor = "{vendor}"']
    lines += [f"{k} = {v!r}".replace("'", '"') for k, v in extra.items()]
    lines.append("[modem.replies]")
    for command, reply in replies.items():
        body = (
            reply.replace("\\", "\\\\").replace('"', '\\"').replace("\r", "").replace("\n", "\\n")
        )
        cmd = command.replace('"', '\\"')
        lines.append(f'"{cmd}" = "{body}"')
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


async def test_simcom_reports_sinr_from_cpsi() -> None:
    with start_emulator("--vendor", "simcom", "--fast") as emu:
        emu.control("set_signal", rssi_dbm=-81, rsrp_dbm=-101, rsrq_db=-11, sinr_db=9)
        modem = await open_probed(emu.port)
        try:
            sig = await modem.signal()
            assert (sig.rssi_dbm, sig.rsrp_dbm, sig.rsrq_db, sig.sinr_db) == (-81, -101, -11, 9)
        finally:
            await modem.close()


async def test_huawei_reports_lte_values_from_hcsq(tmp_path: Path) -> None:
    # An LTE ^HCSQ: rssi 44 -> -77 dBm, rsrp 37 -> -104 dBm, sinr 161 -> 12.0 dB, rsrq 20 -> -10 dB
    scenario = _scenario(
        tmp_path,
        "generic",
        {"AT+CESQ": "\nERROR\n", "AT^HCSQ?": '\n^HCSQ: "LTE",44,37,161,20\n\nOK\n'},
    )
    with start_emulator("--scenario", str(scenario), "--fast") as emu:
        modem = await open_probed(emu.port, "huawei")
        try:
            sig = await modem.signal()
            assert (sig.rsrp_dbm, sig.rsrq_db, sig.sinr_db) == (-104, -10, 12.0)
        finally:
            await modem.close()


async def test_scan_reads_a_list_split_across_lines(tmp_path: Path) -> None:
    reply = (
        '\n+COPS: (2,"Home","HM","26201",7),(1,"Other",\n'
        '"OT","26202"),2),\n(3,"0042006100720072006500640020",'
        '"","00320036003200300033",0),,(0-4),(0-2)\n\nOK\n'
    )
    scenario = _scenario(tmp_path, "generic", {"AT+COPS=?": reply})
    with start_emulator("--scenario", str(scenario), "--fast") as emu:
        modem = await open_probed(emu.port)
        try:
            ops = [(o.long, o.numeric, o.status, o.act) for o in (await modem.scan()).operators]
        finally:
            await modem.close()
    assert ops == [
        ("Home", "26201", "current", "lte"),
        ("Other", "26202", "available", "umts"),
        ("Barred ", "26203", "forbidden", "gsm"),
    ]


async def test_imei_followed_by_more_fields_is_read(tmp_path: Path) -> None:
    scenario = _scenario(tmp_path, "generic", {"AT+CGSN": "\n+CGSN: 356938035643809,01,12\n\nOK\n"})
    with start_emulator("--scenario", str(scenario), "--fast") as emu:
        modem = await open_probed(emu.port)
        try:
            assert (await modem.identity()).imei == "356938035643809"
        finally:
            await modem.close()


async def test_not_registered_idle_is_not_searching() -> None:
    with start_emulator("--vendor", "generic", "--fast") as emu:
        modem = await open_probed(emu.port)
        try:
            emu.control("set_registration", state="not_registered")
            assert (await modem.registration()).state == "not_registered"
            emu.control("set_registration", state="searching")
            assert (await modem.registration()).state == "searching"
        finally:
            await modem.close()


def test_cinterion_is_detected_and_reads_smoni() -> None:
    vendor = vendor_for_manufacturer("Cinterion Wireless Modules")
    assert (vendor.name, vendor.signal_commands) == ("cinterion", ("AT^SMONI",))


async def test_cinterion_fills_rsrp_from_smoni(tmp_path: Path) -> None:
    reply = "\n^SMONI: 4G,6300,20,10,10,FDD,262,02,BF75,0345103,350,33,-94,-7,NOCONN\n\nOK\n"
    scenario = _scenario(tmp_path, "generic", {"AT+CESQ": "\nERROR\n", "AT^SMONI": reply})
    with start_emulator("--scenario", str(scenario), "--fast") as emu:
        modem = await open_probed(emu.port, "cinterion")
        try:
            sig = await modem.signal()
            assert (sig.rsrp_dbm, sig.rsrq_db) == (-94, -7)
        finally:
            await modem.close()
