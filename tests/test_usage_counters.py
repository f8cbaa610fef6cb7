"""Modem byte counters: the QGDCNT parser, and read_counters against the emulator over a real pty."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.at.channel import AtChannel
from agent.errors import AtTimeout, ParseError
from agent.modem.counters import (
    Counters,
    counter_command,
    parse_qgdcnt,
    read_counters,
    reset_counters,
)
from hw_fixtures.control_client import ControlError
from hw_fixtures.testing import EmulatorHandle, start_emulator

ICCID = "8944500102030405067"


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ("123,456", Counters(rx_bytes=456, tx_bytes=123)),
        (" 0 , 0 ", Counters(rx_bytes=0, tx_bytes=0)),
        ('"77","88"', Counters(rx_bytes=88, tx_bytes=77)),
        ("5,6,1", Counters(rx_bytes=6, tx_bytes=5)),
        ("18446744073709551615,1", Counters(rx_bytes=1, tx_bytes=18446744073709551615)),
    ],
)
def test_qgdcnt_reads_sent_then_received(payload: str, expected: Counters) -> None:
    assert parse_qgdcnt(payload) == expected


@pytest.mark.parametrize("payload", ["", "12", "a,b", "-1,2", "1.5,2", "1,", ",1", "0x10,2"])
def test_qgdcnt_rejects_what_is_not_two_byte_counts(payload: str) -> None:
    with pytest.raises(ParseError) as info:
        parse_qgdcnt(payload)
    assert info.value.text == payload


@given(st.text())
def test_qgdcnt_on_any_text_gives_counters_or_parse_error(text: str) -> None:
    try:
        got = parse_qgdcnt(text)
    except ParseError:
        return
    assert got.rx_bytes >= 0
    assert got.tx_bytes >= 0


@given(st.integers(0, 2**63), st.integers(0, 2**63), st.sampled_from(["", " "]))
def test_qgdcnt_round_trips_any_counts(sent: int, recv: int, space: str) -> None:
    assert parse_qgdcnt(f"{space}{sent},{space}{recv}") == Counters(rx_bytes=recv, tx_bytes=sent)


def test_only_vendors_with_a_documented_counter_have_one() -> None:
    assert counter_command("Quectel") is not None
    for vendor in ("generic", "sierra", "fibocom", "simcom", "dell", "auto", ""):
        assert counter_command(vendor) is None


@pytest.fixture
def quectel() -> Iterator[EmulatorHandle]:
    with start_emulator(
        "--vendor", "quectel", "--fast", "--log-level", "warning", "--profile", f"{ICCID}:Home"
    ) as emu:
        yield emu


async def test_quectel_counters_follow_traffic_and_reset(quectel: EmulatorHandle) -> None:
    ch = await AtChannel.open(quectel.port)
    try:
        first = await read_counters(ch, "quectel")
        assert first == Counters(rx_bytes=0, tx_bytes=0)
        quectel.control("traffic", rx=4_000, tx=1_500)
        assert await read_counters(ch, "quectel") == Counters(rx_bytes=4_000, tx_bytes=1_500)
        assert await reset_counters(ch, "quectel") is True
        assert await read_counters(ch, "quectel") == Counters(rx_bytes=0, tx_bytes=0)
    finally:
        await ch.close()


async def test_generic_modem_has_no_counter_and_is_not_asked() -> None:
    with start_emulator("--vendor", "generic", "--fast", "--log-level", "warning") as emu:
        ch = await AtChannel.open(emu.port)
        try:
            before = emu.status()["commands"]
            assert await read_counters(ch, "generic") is None
            assert await reset_counters(ch, "generic") is False
            assert emu.status()["commands"] == before
            # The emulator still counts: the status shows what the modem would have said.
            emu.control("traffic", rx=10, tx=5)
            assert emu.status()["counters"] == {"rx_bytes": 10, "tx_bytes": 5}
        finally:
            await ch.close()


async def test_firmware_without_the_command_or_with_odd_replies_gives_none(
    tmp_path: Path,
) -> None:
    scenario = tmp_path / "odd.toml"
    scenario.write_text(
        "[[modem]]\n"
        'vendor = "quectel"\n'
        "[modem.replies]\n"
        '"AT+QGDCNT?" = "\\n+QGDCNT: lots,many\\n\\nOK\\n"\n'
        '"AT+QGDCNT=0" = "\\nERROR\\n"\n'
        "[[modem]]\n"
        'vendor = "quectel"\n'
        "[modem.replies]\n"
        '"AT+QGDCNT?" = "\\nERROR\\n"\n'
        "[[modem]]\n"
        'vendor = "quectel"\n'
        "[modem.replies]\n"
        '"AT+QGDCNT?" = "\\nOK\\n"\n'
    )
    with start_emulator("--scenario", str(scenario), "--fast", "--log-level", "warning") as emu:
        for modem in emu.modems:
            ch = await AtChannel.open(modem["port"])
            try:
                assert await read_counters(ch, "quectel") is None
                if modem["id"] == "m0":
                    assert await reset_counters(ch, "quectel") is False
            finally:
                await ch.close()


async def test_a_hung_modem_raises_timeout(quectel: EmulatorHandle) -> None:
    ch = await AtChannel.open(quectel.port)
    try:
        quectel.control("fault", kind="hang")
        with pytest.raises(AtTimeout):
            await read_counters(ch, "quectel", timeout=0.3)
    finally:
        await ch.close()


def test_traffic_is_refused_while_the_data_path_is_down(quectel: EmulatorHandle) -> None:
    quectel.control("link", state="down")
    with pytest.raises(ControlError, match="data path is down"):
        quectel.control("traffic", rx=1, tx=1)
    assert quectel.status()["counters"] == {"rx_bytes": 0, "tx_bytes": 0}
