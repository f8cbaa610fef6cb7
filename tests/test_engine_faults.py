"""The AT engine against the real emulator over a real pty: every fault kind, then recovery."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator

import pytest

from agent.at import parsers
from agent.at.channel import AtChannel
from agent.errors import AtTimeout, PortGoneError
from agent.modem.driver import Modem
from hw_fixtures.testing import EmulatorHandle, start_emulator, wait_for


@pytest.fixture
def emu() -> Iterator[EmulatorHandle]:
    with start_emulator("--vendor", "quectel", "--fast") as handle:
        yield handle


@pytest.fixture
async def ch(emu: EmulatorHandle) -> AsyncIterator[AtChannel]:
    channel = await AtChannel.open(emu.port)
    try:
        yield channel
    finally:
        await channel.close()


async def until(predicate: Callable[[], object], timeout: float = 5.0) -> None:
    """Deadline loop on a condition that has no event to wait on (the emulator's state)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.02)


def expected_rssi(emu: EmulatorHandle) -> int:
    rssi: int = emu.status()["signal"]["rssi_dbm"]
    return rssi


async def assert_csq_ok(ch: AtChannel, emu: EmulatorHandle) -> None:
    """AT+CSQ answers with exactly one +CSQ line carrying the emulator's RSSI."""
    resp = await ch.command("AT+CSQ", timeout=3.0)
    assert resp.final == "OK"
    values = resp.values("+CSQ")
    assert len(values) == 1, resp.lines
    rssi, _ber = parsers.parse_csq(values[0])
    assert rssi == expected_rssi(emu)


class LineCollector:
    """URC subscriber that records lines and wakes waiters when a predicate holds."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._changed = asyncio.Event()

    def __call__(self, line: str) -> None:
        self.lines.append(line)
        self._changed.set()

    async def wait(self, predicate: Callable[[list[str]], bool], timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate(self.lines):
                self._changed.clear()
                await self._changed.wait()


async def test_hang_times_out_then_next_command_succeeds(
    emu: EmulatorHandle, ch: AtChannel
) -> None:
    await assert_csq_ok(ch, emu)
    emu.control("fault", kind="hang")
    with pytest.raises(AtTimeout) as info:
        await ch.command("AT+CSQ", timeout=0.3)
    assert info.value.command == "AT+CSQ"
    assert ch.consecutive_timeouts == 1
    emu.control("clear", kind="hang")
    await assert_csq_ok(ch, emu)
    assert ch.consecutive_timeouts == 0


async def test_hang_that_never_clears_keeps_failing_with_timeouts(
    emu: EmulatorHandle, ch: AtChannel
) -> None:
    emu.control("fault", kind="hang")
    for _ in range(2):
        with pytest.raises(AtTimeout):
            await ch.command("AT", timeout=0.2)
    emu.control("clear")
    await assert_csq_ok(ch, emu)


async def test_slow_reply_succeeds_with_a_longer_timeout(
    emu: EmulatorHandle, ch: AtChannel
) -> None:
    emu.control("fault", kind="slow", delay=0.4)
    started = time.monotonic()
    await assert_csq_ok(ch, emu)
    assert time.monotonic() - started >= 0.4


async def test_slow_reply_times_out_then_late_reply_is_not_taken_for_the_next(
    emu: EmulatorHandle, ch: AtChannel
) -> None:
    emu.control("fault", kind="slow", delay=0.5)
    with pytest.raises(AtTimeout):
        await ch.command("AT+CSQ", timeout=0.1)
    emu.control("clear", kind="slow")
    # The +CSQ answer of the timed-out command arrives late; it must not answer this one.
    resp = await ch.command("AT+CGMI", timeout=3.0)
    assert resp.lines == ("Quectel",)
    await assert_csq_ok(ch, emu)


@pytest.mark.parametrize(
    "params",
    [
        {"text": "\x01noise\xe9\xff"},
        {"count": 64},
        {"hex": "deadbeef00417e"},
    ],
    ids=["text", "random", "hex"],
)
async def test_garbage_before_a_command_does_not_reach_its_reply(
    emu: EmulatorHandle, ch: AtChannel, params: dict[str, object]
) -> None:
    emu.control("fault", kind="garbage", **params)
    resp = await ch.command("AT+CGMM", timeout=3.0)
    assert resp.lines == ("EC25",)
    await assert_csq_ok(ch, emu)


async def test_garbage_inside_a_reply_leaves_its_values_intact(
    emu: EmulatorHandle, ch: AtChannel
) -> None:
    emu.control("fault", kind="garbage", text="#junk#", when="next")
    resp = await ch.command("AT+CSQ", timeout=3.0)
    assert len(resp.values("+CSQ")) == 1
    assert parsers.parse_csq(resp.values("+CSQ")[0])[0] == expected_rssi(emu)
    await assert_csq_ok(ch, emu)


@pytest.mark.parametrize("echo", ["ATE1", "ATE0"])
async def test_partial_line_does_not_glue_onto_the_next_reply(
    emu: EmulatorHandle, ch: AtChannel, echo: str
) -> None:
    await ch.command(echo)
    emu.control("fault", kind="partial")  # "\r\n+CSQ: 1" and no terminator
    await assert_csq_ok(ch, emu)
    emu.control("fault", kind="partial", text="+CGMI: half")
    resp = await ch.command("AT+CGMI", timeout=3.0)
    assert resp.lines == ("Quectel",)


async def test_urcs_interleaved_in_replies_go_to_subscribers(
    emu: EmulatorHandle, ch: AtChannel
) -> None:
    urcs = LineCollector()
    ch.subscribe("+CEREG", urcs)
    emu.control("fault", kind="urc_interleave", count=2)
    await assert_csq_ok(ch, emu)
    resp = await ch.command("AT+CGMI", timeout=3.0)
    assert resp.lines == ("Quectel",)
    assert urcs.lines == ["+CEREG: 1", "+CEREG: 1"]


async def test_custom_urc_interleaved_in_a_multi_line_reply(
    emu: EmulatorHandle, ch: AtChannel
) -> None:
    urcs = LineCollector()
    ch.subscribe("+QIND", urcs)
    emu.control("fault", kind="urc_interleave", urc='+QIND: "csq",20,99')
    resp = await ch.command("ATI", timeout=3.0)
    assert resp.lines[0] == "Quectel"
    assert not any(line.startswith("+QIND") for line in resp.lines)
    assert urcs.lines == ['+QIND: "csq",20,99']


def booted(lines: list[str]) -> bool:
    return "RDY" in lines and "+CPIN: READY" in lines


async def test_spontaneous_reset_announces_itself_and_service_resumes(
    emu: EmulatorHandle, ch: AtChannel
) -> None:
    boot = LineCollector()
    ch.subscribe(("RDY", "+CPIN", "+QUSIM", "+CFUN"), boot)
    await ch.command("ATE0")
    emu.control("fault", kind="reset")
    await boot.wait(booted)
    # The reset put echo back on: the channel must cope without being told.
    assert emu.status()["settings"]["echo"] is True
    await assert_csq_ok(ch, emu)


async def test_cfun_reset_command_then_boot_urcs_then_service(
    emu: EmulatorHandle, ch: AtChannel
) -> None:
    boot = LineCollector()
    ch.subscribe(("RDY", "+CPIN"), boot)
    resp = await ch.command("AT+CFUN=1,1")
    assert resp.final == "OK"
    await boot.wait(booted)
    await assert_csq_ok(ch, emu)


async def test_unplug_loses_the_port_and_names_it(emu: EmulatorHandle, ch: AtChannel) -> None:
    await assert_csq_ok(ch, emu)
    emu.control("unplug")
    async with asyncio.timeout(5.0):
        await ch.lost_event.wait()
    assert ch.is_lost
    with pytest.raises(PortGoneError) as info:
        await ch.command("AT", timeout=1.0)
    assert info.value.port == emu.port
    assert emu.port in str(info.value)


async def test_unplug_fails_the_command_in_flight_without_waiting_for_its_timeout(
    emu: EmulatorHandle, ch: AtChannel
) -> None:
    emu.control("fault", kind="slow", delay=30)
    task = asyncio.create_task(ch.command("AT+CSQ", timeout=30.0))
    await until(lambda: emu.status()["history"][-1:] == ["AT+CSQ"])
    emu.control("unplug")
    started = time.monotonic()
    with pytest.raises(PortGoneError) as info:
        async with asyncio.timeout(5.0):
            await task
    assert info.value.port == emu.port
    assert time.monotonic() - started < 5.0


async def test_replug_a_new_channel_on_the_stable_link_works(
    emu: EmulatorHandle, ch: AtChannel
) -> None:
    link = emu.modem()["link"]
    emu.control("unplug")
    async with asyncio.timeout(5.0):
        await ch.lost_event.wait()
    wait_for(lambda: not os.path.exists(link))
    reply = emu.control("replug")
    # the symlink follows the modem to its new pty
    wait_for(lambda: os.path.realpath(link) == reply["port"])
    async with await AtChannel.open(link) as again:
        resp = await again.command("AT+CGMI", timeout=3.0)
        assert resp.lines == ("Quectel",)
        await assert_csq_ok(again, emu)


async def wait_state(modem: Modem, state: str, timeout: float = 5.0) -> None:
    """Wait on the driver's own event until a URC has moved last_registration to state."""
    async with asyncio.timeout(timeout):
        while modem.last_registration.state != state:
            modem.registration_changed.clear()
            await modem.registration_changed.wait()


async def test_registration_urcs_update_the_driver(emu: EmulatorHandle, ch: AtChannel) -> None:
    modem = Modem(ch)
    await modem.probe()
    assert (await modem.registration()).state == "home"
    emu.control("set_registration", state="searching")
    await wait_state(modem, "searching")
    emu.control("set_registration", state="denied")
    await wait_state(modem, "denied")
    emu.control("set_registration", state="roaming", act="lte", tac="BEEF")
    await wait_state(modem, "roaming")
    assert modem.last_registration.tac == 0xBEEF
    assert modem.last_registration.act == "lte"


async def test_wait_registered_returns_once_registration_comes_back(
    emu: EmulatorHandle, ch: AtChannel
) -> None:
    modem = Modem(ch)
    await modem.probe()
    emu.control("set_registration", state="searching")
    await wait_state(modem, "searching")
    waiter = asyncio.create_task(modem.wait_registered(10.0, poll_s=5.0))
    await asyncio.sleep(0)
    assert not waiter.done()
    started = time.monotonic()
    emu.control("set_registration", state="home")
    reg = await asyncio.wait_for(waiter, 5.0)
    assert reg.state == "home"
    # Woken by the URC, not by the 5 s poll.
    assert time.monotonic() - started < 2.0


async def test_wait_registered_gives_up_at_its_deadline(emu: EmulatorHandle, ch: AtChannel) -> None:
    modem = Modem(ch)
    await modem.probe()
    emu.control("set_registration", state="searching")
    with pytest.raises(AtTimeout):
        await modem.wait_registered(0.5, poll_s=0.2)
