"""The plan manager's pure decisions: who holds a pool's duty, what is left to announce."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.siblings.view import SiblingObservation
from agent.usage.plan import (
    SETTLE_S,
    PoolAlertRecord,
    announced_in,
    crossed,
    decode_record,
    duty_holder,
    limit_thresholds,
    to_announce,
)

ORDER = ("phone", "watch", "tablet")
TAKEOVER = 300.0


def obs(online: bool | None, since: float) -> SiblingObservation:
    return SiblingObservation(online=online, since=since)


def holder_for(me: str, now: float, presence: dict[str, SiblingObservation]) -> str | None:
    return duty_holder(
        ORDER, me, now, presence, me_since=0.0, takeover_s=TAKEOVER, listening_since=0.0
    ).holder


def test_the_manager_holds_the_duty_while_it_is_online() -> None:
    presence = {"phone": obs(True, 10.0), "tablet": obs(True, 10.0)}
    assert holder_for("watch", 1000.0, presence) == "phone"
    assert holder_for("tablet", 1000.0, presence) == "phone"
    assert holder_for("phone", 1000.0, {"watch": obs(True, 0.0)}) == "phone"


def test_the_next_device_takes_over_only_after_the_takeover_period() -> None:
    presence = {"phone": obs(False, 100.0)}
    early = duty_holder(
        ORDER, "watch", 399.0, presence, me_since=0.0, takeover_s=TAKEOVER, listening_since=0.0
    )
    # Nobody announces while the manager may still come back; the decision is due at 400.
    assert (early.holder, early.recheck_at) == ("phone", 400.0)
    late = duty_holder(
        ORDER, "watch", 400.0, presence, me_since=0.0, takeover_s=TAKEOVER, listening_since=0.0
    )
    assert (late.holder, late.skipped) == ("watch", ("phone",))
    # The third in line follows the watch while the watch is there.
    assert holder_for("tablet", 400.0, {**presence, "watch": obs(True, 0.0)}) == "watch"


def test_the_duty_returns_when_the_manager_is_back() -> None:
    assert holder_for("watch", 1000.0, {"phone": obs(True, 999.0)}) == "phone"


def test_a_manager_never_heard_of_counts_as_offline_since_listening_began() -> None:
    duty = duty_holder(ORDER, "watch", 50.0, {}, me_since=0.0, takeover_s=60.0, listening_since=0.0)
    assert (duty.holder, duty.recheck_at) == ("phone", 60.0)
    duty = duty_holder(ORDER, "watch", 60.0, {}, me_since=0.0, takeover_s=60.0, listening_since=0.0)
    assert duty.holder == "watch"


def test_a_device_off_the_broker_or_just_connected_holds_nothing() -> None:
    gone = {"phone": obs(False, 0.0)}
    off = duty_holder(
        ORDER, "watch", 1000.0, gone, me_since=None, takeover_s=TAKEOVER, listening_since=0.0
    )
    assert off.holder is None
    fresh = duty_holder(
        ORDER, "watch", 1000.0, gone, me_since=999.5, takeover_s=TAKEOVER, listening_since=0.0
    )
    assert (fresh.holder, fresh.recheck_at) == (None, 999.5 + SETTLE_S)


def test_a_device_outside_the_order_never_holds() -> None:
    assert holder_for("van", 1000.0, {"phone": obs(True, 0.0)}) == "phone"
    everyone_gone = {d: obs(False, 0.0) for d in ORDER}
    assert holder_for("van", 1000.0, everyone_gone) is None


def test_only_thresholds_nobody_announced_are_left() -> None:
    assert crossed(7_600, 10_000, (90, 50, 75)) == [50, 75]
    assert to_announce(9_200, 10_000, (50, 75, 90), {50, 75}) == [90]
    assert to_announce(9_200, 10_000, (50, 75, 90), {50, 75, 90}) == []
    assert to_announce(1, 0, (50,), ()) == []  # a zero quota announces nothing
    assert limit_thresholds((50, 75, 90)) == (50, 75, 90, 100)
    assert limit_thresholds((50, 100)) == (50, 100)


def test_records_are_decoded_strictly() -> None:
    good = b'{"pool":"team","device":"phone","period":"2026-12","thresholds":[50,75]}'
    record = decode_record(good)
    assert record == PoolAlertRecord(
        pool="team", device="phone", period="2026-12", thresholds=[50, 75]
    )
    for bad in (
        b"",
        b"{",
        b'{"pool":"team","device":"phone","period":"2026-12","thresholds":[0]}',
        b'{"pool":"team","device":"phone","period":"12/2026","thresholds":[50]}',
        b'{"pool":"team","device":"a/b","period":"2026-12","thresholds":[50]}',
        b'{"pool":"team","device":"phone","period":"2026-12","thresholds":"50"}',
        b"[" * 100_000,
    ):
        assert decode_record(bad) is None
    other = PoolAlertRecord(pool="team", device="watch", period="2026-11", thresholds=[90])
    assert announced_in([record, other], "team", "2026-12") == {50, 75}


# --- properties over random histories ----------------------------------------------------


@dataclass
class Device:
    name: str
    online: bool = True
    since: float = 0.0  # when `online` took its value (connected since, when online)


steps = st.lists(
    st.tuples(
        st.sampled_from(ORDER),  # the device that changes
        st.floats(min_value=0.0, max_value=400.0),  # after this many seconds
        st.integers(min_value=0, max_value=300),  # pool usage grows by this much
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(steps)
def test_at_most_one_holder_and_every_threshold_announced_at_most_once(
    history: list[tuple[str, float, int]],
) -> None:
    # One broker: every device sees the same availability of the others (the retained topics).
    devices = {d: Device(d) for d in ORDER}
    announced: dict[int, str] = {}
    now, used, quota = 0.0, 0, 1_000
    for flipped, wait, grow in history:
        now += wait
        used += grow
        dev = devices[flipped]
        dev.online, dev.since = not dev.online, now
        holders = []
        for me in ORDER:
            d = devices[me]
            if not d.online:
                continue  # a dead device decides nothing
            presence = {o.name: obs(o.online, o.since) for o in devices.values() if o.name != me}
            duty = duty_holder(
                ORDER, me, now, presence, me_since=d.since, takeover_s=60.0, listening_since=0.0
            )
            if duty.holder == me:
                holders.append(me)
                for t in to_announce(used, quota, (50, 75, 90), announced):
                    announced[t] = me
        assert len(holders) <= 1, holders
        # Liveness: an online, settled device with everyone ahead of it gone long enough holds.
        for i, me in enumerate(ORDER):
            d = devices[me]
            ahead_gone = all(
                not devices[a].online and now - devices[a].since >= 60.0 for a in ORDER[:i]
            )
            if d.online and now - d.since >= SETTLE_S and ahead_gone:
                assert holders == [me]
                break
        # Whoever held the duty announced everything crossed so far, each threshold once.
        if holders:
            assert set(announced) == set(crossed(used, quota, (50, 75, 90)))
