"""Profile download end to end in one process: the LPA, the emulated eUICC and the test SM-DP+
over real HTTPS with the test PKI. Every failure leaves the card clean and both sessions closed."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent.errors import ConfigError
from agent.euicc.activation import parse_activation_code
from agent.euicc.download import Downloader, DownloadError, DownloadResult, Phase
from agent.euicc.es9 import Es9Client, Es9Error, Es9Refused, Resolve
from agent.euicc.lpa import Lpa
from agent.euicc.transport import CardTransport
from hw_fixtures.card_api import ProfileSpec
from hw_fixtures.euicc import EmulatedEuicc
from hw_fixtures.euicc_download import CardKeys, DownloadEngine
from hw_fixtures.pki import TestPki
from hw_fixtures.smdp import Offer, SmdpCore, SmdpServer

HOME = "8944476500001224158"
NEW = "8988247000001234567"


@pytest.fixture
def card(test_pki: TestPki) -> EmulatedEuicc:
    euicc = EmulatedEuicc(
        test_pki.eid, [ProfileSpec(iccid=HOME, name="Home", provider="HomeTel", enabled=True)]
    )
    euicc.download = DownloadEngine(euicc, CardKeys.from_pki(test_pki))
    return euicc


@pytest.fixture
async def smdp(test_pki: TestPki) -> AsyncIterator[SmdpServer]:
    core = SmdpCore(pki=test_pki, address=test_pki.smdp_host)
    core.offer(Offer(matching_id="MATCH-1", iccid=NEW, name="Travel", provider="RoamCo"))
    async with SmdpServer(core) as server:
        yield server


def client(test_pki: TestPki, server: SmdpServer, *, address: str | None = None) -> Es9Client:
    assert test_pki.directory is not None
    host = address or test_pki.smdp_host
    return Es9Client(
        host,
        [test_pki.directory / "ci.pem"],
        resolve=[Resolve(test_pki.smdp_host, 443, "127.0.0.1")]
        if address is None
        else [Resolve(test_pki.smdp_host, server.port, "127.0.0.1")],
    )


async def download(
    card: EmulatedEuicc,
    test_pki: TestPki,
    server: SmdpServer,
    matching_id: str = "MATCH-1",
    confirmation_code: str | None = None,
) -> DownloadResult:
    address = f"{test_pki.smdp_host}:{server.port}"
    server.core.address = address
    code = parse_activation_code(f"LPA:1${address}${matching_id}")
    es9 = client(test_pki, server, address=address)
    async with Lpa(CardTransport(card)) as lpa:
        return await Downloader(lpa, es9, code, confirmation_code=confirmation_code).run()


def assert_clean(card: EmulatedEuicc, server: SmdpServer) -> None:
    assert [p.iccid for p in card.profiles] == [HOME], "a profile was left on the card"
    assert card.download is not None
    assert card.download.session is None, "the eUICC session is still open"
    assert not card.channels.keys() - {0}, "channel left open"


async def test_download_installs_and_notifies(
    card: EmulatedEuicc, test_pki: TestPki, smdp: SmdpServer
) -> None:
    smdp.core.offers["MATCH-1"].size = 100_000
    phases: list[Phase] = []
    address = f"{test_pki.smdp_host}:{smdp.port}"
    smdp.core.address = address
    code = parse_activation_code(f"LPA:1${address}$MATCH-1")
    async with Lpa(CardTransport(card)) as lpa:
        downloader = Downloader(
            lpa,
            client(test_pki, smdp, address=address),
            code,
            progress=lambda phase, _done, _total: phases.append(phase),
        )
        result = await downloader.run()
        profiles = await lpa.list_profiles()
        pending = await lpa.list_notifications()
    assert result.iccid == NEW
    assert result.profile_name == "Travel"
    assert result.bpp_bytes > 100_000
    assert result.notification_sent
    installed = next(p for p in profiles if p.iccid == NEW)
    assert (installed.profile_name, installed.service_provider_name) == ("Travel", "RoamCo")
    assert installed.state == "disabled"
    assert installed.isdp_aid == result.isdp_aid
    assert pending == [], "the install notification was sent and removed"
    assert smdp.core.notifications[-1]["kind"] == "install"
    assert smdp.core.notifications[-1]["verified"] is True
    assert smdp.core.offers["MATCH-1"].state == "installed"
    assert phases[0] is Phase.AUTHENTICATE
    assert phases[-1] is Phase.DONE
    assert Phase.INSTALL in phases


async def test_download_without_replace_session_keys(
    card: EmulatedEuicc, test_pki: TestPki, smdp: SmdpServer
) -> None:
    smdp.core.use_replace_session_keys = False
    result = await download(card, test_pki, smdp)
    assert result.iccid == NEW
    assert any(p.iccid == NEW for p in card.profiles)


async def test_confirmation_code(card: EmulatedEuicc, test_pki: TestPki, smdp: SmdpServer) -> None:
    smdp.core.offers["MATCH-1"].confirmation_code = "1234"
    result = await download(card, test_pki, smdp, confirmation_code="1234")
    assert result.iccid == NEW


async def test_wrong_confirmation_code_cancels_both_sides(
    card: EmulatedEuicc, test_pki: TestPki, smdp: SmdpServer
) -> None:
    smdp.core.offers["MATCH-1"].confirmation_code = "1234"
    with pytest.raises(Es9Refused) as info:
        await download(card, test_pki, smdp, confirmation_code="9999")
    assert (info.value.subject, info.value.reason) == ("8.2.7", "3.8")
    assert test_pki.smdp_host in str(info.value)
    assert_clean(card, smdp)
    assert card.download is not None
    assert card.download.cancelled
    assert len(smdp.core.cancelled) == 1


async def test_missing_confirmation_code(
    card: EmulatedEuicc, test_pki: TestPki, smdp: SmdpServer
) -> None:
    smdp.core.offers["MATCH-1"].confirmation_code = "1234"
    with pytest.raises(DownloadError) as info:
        await download(card, test_pki, smdp)
    assert info.value.phase is Phase.PREPARE
    assert info.value.cancelled
    assert_clean(card, smdp)
    assert smdp.core.cancelled[0][1] == 1  # postponed


@pytest.mark.parametrize(
    "case",
    [
        ("expired", "8.8.5", "4.10"),
        ("already_downloaded", "8.2.6", "3.8"),
        ("unknown", "8.2.6", "3.8"),
    ],
)
async def test_refusals_are_readable_and_leave_the_card_clean(
    card: EmulatedEuicc,
    test_pki: TestPki,
    smdp: SmdpServer,
    case: tuple[str, str, str],
) -> None:
    knob, subject, reason = case
    offer = smdp.core.offers["MATCH-1"]
    matching = "MATCH-1"
    if knob == "expired":
        offer.expired = True
    elif knob == "already_downloaded":
        offer.state = "downloaded"
    else:
        matching = "NO-SUCH-ID"
    with pytest.raises(Es9Refused) as info:
        await download(card, test_pki, smdp, matching_id=matching)
    assert (info.value.subject, info.value.reason) == (subject, reason)
    assert "authenticateClient refused" in str(info.value)
    assert_clean(card, smdp)


async def test_server_error(card: EmulatedEuicc, test_pki: TestPki, smdp: SmdpServer) -> None:
    smdp.core.offers["MATCH-1"].server_error = True
    with pytest.raises(Es9Error, match="HTTP 500"):
        await download(card, test_pki, smdp)
    assert_clean(card, smdp)


async def test_corrupt_package_is_refused_by_the_card(
    card: EmulatedEuicc, test_pki: TestPki, smdp: SmdpServer
) -> None:
    smdp.core.offers["MATCH-1"].corrupt_package = True
    with pytest.raises(DownloadError, match="installFailedDueToDataMismatch"):
        await download(card, test_pki, smdp)
    assert_clean(card, smdp)
    # The failed installation result still reached the SM-DP+.
    assert smdp.core.notifications[-1]["success"] is False


async def test_iccid_already_on_the_card(
    card: EmulatedEuicc, test_pki: TestPki, smdp: SmdpServer
) -> None:
    smdp.core.offers["MATCH-1"].iccid = HOME
    with pytest.raises(DownloadError, match="IccidAlreadyExists"):
        await download(card, test_pki, smdp)
    assert [p.iccid for p in card.profiles] == [HOME]


async def test_slow_server_times_out_and_cancels(
    card: EmulatedEuicc, test_pki: TestPki, smdp: SmdpServer
) -> None:
    smdp.core.delays["getBoundProfilePackage"] = 5.0
    address = f"{test_pki.smdp_host}:{smdp.port}"
    smdp.core.address = address
    es9 = client(test_pki, smdp, address=address)
    es9.timeout = 0.5
    code = parse_activation_code(f"1${address}$MATCH-1")
    async with Lpa(CardTransport(card)) as lpa:
        with pytest.raises(Es9Error, match="no answer"):
            await Downloader(lpa, es9, code).run()
    assert_clean(card, smdp)
    assert card.download is not None
    assert card.download.cancelled[0][1] == 2  # timeout


async def test_task_cancelled_mid_download_still_cancels_the_card_session(
    card: EmulatedEuicc, test_pki: TestPki, smdp: SmdpServer
) -> None:
    smdp.core.delays["getBoundProfilePackage"] = 5.0
    address = f"{test_pki.smdp_host}:{smdp.port}"
    smdp.core.address = address
    code = parse_activation_code(f"1${address}$MATCH-1")
    async with Lpa(CardTransport(card)) as lpa:
        task = asyncio.ensure_future(
            Downloader(lpa, client(test_pki, smdp, address=address), code).run()
        )
        reached = smdp.core.called.setdefault("getBoundProfilePackage", asyncio.Event())
        await asyncio.wait_for(reached.wait(), 30)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert_clean(card, smdp)


async def test_tls_refuses_a_server_outside_the_ci(
    card: EmulatedEuicc,
    test_pki: TestPki,
    smdp: SmdpServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    from hw_fixtures import pki

    other = pki.generate().write(tmp_path_factory.mktemp("other-ci"))
    assert other.directory is not None
    address = f"{test_pki.smdp_host}:{smdp.port}"
    es9 = Es9Client(
        address,
        [other.directory / "ci.pem"],
        resolve=[Resolve(test_pki.smdp_host, smdp.port, "127.0.0.1")],
    )
    with pytest.raises(Es9Error, match="TLS certificate refused"):
        await es9.initiate_authentication(b"\x00" * 16, bytes.fromhex("BF2000"))


async def test_clock_behind_the_certificate_is_named(
    test_pki: TestPki, tmp_path_factory: pytest.TempPathFactory
) -> None:
    import datetime

    from hw_fixtures import pki

    future = pki.generate(now=datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=30))
    future = future.write(tmp_path_factory.mktemp("future-ci"))
    assert future.directory is not None
    async with SmdpServer(SmdpCore(pki=future, address=future.smdp_host)) as server:
        es9 = Es9Client(
            f"{future.smdp_host}:{server.port}",
            [future.directory / "ci.pem"],
            resolve=[Resolve(future.smdp_host, server.port, "127.0.0.1")],
        )
        with pytest.raises(Es9Error, match="clock"):
            await es9.initiate_authentication(b"\x00" * 16, bytes.fromhex("BF2000"))


def test_resolve_parse() -> None:
    assert Resolve.parse("SMDP.example.com:443:198.18.0.2") == Resolve(
        "smdp.example.com", 443, "198.18.0.2"
    )
    assert Resolve.parse("smdp.example.com:8443:[fd00::2]").address == "fd00::2"
    for bad in ("smdp.example.com", "smdp.example.com:x:1.2.3.4", ":443:1.2.3.4", "h:0:1.2.3.4"):
        with pytest.raises(ConfigError):
            Resolve.parse(bad)


def test_ci_certificates_are_required(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no CI root"):
        Es9Client("smdp.example.com", [])
    with pytest.raises(ConfigError, match="cannot load"):
        Es9Client("smdp.example.com", [tmp_path / "missing.pem"])


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", "not JSON"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}", "without a header status"),
        (b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n", "HTTP 404"),
        (b"SSH-2.0-OpenSSH\r\n\r\n", "not an HTTP response"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 99999999\r\n\r\n", "bad Content-Length"),
    ],
)
async def test_broken_servers_give_readable_errors(
    test_pki: TestPki, reply: bytes, message: str
) -> None:
    assert test_pki.directory is not None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(
        test_pki.directory / "dp_tls_chain.pem", test_pki.directory / "dp_tls.key.pem"
    )

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(reply)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=ctx)
    port = server.sockets[0].getsockname()[1]
    async with server:
        es9 = Es9Client(
            f"{test_pki.smdp_host}:{port}",
            [test_pki.directory / "ci.pem"],
            resolve=[Resolve(test_pki.smdp_host, port, "127.0.0.1")],
        )
        with pytest.raises(Es9Error, match=message) as info:
            await es9.initiate_authentication(bytes(16), bytes.fromhex("BF2000"))
    assert test_pki.smdp_host in str(info.value)


def test_retry_schedule_backs_off_and_resets_on_a_new_link() -> None:
    from agent.euicc.notifications import RetrySchedule

    schedule = RetrySchedule(initial=10, maximum=40, rand=lambda: 1.0)
    assert schedule.due(7, 0.0)
    assert schedule.failed(7, 0.0) == 10
    assert not schedule.due(7, 5.0)
    assert schedule.failed(7, 10.0) == 30
    assert schedule.failed(7, 30.0) == 70
    assert schedule.failed(7, 70.0) == 110  # capped at 40 s
    assert schedule.due(8, 0.0), "others are not held back"
    schedule.link_up()
    assert schedule.due(7, 71.0)
    schedule.accepted(7)
    assert schedule.failed(7, 0.0) == 10, "a new failure starts over"


async def test_process_notifications_in_process(
    card: EmulatedEuicc, test_pki: TestPki, smdp: SmdpServer
) -> None:
    from agent.euicc.notifications import RetrySchedule, process_notifications

    await download(card, test_pki, smdp)
    address = smdp.core.address
    async with Lpa(CardTransport(card)) as lpa:
        await lpa.enable_profile(NEW, refresh=False)
        sinks = {address: client(test_pki, smdp, address=address)}
        schedule = RetrySchedule(rand=lambda: 1.0)

        def sink_for(target: str) -> Es9Client:
            if target in sinks:
                return sinks[target]
            raise Es9Error(target, "unreachable")  # the card's own profiles' SM-DP+

        first = await process_notifications(lpa, sink_for, schedule=schedule, now=0.0)
        assert {(o.operation, o.removed) for o in first} == {("enable", True), ("disable", False)}
        again = await process_notifications(lpa, sink_for, schedule=schedule, now=1.0)
        assert again == [], "the failed one waits for its backoff"
        pending = await lpa.list_notifications()
    assert [n.profile_management_operation for n in pending] == ["disable"]
