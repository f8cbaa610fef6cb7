"""Pure parts of the MQTT room: topics, payload encoding, redaction, schemas, intake rules, backoff."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.mqtt.commands import CommandPolicy, CommandRejected, decode_request
from agent.mqtt.discovery import device_configs, modem_configs
from agent.mqtt.payloads import (
    COMMANDS,
    ModemState,
    ProfileEntry,
    encode,
    redact,
    render_schema,
    schemas,
)
from agent.mqtt.topics import Topics

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "docs" / "schemas"
OPEN = CommandPolicy(enabled=True)


def test_committed_schemas_match_the_structs() -> None:
    expected = {f"{name}.schema.json": render_schema(s) for name, s in schemas().items()}
    committed = {p.name: p.read_text() for p in SCHEMA_DIR.glob("*.schema.json")}
    assert committed == expected, "run: python docs/schemas/generate.py"


def test_every_command_has_a_schema_and_a_topic() -> None:
    topics = Topics("esim", "dev")
    for name in COMMANDS:
        assert (SCHEMA_DIR / f"cmd.{name}.schema.json").exists()
        assert topics.command_name(topics.command(name)) == name


def test_topic_tree() -> None:
    t = Topics("home/esim", "van")
    assert t.availability == "home/esim/van/availability"
    assert t.modem("m1") == "home/esim/van/modems/m1"
    assert t.key("health/primary") == "home/esim/van/health/primary"
    assert t.command_response("status") == "home/esim/van/cmd/status/response"
    assert t.command_name("home/esim/van/cmd/status/response") is None
    assert t.command_name("home/esim/other/cmd/status") is None


@pytest.mark.parametrize("bad", ["", "a+b", "a#", "a/b", "nul\x00"])
def test_topic_segments_reject_wildcards(bad: str) -> None:
    with pytest.raises(ValueError, match="invalid MQTT topic segment"):
        Topics("esim", "dev").modem(bad)


def test_state_keys_cannot_reach_commands_or_events() -> None:
    t = Topics("esim", "dev")
    for key in ("cmd/status", "events", "modems/+", "state/#"):
        with pytest.raises(ValueError):  # noqa: PT011
            t.key(key)


def test_redaction_keeps_the_last_four_characters() -> None:
    tree = {"imei": "356938035643809", "nested": [{"iccid": "8944000000000000012"}], "rssi": -70}
    assert redact(tree) == {
        "imei": "***********3809",
        "nested": [{"iccid": "***************0012"}],
        "rssi": -70,
    }
    assert redact({"eid": "12"}) == {"eid": "**"}


def test_modem_payload_has_modem_info_keys() -> None:
    decoded = json.loads(encode(ModemState(id="m1")))
    assert {"identity", "sim", "signal", "registration", "operator", "id", "port", "online"} <= set(
        decoded
    )


def test_profile_keys_match_the_cli() -> None:
    assert set(json.loads(encode(ProfileEntry(iccid="1")))) == {
        "iccid", "isdp_aid", "state", "nickname",
        "service_provider_name", "profile_name", "profile_class",
    }  # fmt: skip


def test_discovery_unique_ids_do_not_collide_across_modems() -> None:
    t = Topics("esim", "van")
    configs = device_configs(t, "ha") + modem_configs(t, "ha", "m1") + modem_configs(t, "ha", "m2")
    ids = [c["unique_id"] for _, c in configs]
    assert len(ids) == len(set(ids)) == 7
    assert all(topic.startswith("ha/") and topic.endswith("/config") for topic, _ in configs)


def test_token_is_required_when_configured() -> None:
    policy = CommandPolicy(enabled=True, token="t")
    assert decode_request("status", b'{"token": "t"}', policy).args == {}
    with pytest.raises(CommandRejected) as info:
        decode_request("status", b'{"token": "T"}', policy)
    assert info.value.code == "unauthorized"


def test_nickname_limit_is_in_utf8_bytes() -> None:
    ok = decode_request(
        "profile_nickname",
        json.dumps({"modem": "m", "iccid": "8944000000000000012", "nickname": "é" * 32}).encode(),
        OPEN,
    )
    assert ok.args["nickname"] == "é" * 32
    with pytest.raises(CommandRejected):
        decode_request(
            "profile_nickname",
            json.dumps(
                {"modem": "m", "iccid": "8944000000000000012", "nickname": "é" * 33}
            ).encode(),
            OPEN,
        )


@given(command=st.sampled_from([*COMMANDS, "nope"]), payload=st.binary(max_size=300))
def test_arbitrary_bytes_are_rejected_or_accepted_never_crash(command: str, payload: bytes) -> None:
    code = "accepted"
    try:
        request = decode_request(command, payload, OPEN)
    except CommandRejected as exc:
        code = exc.code
    else:
        assert request.command == command
        msgspec.json.encode(request.args)
    assert code in {"accepted", "unknown_command", "invalid_json", "invalid_payload"}


@given(
    command=st.sampled_from(list(COMMANDS)),
    body=st.dictionaries(
        st.sampled_from(["layer", "modem", "iccid", "nickname", "token", "x"]),
        st.one_of(st.none(), st.integers(), st.text(max_size=80), st.lists(st.integers())),
        max_size=5,
    ),
)
def test_arbitrary_json_objects_never_crash(command: str, body: dict[str, object]) -> None:
    code = "accepted"
    try:
        decode_request(command, json.dumps(body).encode(), OPEN)
    except CommandRejected as exc:
        code = exc.code
    assert code in {"accepted", "invalid_payload"}
