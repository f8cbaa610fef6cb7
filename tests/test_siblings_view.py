"""Sibling messages as they arrive from the broker: typed, strict, foreign ones dropped and
logged once; a sibling layer's health from what the sibling says and our own probe."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from agent.mqtt.payloads import DeviceState
from agent.policy.engine import Health
from agent.siblings.view import (
    SiblingAvailability,
    SiblingClaim,
    SiblingDecoder,
    SiblingObservation,
    SiblingState,
    claim_topic,
    encode_claim,
    observe,
    sibling_health,
)


def decoder() -> SiblingDecoder:
    return SiblingDecoder("esim-agent", "family", ["phone", "watch", "tablet"])


def test_decodes_what_a_sibling_daemon_publishes() -> None:
    d = decoder()
    state = DeviceState(device_id="phone", active_layer="primary", connectivity=True)
    assert d.decode("esim-agent/phone/state", msgspec.json.encode(state)) == SiblingState(
        device="phone", connectivity=True, active_layer="primary"
    )
    assert d.decode("esim-agent/phone/availability", b"offline") == SiblingAvailability(
        device="phone", online=False
    )
    topic = claim_topic("esim-agent", "tablet", "family")
    assert topic == "esim-agent/tablet/claim/family"
    assert d.decode(topic, encode_claim("family", "tablet", 60.0, 3)) == SiblingClaim(
        device="tablet", group="family", ttl=60.0, seq=3
    )
    assert d.decode(topic, b"") == SiblingClaim(device="tablet", group="family", ttl=None)


def test_subscribes_only_to_listed_devices() -> None:
    subs = decoder().subscriptions()
    assert "esim-agent/watch/claim/family" in subs
    assert all("+" not in s and "#" not in s for s in subs)
    assert len(subs) == 9


@pytest.mark.parametrize(
    ("topic", "payload", "reason"),
    [
        ("esim-agent/laptop/state", b'{"device_id":"laptop","connectivity":true}', "not listed"),
        ("other/phone/state", b'{"device_id":"phone","connectivity":true}', "outside"),
        ("esim-agent/phone/state", b'{"device_id":"watch","connectivity":true}', "another"),
        ("esim-agent/phone/state", b'{"device_id":"phone","connectivity":"yes"}', "schema"),
        ("esim-agent/phone/state", b'{"device_id":"phone"}', "schema"),
        ("esim-agent/phone/state", b"[[[[", "schema"),
        ("esim-agent/phone/state", b"x" * 20000, "too large"),
        ("esim-agent/phone/availability", b"ONLINE", "availability"),
        (
            "esim-agent/phone/claim/family",
            b'{"group":"family","device":"tablet","ttl":5,"seq":1}',
            "another",
        ),
        (
            "esim-agent/phone/claim/family",
            b'{"group":"family","device":"phone","ttl":-5,"seq":1}',
            "schema",
        ),
        ("esim-agent/phone/claim/work", b"", "not a sibling topic"),
    ],
)
def test_forged_or_malformed_messages_are_ignored_and_logged_once(
    topic: str, payload: bytes, reason: str
) -> None:
    d = decoder()
    with capture_logs() as logs:
        assert d.decode(topic, payload) is None
        assert d.decode(topic, payload) is None
    events = [e for e in logs if e["event"] == "sibling_message_ignored"]
    assert len(events) == 1
    assert reason in events[0]["reason"]


@given(st.binary(max_size=300), st.sampled_from(["state", "availability", "claim/family"]))
def test_hostile_payloads_never_raise(payload: bytes, kind: str) -> None:
    msg = decoder().decode(f"esim-agent/phone/{kind}", payload)
    assert msg is None or msg.device == "phone"


def test_observe_moves_since_only_on_change() -> None:
    obs = observe(SiblingObservation(), SiblingAvailability(device="phone", online=True), 1.0)
    obs = observe(obs, SiblingState(device="phone", connectivity=False), 2.0)
    assert obs.since == 2.0
    obs = observe(obs, SiblingState(device="phone", connectivity=False, active_layer="x"), 9.0)
    assert obs.since == 2.0
    assert obs.active_layer == "x"


def health(obs: SiblingObservation, now: float, **kw: object) -> Health:
    args: dict[str, object] = {"grace": 10.0, "broker_connected": True, "broker_since": 0.0}
    args.update(kw)
    return sibling_health(obs, now=now, **args)[0]  # type: ignore[arg-type]


def test_companion_story_last_will_and_grace() -> None:
    up = SiblingObservation(online=True, connectivity=True, since=0.0)
    assert health(up, 5.0) is Health.UP
    assert health(up, 5.0, probe=Health.DOWN) is Health.DOWN
    will = SiblingObservation(online=False, connectivity=True, since=5.0)
    assert health(will, 5.0) is Health.DOWN
    lost = SiblingObservation(online=True, connectivity=False, since=5.0)
    assert health(lost, 14.9) is Health.DEGRADED
    assert health(lost, 15.0) is Health.DOWN
    assert health(SiblingObservation(since=1.0), 2.0) is Health.DEGRADED
    assert health(SiblingObservation(since=1.0), 11.0) is Health.DOWN


def test_broker_unreachable_trusts_only_our_own_probe() -> None:
    up = SiblingObservation(online=True, connectivity=True, since=0.0)
    assert health(up, 5.0, broker_connected=False, broker_since=4.0) is Health.DEGRADED
    assert health(up, 15.0, broker_connected=False, broker_since=4.0) is Health.DOWN
    assert health(up, 15.0, broker_connected=False, broker_since=4.0, probe=Health.UP) is Health.UP


@given(
    online=st.none() | st.booleans(),
    conn=st.none() | st.booleans(),
    since=st.floats(0, 100),
    now=st.floats(0, 200),
    broker=st.booleans(),
    probe=st.none() | st.sampled_from(list(Health)),
)
def test_health_invariants(
    *,
    online: bool | None,
    conn: bool | None,
    since: float,
    now: float,
    broker: bool,
    probe: Health | None,
) -> None:
    obs = SiblingObservation(online=online, connectivity=conn, since=since)
    h = health(obs, max(now, since), broker_connected=broker, broker_since=since, probe=probe)
    if broker and online is False:
        assert h is Health.DOWN  # a Last Will is believed at once
    if h is Health.UP:
        # Up needs either the sibling's own word over a live broker or our own probe.
        assert (broker and online and conn and probe in (None, Health.UP, Health.UNKNOWN)) or (
            not broker and probe is Health.UP
        )
    if probe is Health.DOWN and broker and online:
        assert h is not Health.UP
