"""The LPA against the emulated eUICC in memory: every ES10 command, chunking, typed errors."""

from __future__ import annotations

import pytest

from agent.errors import ApduError, Es10Error
from agent.euicc import apdu, es10
from agent.euicc.lpa import Lpa, LpaSafetyError
from agent.euicc.transport import CardTransport
from hw_fixtures.card_api import CardEvents, ProfileSpec
from hw_fixtures.euicc import EmulatedEuicc

EID = "89049032123451234512345678901235"
A = "8944476500001224158"
B = "89012345678901234567"
C = "8933011122223333444"


def make_card(events: CardEvents | None = None) -> EmulatedEuicc:
    return EmulatedEuicc(
        EID,
        [
            ProfileSpec(iccid=A, name="Home", provider="HomeTel", enabled=True, nickname="home"),
            ProfileSpec(iccid=B, name="Travel", provider="Roam", profile_class="operational"),
            ProfileSpec(iccid=C, name="Test", provider="Lab", profile_class="test"),
        ],
        events,
    )


@pytest.fixture
def card() -> EmulatedEuicc:
    return make_card()


async def test_eid_info_and_profile_list(card: EmulatedEuicc) -> None:
    async with Lpa(CardTransport(card)) as lpa:
        assert await lpa.get_eid() == EID
        info = await lpa.info()
        profiles = await lpa.list_profiles()
    assert info.eid == EID
    assert info.svn == "2.2.0"
    assert info.firmware_version == "4.6.0"
    assert (info.free_nvm, info.free_vm) == (412_000, 15_000)
    assert info.profile_version == "2.3.1"
    assert info.euicc_ci_pki_ids == ["81370F5125D0B1D408D4C3B232E6D25E795BEBFB"]
    assert [(p.iccid, p.state, p.profile_class) for p in profiles] == [
        (A, "enabled", "operational"),
        (B, "disabled", "operational"),
        (C, "disabled", "test"),
    ]
    assert profiles[0].nickname == "home"
    assert profiles[0].service_provider_name == "HomeTel"
    assert profiles[1].profile_name == "Travel"
    assert profiles[0].isdp_aid == "A0000005591010FFFFFFFF8900001000"
    assert not card.channels.keys() - {0}, "channel left open"


async def test_info_refused_fields_are_null(card: EmulatedEuicc) -> None:
    card.refuse_info2 = True
    async with Lpa(CardTransport(card)) as lpa:
        info = await lpa.info()
    assert info.eid == EID
    assert info.svn == "2.2.0"  # from EUICCInfo1
    assert info.free_nvm is None
    assert info.firmware_version is None


async def test_enable_switches_profiles_and_queues_notifications() -> None:
    changes: list[str | None] = []
    card = make_card(CardEvents(on_profile_change=lambda p: changes.append(p.iccid if p else None)))
    async with Lpa(CardTransport(card)) as lpa:
        assert await lpa.enable_profile(B) is True
        profiles = {p.iccid: p.state for p in await lpa.list_profiles()}
        notes = await lpa.list_notifications()
        pending = await lpa.retrieve_notifications()
        one = await lpa.retrieve_notifications(notes[1].seq_number)
    assert profiles == {A: "disabled", B: "enabled", C: "disabled"}
    assert changes == [B]
    assert [(n.seq_number, n.profile_management_operation, n.iccid) for n in notes] == [
        (1, "disable", A),
        (2, "enable", B),
    ]
    assert notes[0].notification_address == "smdp.example.test"
    assert [p.metadata for p in pending] == notes
    assert [p.metadata.seq_number for p in one] == [2]
    assert all(p.raw.startswith("30") for p in pending)


async def test_enable_already_enabled_is_a_no_op(card: EmulatedEuicc) -> None:
    async with Lpa(CardTransport(card)) as lpa:
        assert await lpa.enable_profile(A) is False
        assert await lpa.list_notifications() == []


async def test_disable_delete_nickname_and_notification_remove(card: EmulatedEuicc) -> None:
    async with Lpa(CardTransport(card)) as lpa:
        await lpa.set_nickname(B, "Trävel ✈")
        await lpa.delete_profile(C)
        await lpa.disable_profile(A)
        profiles = {p.iccid: p for p in await lpa.list_profiles()}
        notes = await lpa.list_notifications()
        await lpa.remove_notification(notes[0].seq_number)
        left = await lpa.list_notifications()
        with pytest.raises(Es10Error) as err:
            await lpa.remove_notification(notes[0].seq_number)
    assert set(profiles) == {A, B}
    assert profiles[B].nickname == "Trävel ✈"
    assert profiles[A].state == "disabled"
    assert [(n.profile_management_operation, n.iccid) for n in notes] == [
        ("delete", C),
        ("disable", A),
    ]
    assert [n.seq_number for n in left] == [notes[1].seq_number]
    assert err.value.reason == "nothingToDelete"


async def test_delete_refuses_the_enabled_profile_before_asking_the_card(
    card: EmulatedEuicc,
) -> None:
    async with Lpa(CardTransport(card)) as lpa:
        with pytest.raises(LpaSafetyError):
            await lpa.delete_profile(A)
    assert "BF33" not in card.log
    assert card.enabled_profile() is not None


@pytest.mark.parametrize(
    ("setup", "action", "function", "reason"),
    [
        (None, ("enable", "8900000000000000001"), "EnableProfile", "iccidOrAidNotFound"),
        (None, ("disable", B), "DisableProfile", "profileNotInEnabledState"),
        (None, ("disable", "8900000000000000001"), "DisableProfile", "iccidOrAidNotFound"),
        (None, ("delete", "8900000000000000001"), "DeleteProfile", "iccidOrAidNotFound"),
        ("lock", ("enable", B), "EnableProfile", "disallowedByPolicy"),
        ("lock", ("disable", A), "DisableProfile", "disallowedByPolicy"),
        ("lock_c", ("delete", C), "DeleteProfile", "disallowedByPolicy"),
        ("busy2", ("enable", B), "EnableProfile", "catBusy"),
        ("busy2", ("disable", A), "DisableProfile", "catBusy"),
        (None, ("nickname", "8900000000000000001"), "SetNickname", "iccidNotFound"),
    ],
)
async def test_typed_errors(
    card: EmulatedEuicc, setup: str | None, action: tuple[str, str], function: str, reason: str
) -> None:
    if setup == "lock":
        card.policy_locked.add(A)
    elif setup == "lock_c":
        card.policy_locked.add(C)
    elif setup == "busy2":
        card.cat_busy = 2
    verb, iccid = action
    async with Lpa(CardTransport(card), cat_busy_retry_s=0.0) as lpa:
        calls = {
            "enable": lambda: lpa.enable_profile(iccid),
            "disable": lambda: lpa.disable_profile(iccid),
            "delete": lambda: lpa.delete_profile(iccid),
            "nickname": lambda: lpa.set_nickname(iccid, "x"),
        }
        with pytest.raises(Es10Error) as err:
            await calls[verb]()
    assert (err.value.function, err.value.reason) == (function, reason)
    assert sum(p.enabled for p in card.profiles) == 1  # never none enabled


async def test_cat_busy_once_is_retried(card: EmulatedEuicc) -> None:
    card.cat_busy = 1
    async with Lpa(CardTransport(card), cat_busy_retry_s=0.0) as lpa:
        assert await lpa.enable_profile(B)
    assert card.enabled_profile() is not None
    assert card.enabled_profile().iccid == B  # type: ignore[union-attr]


async def test_long_request_is_split_into_store_data_blocks(card: EmulatedEuicc) -> None:
    transport = CardTransport(card)
    nickname = "n" * 60
    async with Lpa(transport, block_size=16) as lpa:
        await lpa.set_nickname(B, nickname)
        [p] = [p for p in await lpa.list_profiles() if p.iccid == B]
    assert p.nickname == nickname
    store = [a for a in transport.sent if a[1] == 0xE2]
    request_blocks = [a for a in store if a[5:7] == b"\xbf\x29"]
    assert len(request_blocks) == 1
    request = es10.set_nickname_request(B, nickname)
    count = -(-len(request) // 16)
    assert count > 3
    first = store.index(request_blocks[0])
    blocks = store[first : first + count]
    # P1 11 on every block but the last (91), P2 counts from 0, none over the block size.
    assert [b[2] for b in blocks] == [0x11] * (count - 1) + [0x91]
    assert [b[3] for b in blocks] == list(range(count))
    assert b"".join(b[5 : 5 + b[4]] for b in blocks) == request


async def test_long_response_is_reassembled_with_get_response(card: EmulatedEuicc) -> None:
    card.max_response = 40  # forces 61xx on every list
    transport = CardTransport(card)
    async with Lpa(transport) as lpa:
        profiles = await lpa.list_profiles()
    assert [p.iccid for p in profiles] == [A, B, C]
    assert any(a[1] == 0xC0 for a in transport.sent)


async def test_6cxx_repeats_with_the_right_le() -> None:
    sent: list[bytes] = []
    answers = [bytes.fromhex("6C05"), bytes.fromhex("01020304059000")]

    async def transmit(a: bytes) -> bytes:
        sent.append(a)
        return answers.pop(0)

    data, sw = await apdu.exchange(transmit, bytes.fromhex("80CA005A00"), 0)
    assert (data, sw) == (bytes.fromhex("0102030405"), 0x9000)
    assert sent[1] == bytes.fromhex("80CA005A05")


async def test_refused_store_data_raises_apdu_error(card: EmulatedEuicc) -> None:
    async with Lpa(CardTransport(card)) as lpa:
        with pytest.raises(ApduError) as err:
            await lpa.call(bytes.fromhex("BF7F00"))  # a function the card does not know
    assert err.value.sw == 0x6D00


def test_cla_channel_bits() -> None:
    assert apdu.cla_for_channel(0x80, 0) == 0x80
    assert apdu.cla_for_channel(0x80, 3) == 0x83
    assert apdu.cla_for_channel(0x80, 4) == 0xC0
    assert apdu.cla_for_channel(0x80, 19) == 0xCF
    assert apdu.cla_for_channel(0x00, 5) == 0x41


@pytest.mark.parametrize("block_size", [1, 120, 255])
async def test_card_takes_store_data_blocks_of_any_size(
    card: EmulatedEuicc, block_size: int
) -> None:
    nickname = "ü" * 32  # 64 bytes of UTF-8, the longest nickname SGP.22 allows
    async with Lpa(CardTransport(card), block_size=block_size) as lpa:
        await lpa.set_nickname(C, nickname)
        profile = await lpa.get_profile(C)
    assert profile is not None
    assert profile.nickname == nickname


def test_card_ignores_cla_channel_bits_and_reports_wrong_le(card: EmulatedEuicc) -> None:
    channel = card.open_channel(bytes.fromhex("A0000005591010FFFFFFFF8900000100"))
    get_eid = bytes.fromhex("BF3E035C015A")
    for cla in (0x80, 0x81, 0x83, 0xC1):
        reply = card.transmit(channel, bytes([cla, 0xE2, 0x91, 0x00, len(get_eid)]) + get_eid)
        assert reply[-2:] == b"\x90\x00"
        assert EID.lower() in reply.hex()
    card.max_response = 8
    first = card.transmit(channel, bytes([0x80, 0xE2, 0x91, 0x00, len(get_eid)]) + get_eid)
    assert first[-2] == 0x61
    remaining = first[-1]
    wrong_le = card.transmit(channel, bytes([0x80, 0xC0, 0x00, 0x00, remaining + 1]))
    assert wrong_le == bytes([0x6C, remaining])
    rest = card.transmit(channel, bytes([0x80, 0xC0, 0x00, 0x00, remaining]))
    assert rest[-2:] == b"\x90\x00"
    assert (first[:-2] + rest[:-2]).hex().upper() == "BF3E125A10" + EID
    card.close_channel(channel)


def test_manage_channel_over_basic_interface(card: EmulatedEuicc) -> None:
    opened = card.transmit_basic(bytes.fromhex("0070000001"))
    assert opened[1:] == b"\x90\x00"
    ch = opened[0]
    select = bytes([ch, 0xA4, 0x04, 0x00, 0x10]) + bytes.fromhex("A0000005591010FFFFFFFF8900000100")
    assert card.transmit_basic(select)[-2:] == b"\x90\x00"
    assert card.transmit_basic(bytes([ch, 0x70, 0x80, ch, 0x00])) == b"\x90\x00"
    assert card.transmit_basic(bytes([ch, 0x70, 0x80, ch, 0x00])) == b"\x68\x81"
