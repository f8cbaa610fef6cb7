"""A safe switch rolls back on any failure, foreign exceptions included, and re-reads the card."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from agent.errors import ParseError
from agent.euicc.lpa import Lpa
from agent.euicc.switch import SafeSwitch
from agent.euicc.transport import AtApduTransport
from agent.health.probes import HttpProbe, parse_http_status_line
from agent.modem.driver import open_modem
from hw_fixtures.testing import EmulatorHandle, start_emulator

HOME = "8944476500001224158"
TRAVEL = "89012345678901234567"


@pytest.fixture
def emu() -> Iterator[EmulatorHandle]:
    with start_emulator(
        "--fast",
        "--log-level",
        "warning",
        "--profile",
        f"{HOME}:Home:enabled",
        "--profile",
        f"{TRAVEL}:Travel",
    ) as handle:
        yield handle


@pytest.fixture
async def odd_http_server() -> AsyncIterator[int]:
    """An HTTP server whose status code is three superscript digits (latin-1 bytes B2 B3 B9)."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 \xb2\xb3\xb9 OK\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("line", [b"HTTP/1.1 \xb2\xb3\xb9 OK\r\n", "HTTP/1.1 ٢٠٤ OK".encode()])
def test_non_ascii_status_code_is_a_parse_error(line: bytes) -> None:
    with pytest.raises(ParseError):
        parse_http_status_line(line)


async def test_http_probe_with_non_ascii_status_fails_cleanly(odd_http_server: int) -> None:
    result = await HttpProbe(f"http://127.0.0.1:{odd_http_server}/", timeout=5.0).run()
    assert not result.ok
    assert result.error == "malformed status line"


async def test_probe_raising_a_foreign_error_still_rolls_back(
    emu: EmulatorHandle, tmp_path: Path
) -> None:
    calls = 0

    async def buggy_probe() -> bool:
        nonlocal calls
        calls += 1
        raise RuntimeError("probe bug")

    async with open_modem(emu.port) as modem:
        switch = SafeSwitch(
            modem,
            lambda: Lpa(AtApduTransport(modem.channel, modem.port, state_dir=tmp_path)),
            rollback_timeout=10,
            poll_s=0.05,
            probe=buggy_probe,
        )
        report = await switch.run(TRAVEL)
    cards = emu.control("profile")["profiles"]
    assert calls == 1
    assert report.outcome == "rolled_back"
    assert "RuntimeError: probe bug" in (report.error or "")
    assert report.enabled_iccid == HOME
    assert emu.status()["iccid"] == HOME
    assert [p["enabled"] for p in cards] == [True, False]


async def test_http_probe_with_non_ascii_status_rolls_back(
    emu: EmulatorHandle, tmp_path: Path, odd_http_server: int
) -> None:
    http = HttpProbe(f"http://127.0.0.1:{odd_http_server}/", timeout=5.0)

    async def probe() -> bool:
        return (await http.run()).ok

    async with open_modem(emu.port) as modem:
        switch = SafeSwitch(
            modem,
            lambda: Lpa(AtApduTransport(modem.channel, modem.port, state_dir=tmp_path)),
            rollback_timeout=10,
            poll_s=0.05,
            probe=probe,
        )
        report = await switch.run(TRAVEL)
    assert report.outcome == "rolled_back", report.error
    assert report.enabled_iccid == HOME
    assert emu.status()["iccid"] == HOME
