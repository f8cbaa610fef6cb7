"""The AT channel over a real pty against a scripted peer: queueing, URCs, errors, recovery, loss."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pty
import tty
from collections.abc import AsyncIterator, Callable

import pytest
import structlog.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.at.channel import AtChannel
from agent.errors import AtError, AtTimeout, CmeError, CmsError, PortBusyError, PortGoneError

Script = Callable[[str], bytes | None]


class Peer:
    """The modem side of a pty: answers each command line with what the script returns."""

    def __init__(self, script: Script, echo: bool = True) -> None:
        self.master, self.slave = pty.openpty()
        tty.setraw(self.slave)
        self.path = os.ttyname(self.slave)
        self.script = script
        self.echo = echo
        self.silent = False
        self.received: list[str] = []
        self.got_line = asyncio.Event()
        self._buf = bytearray()
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.master, self._readable)

    def _readable(self) -> None:
        try:
            self._buf += os.read(self.master, 4096)
        except OSError:
            return
        while b"\r" in self._buf:
            i = self._buf.index(b"\r")
            line = self._buf[:i].decode("latin-1").strip("\x1b\n ")
            del self._buf[: i + 1]
            if not line:
                continue
            self.received.append(line)
            self.got_line.set()
            if self.silent:
                continue
            if self.echo:
                self.send(line.encode() + b"\r")
            reply = self.script(line)
            if reply is not None:
                self.send(reply)

    def send(self, data: bytes) -> None:
        os.write(self.master, data)

    def unplug(self) -> None:
        self._loop.remove_reader(self.master)
        os.close(self.master)
        os.close(self.slave)


def standard(line: str) -> bytes | None:
    table = {
        "AT": b"\r\nOK\r\n",
        "AT+CMEE?": b"\r\n+CMEE: 1\r\n\r\nOK\r\n",
        "AT+CSQ": b"\r\n+CSQ: 21,99\r\n\r\nOK\r\n",
        "AT+CGMI": b"\r\nQuectel\r\n\r\nOK\r\n",
        "AT+CPIN?": b"\r\n+CME ERROR: 10\r\n",
        "AT+CMGS": b"\r\n+CMS ERROR: 500\r\n",
        "AT+FOO": b"\r\nERROR\r\n",
        "AT+CME": b"\r\n+CME ERROR: SIM not inserted\r\n",
    }
    return table.get(line, b"\r\nOK\r\n")


@pytest.fixture
async def peer() -> AsyncIterator[Peer]:
    p = Peer(standard)
    yield p
    with contextlib.suppress(OSError):
        p.unplug()


async def test_info_lines_and_final(peer: Peer) -> None:
    async with await AtChannel.open(peer.path) as ch:
        resp = await ch.command("AT+CSQ", timeout=2)
        assert resp.lines == ("+CSQ: 21,99",)
        assert resp.values("+CSQ") == ["21,99"]
        assert (await ch.command("AT+CGMI", timeout=2)).lines == ("Quectel",)


async def test_echo_off_works_too() -> None:
    p = Peer(standard, echo=False)
    async with await AtChannel.open(p.path) as ch:
        assert (await ch.command("AT+CSQ", timeout=2)).first("+CSQ") == "21,99"
    p.unplug()


async def test_error_finals_are_typed(peer: Peer) -> None:
    async with await AtChannel.open(peer.path) as ch:
        with pytest.raises(CmeError) as cme:
            await ch.command("AT+CPIN?", timeout=2)
        assert cme.value.code == 10
        with pytest.raises(CmeError) as verbose:
            await ch.command("AT+CME", timeout=2)
        assert verbose.value.code is None
        assert verbose.value.text == "SIM not inserted"
        with pytest.raises(CmsError):
            await ch.command("AT+CMGS", timeout=2)
        with pytest.raises(AtError) as plain:
            await ch.command("AT+FOO", timeout=2)
        assert plain.value.final == "ERROR"


async def test_urc_during_a_command_goes_to_subscribers() -> None:
    def script(line: str) -> bytes | None:
        if line == "AT+CSQ":
            return b"\r\n+CEREG: 5\r\n+CSQ: 10,0\r\nRING\r\n\r\nOK\r\n"
        return standard(line)

    p = Peer(script)
    seen: list[str] = []
    async with await AtChannel.open(p.path) as ch:
        ch.subscribe(("+CEREG", "RING"), seen.append)
        resp = await ch.command("AT+CSQ", timeout=2)
        assert resp.lines == ("+CSQ: 10,0",)
        assert seen == ["+CEREG: 5", "RING"]
    p.unplug()


async def test_solicited_reply_is_not_taken_for_a_urc() -> None:
    def script(line: str) -> bytes | None:
        if line == "AT+CEREG?":
            return b'\r\n+CEREG: 2,1,"1F00","79D903",7\r\n\r\nOK\r\n'
        return standard(line)

    p = Peer(script)
    seen: list[str] = []
    async with await AtChannel.open(p.path) as ch:
        ch.subscribe("+CEREG", seen.append)
        resp = await ch.command("AT+CEREG?", timeout=2)
        assert resp.values("+CEREG") == ['2,1,"1F00","79D903",7']
        assert seen == []
    p.unplug()


async def test_urc_between_commands_is_delivered(peer: Peer) -> None:
    got = asyncio.Event()
    lines: list[str] = []

    def on_urc(line: str) -> None:
        lines.append(line)
        got.set()

    async with await AtChannel.open(peer.path) as ch:
        ch.subscribe("+CREG", on_urc)
        peer.send(b"\r\n+CREG: 1\r\n")
        async with asyncio.timeout(2):
            await got.wait()
        assert lines == ["+CREG: 1"]


async def test_commands_queue_one_in_flight(peer: Peer) -> None:
    async with await AtChannel.open(peer.path) as ch:
        results = await asyncio.gather(*(ch.command("AT+CSQ", timeout=2) for _ in range(20)))
        assert all(r.lines == ("+CSQ: 21,99",) for r in results)
        # The peer saw each command once, never two interleaved.
        assert peer.received.count("AT+CSQ") == 20


async def test_timeout_then_resync_then_success(peer: Peer) -> None:
    async with await AtChannel.open(peer.path) as ch:
        peer.silent = True
        with pytest.raises(AtTimeout):
            await ch.command("AT+CSQ", timeout=0.3)
        assert ch.consecutive_timeouts == 1
        peer.silent = False
        # A late final of the timed-out command must not be taken as the next reply.
        peer.send(b"\r\nOK\r\n")
        resp = await ch.command("AT+CSQ", timeout=2)
        assert resp.lines == ("+CSQ: 21,99",)
        assert ch.consecutive_timeouts == 0


async def test_garbage_before_a_reply_is_survived(peer: Peer) -> None:
    async with await AtChannel.open(peer.path) as ch:
        peer.send(b"\xff\xfe\x00garbage\r\n\x01\x02")
        resp = await ch.command("AT+CSQ", timeout=2)
        assert "+CSQ: 21,99" in resp.lines


async def test_unplug_fails_the_command_in_flight_and_the_next(peer: Peer) -> None:
    ch = await AtChannel.open(peer.path)
    peer.silent = True
    task = asyncio.create_task(ch.command("AT+CSQ", timeout=5))
    async with asyncio.timeout(2):
        while "AT+CSQ" not in peer.received:
            peer.got_line.clear()
            await peer.got_line.wait()
    peer.unplug()
    with pytest.raises(PortGoneError) as gone:
        await task
    assert gone.value.port == peer.path
    with pytest.raises(PortGoneError):
        await ch.command("AT", timeout=1)
    await ch.close()


async def test_second_owner_is_refused(peer: Peer) -> None:
    async with await AtChannel.open(peer.path):
        with pytest.raises(PortBusyError):
            await AtChannel.open(peer.path)


async def test_missing_port_is_a_typed_error() -> None:
    with pytest.raises(PortGoneError) as exc:
        await AtChannel.open("/dev/does-not-exist-esim")
    assert exc.value.port == "/dev/does-not-exist-esim"


URCS = [b"+CREG: 1", b"+CEREG: 5", b"RING", b"+CGEV: ME PDN ACT 1", b"+QIND: SMS DONE"]


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(st.sampled_from(URCS), max_size=5), st.integers(min_value=0, max_value=5))
async def test_random_urc_interleavings_never_corrupt_a_reply(
    urcs: list[bytes], position: int
) -> None:
    def script(line: str) -> bytes | None:
        if line == "AT+CSQ":
            parts = [*urcs[:position], b"+CSQ: 21,99", *urcs[position:]]
            return b"".join(b"\r\n" + p + b"\r\n" for p in parts) + b"\r\nOK\r\n"
        return standard(line)

    p = Peer(script)
    seen: list[str] = []
    try:
        async with await AtChannel.open(p.path) as ch:
            ch.subscribe("*", seen.append)
            resp = await ch.command("AT+CSQ", timeout=2)
            assert resp.lines == ("+CSQ: 21,99",)
            assert seen == [u.decode() for u in urcs]
    finally:
        p.unplug()


async def test_a_cancelled_command_does_not_leak_its_reply_into_the_next(peer: Peer) -> None:
    async with await AtChannel.open(peer.path) as ch:
        peer.silent = True
        task = asyncio.create_task(ch.command("AT+CGMI", timeout=5))
        async with asyncio.timeout(2):
            while "AT+CGMI" not in peer.received:
                peer.got_line.clear()
                await peer.got_line.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        peer.silent = False
        peer.send(b"\r\nQuectel\r\n\r\nOK\r\n")  # the late answer to the cancelled command
        resp = await ch.command("AT+CSQ", timeout=2)
        assert resp.lines == ("+CSQ: 21,99",)


async def test_secrets_never_reach_logs_or_errors(peer: Peer) -> None:
    secret = "hunter2-pw"
    async with await AtChannel.open(peer.path) as ch:
        with structlog.testing.capture_logs() as logs:
            peer.silent = True
            with pytest.raises(AtTimeout) as timed_out:
                await ch.command(f'AT+CGAUTH=1,1,"user","{secret}"', timeout=0.3)
            peer.silent = False
            peer.send(b"\r\nOK\r\n")
            peer.script = lambda line: (
                b"\r\n+CME ERROR: 16\r\n" if "CPIN=" in line else standard(line)
            )
            with pytest.raises(CmeError) as refused:
                await ch.command('AT+CPIN="1234"', timeout=2)
            peer.script = lambda line: b"\r\nERROR\r\n" if "CGAUTH" in line else standard(line)
            with pytest.raises(AtError) as plain:
                await ch.command(f'AT+CGAUTH=1,1,"user","{secret}"', timeout=2)
    texts = [str(timed_out.value), str(refused.value), str(plain.value), repr(logs)]
    assert all(secret not in t and "1234" not in t for t in texts)
    assert any(e["event"] == "at_timeout" and "***" in e["command"] for e in logs)
    assert plain.value.command == 'AT+CGAUTH=1,1,"***","***"'


async def test_a_resync_that_meets_an_unplug_reports_the_unplug() -> None:
    from structlog.testing import capture_logs

    def unplug_on_resync(line: str) -> bytes | None:
        if line == "AT+CMEE?":
            p.unplug()  # the port goes away in the middle of the resync
            return None
        return standard(line)

    p = Peer(unplug_on_resync)
    ch = await AtChannel.open(p.path)
    p.silent = True
    with pytest.raises(AtTimeout):
        await ch.command("AT+CSQ", timeout=0.3)
    p.silent = False
    with capture_logs() as logs, pytest.raises(PortGoneError):
        await ch.command("AT+CSQ", timeout=2)
    assert "at_resynced" not in [e["event"] for e in logs]
    await ch.close()
