"""DataConnection against the pty emulator: the AT sequence each vendor needs, what is read
back, the keeper re-establishing a dropped context, and a profile change re-creating it.

Vendor data commands the emulator may not answer yet are given as scenario `replies` (recorded
form of the vendor's reply), so the agent's side is tested the same way either way.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.at import parsers
from agent.at.channel import AtChannel
from agent.modem.dataconn import (
    DataConnection,
    DataProfile,
    DataState,
    DataStatus,
    grant_from_contrdp,
)
from agent.modem.vendors import vendor_by_name
from hw_fixtures.testing import EmulatorHandle

CONTRDP = (
    '\n+CGCONTRDP: 1,5,"{apn}","100.72.14.9.255.255.255.252","100.72.14.10",'
    '"198.51.100.53","198.51.100.54","0.0.0.0","0.0.0.0",0\n\nOK\n'
)
OK = "\nOK\n"


def scenario(
    tmp_path: Path,
    vendor: str,
    replies: dict[str, str],
    *,
    pdp_auto: bool = True,
    apn: str = "internet",
) -> Path:
    lines = [
        "[[modem]]",
        f'vendor = "{vendor}"',
        f"pdp_auto = {'true' if pdp_auto else 'false'}",
        f'apn = "{apn}"',
        "",
        "[[modem.profiles]]",
        'iccid = "8944500102030405067"',
        'name = "Home"',
        "enabled = true",
        "",
        "[modem.replies]",
    ]
    for command, reply in replies.items():
        key = command.replace("\\", "\\\\").replace('"', '\\"')
        value = reply.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        lines.append(f'"{key}" = "{value}"')
    path = tmp_path / f"{vendor}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def history(emu: EmulatorHandle) -> list[str]:
    return list(emu.status()["history"])


class Recorder:
    """Every status the connection reported, and a way to wait for one."""

    def __init__(self) -> None:
        self.seen: list[DataStatus] = []
        self._changed = asyncio.Event()

    async def __call__(self, status: DataStatus) -> None:
        self.seen.append(status)
        self._changed.set()

    async def wait(
        self, want: Callable[[DataStatus], bool], after: int = 0, timeout: float = 15.0
    ) -> DataStatus:
        """The first status (from index `after`) that satisfies `want`, once it arrives."""
        async with asyncio.timeout(timeout):
            while True:
                for status in self.seen[after:]:
                    if want(status):
                        return status
                self._changed.clear()
                await self._changed.wait()

    async def state(self, want: DataState, after: int = 0) -> DataStatus:
        return await self.wait(lambda s: s.state == want, after)


async def test_generic_defines_activates_and_reads_the_grant(
    emu_factory: Callable[..., EmulatorHandle], tmp_path: Path
) -> None:
    emu = emu_factory(
        "--scenario",
        str(
            scenario(
                tmp_path,
                "generic",
                {"AT+CGCONTRDP=1": CONTRDP.format(apn="iot.test")},
                pdp_auto=False,
            )
        ),
    )
    channel = await AtChannel.open(emu.port)
    try:
        conn = DataConnection(channel, vendor_by_name("generic"), interface="wwan0")
        status = await conn.up(DataProfile(apn="iot.test", pdp_type="ip"))
        sent = history(emu)
        assert 'AT+CGDCONT=1,"IP","iot.test"' in sent
        assert "AT+CGACT=1,1" in sent
        assert emu.status()["pdp"] == {"1": True}
        assert status.state == DataState.UP
        assert status.interface == "wwan0"
        assert status.addresses == ("100.72.14.9/30",)
        assert status.gateways == ("100.72.14.10",)
        assert status.dns == ("198.51.100.53", "198.51.100.54")
        assert status.addressing == "static"
        assert await conn.active()
        await conn.down()
        assert "AT+CGACT=0,1" in history(emu)
        assert emu.status()["pdp"] == {"1": False}
        assert conn.status.state == DataState.DOWN
        assert conn.status.addresses == ()
    finally:
        await channel.close()


async def test_auto_apn_keeps_the_modems_context_and_falls_back_to_cgpaddr(
    emu_factory: Callable[..., EmulatorHandle], tmp_path: Path
) -> None:
    # No CGCONTRDP reply: the address comes from AT+CGPADDR instead.
    emu = emu_factory(
        "--scenario",
        str(scenario(tmp_path, "generic", {"AT+CGCONTRDP=1": "\nERROR\n"}, apn="operator.apn")),
    )
    channel = await AtChannel.open(emu.port)
    try:
        conn = DataConnection(channel, vendor_by_name("generic"))
        status = await conn.up(DataProfile(apn="auto"))
        assert not any(c.startswith("AT+CGDCONT=") for c in history(emu))
        assert status.apn == "operator.apn"
        assert status.state == DataState.UP
        assert len(status.addresses) == 1
        assert status.addresses[0].endswith("/32")
        assert status.gateways == ()
    finally:
        await channel.close()


async def test_credentials_are_sent_with_cgauth(
    emu_factory: Callable[..., EmulatorHandle], tmp_path: Path
) -> None:
    auth = 'AT+CGAUTH=1,1,"router","s3cret"'
    emu = emu_factory("--scenario", str(scenario(tmp_path, "generic", {auth: OK})))
    channel = await AtChannel.open(emu.port)
    try:
        conn = DataConnection(channel, vendor_by_name("generic"))
        status = await conn.up(DataProfile(apn="corp.test", user="router", password="s3cret"))
        sent = history(emu)
        assert sent.index('AT+CGDCONT=1,"IP","corp.test"') < sent.index(auth)
        assert status.state == DataState.UP
    finally:
        await channel.close()


# vendor -> (canned replies for its mode read and connect, the connect line, usb mode, addressing)
VENDORS = {
    "quectel": (
        {'AT+QCFG="usbnet"': '\n+QCFG: "usbnet",1\n\nOK\n', "AT+QNETDEVCTL=1,1,1": OK},
        "AT+QNETDEVCTL=1,1,1",
        "ecm",
        "dhcp",
    ),
    "fibocom": (
        {"AT+GTUSBMODE?": "\n+GTUSBMODE: 33\n\nOK\n", "AT+GTRNDIS=1,1": OK},
        "AT+GTRNDIS=1,1",
        "rndis",
        "dhcp",
    ),
    "simcom": (
        {"AT$QCRMCALL=1,1": "\n$QCRMCALL: 1,V4\n\nOK\n"},
        "AT$QCRMCALL=1,1",
        "qmi",
        "static",
    ),
    "sierra": ({"AT!SCACT=1,1": OK}, "AT!SCACT=1,1", "qmi", "static"),
}


@pytest.mark.parametrize("vendor", list(VENDORS))
async def test_vendor_connect_command_follows_activation(
    emu_factory: Callable[..., EmulatorHandle], tmp_path: Path, vendor: str
) -> None:
    replies, connect, mode, addressing = VENDORS[vendor]
    emu = emu_factory(
        "--scenario",
        str(
            scenario(
                tmp_path,
                vendor,
                {**replies, "AT+CGCONTRDP=1": CONTRDP.format(apn="x")},
                pdp_auto=False,
            )
        ),
    )
    channel = await AtChannel.open(emu.port)
    try:
        conn = DataConnection(channel, vendor_by_name(vendor), interface="usb0")
        status = await conn.up(DataProfile(apn="internet"))
        sent = history(emu)
        assert sent.index("AT+CGACT=1,1") < sent.index(connect)
        assert (status.state, status.usb_mode, status.addressing) == (
            DataState.UP,
            mode,
            addressing,
        )
    finally:
        await channel.close()


@pytest.mark.parametrize(
    ("vendor", "replies", "reason"),
    [
        (
            "quectel",
            {'AT+QCFG="usbnet"': '\n+QCFG: "usbnet",2\n\nOK\n'},
            "data function needs MBIM, not AT",
        ),
        (
            "quectel",
            {'AT+QCFG="usbnet"': '\n+QCFG: "usbnet",0\n\nOK\n'},
            "data function needs QMI, not AT",
        ),
        ("dell", {}, "data function needs MBIM, not AT"),
    ],
)
async def test_qmi_and_mbim_functions_are_reported_not_driven(
    emu_factory: Callable[..., EmulatorHandle],
    tmp_path: Path,
    vendor: str,
    replies: dict[str, str],
    reason: str,
) -> None:
    emu = emu_factory("--scenario", str(scenario(tmp_path, vendor, replies, pdp_auto=False)))
    channel = await AtChannel.open(emu.port)
    try:
        conn = DataConnection(channel, vendor_by_name(vendor), interface="wwan0")
        status = await conn.up(DataProfile(apn="internet"))
        assert status.state == DataState.UNSUPPORTED
        assert status.reason == reason
        assert status.interface == "wwan0"
        assert not any(c.startswith(("AT+CGACT=", "AT+CGDCONT=")) for c in history(emu))
    finally:
        await channel.close()


async def test_keeper_re_establishes_a_dropped_context_with_backoff(
    emu_factory: Callable[..., EmulatorHandle], tmp_path: Path
) -> None:
    emu = emu_factory("--scenario", str(scenario(tmp_path, "generic", {}, pdp_auto=False)))
    channel = await AtChannel.open(emu.port)
    rec = Recorder()
    conn = DataConnection(
        channel,
        vendor_by_name("generic"),
        on_change=rec,
        poll_interval=0.2,
        backoff_initial=0.1,
        backoff_max=0.4,
    )
    try:
        async with asyncio.TaskGroup() as tg:
            keeper = tg.create_task(conn.run(DataProfile(apn="internet")), name="keeper")
            await rec.state(DataState.UP)
            mark = len(rec.seen)
            # The network takes the context away (registration lost): the keeper sees it down,
            # fails to re-activate while unregistered (backing off), and succeeds once back.
            emu.control("set_registration", state="searching")
            down = await rec.state(DataState.DOWN, mark)
            assert down.addresses == ()
            mark = len(rec.seen)
            await rec.state(DataState.CONNECTING, mark)
            emu.control("set_registration", state="home")
            up = await rec.state(DataState.UP, mark)
            assert up.addresses
            assert emu.status()["pdp"] == {"1": True}
            keeper.cancel()
    except* asyncio.CancelledError:
        pass
    finally:
        await channel.close()
    failures = [s for s in rec.seen if s.state == DataState.DOWN and s.reason]
    assert failures, "the keeper should have reported at least one failed attempt"


async def test_profile_change_re_creates_the_context_with_the_new_apn(
    emu_factory: Callable[..., EmulatorHandle], tmp_path: Path
) -> None:
    emu = emu_factory("--scenario", str(scenario(tmp_path, "generic", {}, pdp_auto=False)))
    channel = await AtChannel.open(emu.port)
    rec = Recorder()
    conn = DataConnection(
        channel,
        vendor_by_name("generic"),
        on_change=rec,
        poll_interval=5.0,
    )
    try:
        async with asyncio.TaskGroup() as tg:
            keeper = tg.create_task(conn.run(DataProfile(apn="first.test")), name="keeper")
            await rec.state(DataState.UP)
            mark = len(rec.seen)
            conn.set_profile(DataProfile(apn="second.test"))
            await rec.wait(lambda s: s.state == DataState.UP and s.apn == "second.test", mark)
            keeper.cancel()
    except* asyncio.CancelledError:
        pass
    finally:
        await channel.close()
    sent = history(emu)
    assert sent.index("AT+CGACT=0,1") < sent.index('AT+CGDCONT=1,"IP","second.test"')
    assert rec.seen[mark].state == DataState.DOWN
    assert emu.status()["pdp"] == {"1": True}


def test_grant_from_contrdp_reads_dual_stack_and_drops_zeros() -> None:
    rows = parsers.parse_cgcontrdp(
        '+CGCONTRDP: 1,5,"internet","100.72.14.9.255.255.255.255","100.72.14.9",'
        '"198.51.100.53","0.0.0.0"\r\n'
        '+CGCONTRDP: 1,5,"internet","32.1.13.184.0.0.205.1.0.0.0.0.0.0.0.2.255.255.255.255.'
        '255.255.255.255.0.0.0.0.0.0.0.0","254.128.0.0.0.0.0.0.0.0.0.0.0.0.0.1",'
        '"32.1.13.184.0.0.205.3.0.0.0.0.0.0.0.1"\r\n'
        '+CGCONTRDP: 2,6,"ims","10.1.1.1.255.255.255.0","10.1.1.254"'
    )
    addresses, gateways, dns = grant_from_contrdp(rows, 1)
    assert addresses == ("100.72.14.9/32", "2001:db8:0:cd01::2/64")
    # A gateway equal to the granted /32 address is no gateway: a device route is used.
    assert gateways == ("fe80::1",)
    assert dns == ("198.51.100.53", "2001:db8:0:cd03::1")


async def test_refused_credentials_never_show_the_password(
    emu_factory: Callable[..., EmulatorHandle], tmp_path: Path
) -> None:
    emu = emu_factory(
        "--scenario",
        str(scenario(tmp_path, "generic", {'AT+CGAUTH=1,1,"router","hunter2"': "\nERROR\n"})),
    )
    channel = await AtChannel.open(emu.port)
    rec = Recorder()
    conn = DataConnection(channel, vendor_by_name("generic"), on_change=rec, backoff_initial=5.0)
    try:
        async with asyncio.TaskGroup() as tg:
            keeper = tg.create_task(
                conn.run(DataProfile(apn="corp.test", user="router", password="hunter2"))
            )
            down = await rec.wait(lambda s: s.state == DataState.DOWN and s.reason is not None)
            keeper.cancel()
    except* asyncio.CancelledError:
        pass
    finally:
        await channel.close()
    assert down.reason == "AT+CGAUTH failed (error)"
    assert "hunter2" not in repr(rec.seen)
    assert "hunter2" not in repr(DataProfile(password="hunter2"))


async def test_a_switch_re_creates_even_an_auto_context(
    emu_factory: Callable[..., EmulatorHandle], tmp_path: Path
) -> None:
    emu = emu_factory("--scenario", str(scenario(tmp_path, "generic", {}, pdp_auto=False)))
    channel = await AtChannel.open(emu.port)
    rec = Recorder()
    conn = DataConnection(channel, vendor_by_name("generic"), on_change=rec, poll_interval=5.0)
    try:
        async with asyncio.TaskGroup() as tg:
            keeper = tg.create_task(conn.run(DataProfile(apn="auto")))
            await rec.state(DataState.UP)
            mark = len(rec.seen)
            conn.set_profile(DataProfile(apn="auto"))
            await rec.state(DataState.UP, mark)
            keeper.cancel()
    except* asyncio.CancelledError:
        pass
    finally:
        await channel.close()
    states = [s.state for s in rec.seen[mark:]]
    assert states[0] == DataState.DOWN
    sent = history(emu)
    assert sent.index("AT+CGACT=0,1") < len(sent) - 1 - sent[::-1].index("AT+CGACT=1,1")


# personality -> (usb mode, addressing, the vendor connect the emulator must have seen or None)
NATIVE = {
    "generic": (None, "static", None),
    "quectel": ("ecm", "dhcp", "AT+QNETDEVCTL=1,1,1"),
    "fibocom": ("rndis", "dhcp", "AT+GTRNDIS=1,1"),
    "simcom": ("qmi", "static", "AT$QCRMCALL=1,1"),
    "sierra": ("qmi", "static", "AT!SCACT=1,1"),
}


@pytest.mark.parametrize("vendor", list(NATIVE))
async def test_emulator_personalities_connect_with_their_own_commands(
    emu_factory: Callable[..., EmulatorHandle], vendor: str
) -> None:
    """Nothing canned: the emulator's personalities answer the data commands themselves."""
    mode, addressing, connect = NATIVE[vendor]
    emu = emu_factory("--vendor", vendor)
    channel = await AtChannel.open(emu.port)
    try:
        conn = DataConnection(channel, vendor_by_name(vendor))
        status = await conn.up(DataProfile(apn="internet.test"))
        assert (status.state, status.usb_mode, status.addressing) == (
            DataState.UP,
            mode,
            addressing,
        )
        assert status.addresses
        assert emu.status()["data_cid"] == 1
        if connect is not None:
            assert connect in history(emu)
        await conn.down()
        assert emu.status()["data_cid"] is None
    finally:
        await channel.close()
