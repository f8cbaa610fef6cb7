"""Every entry point for outside input fails only with the agent's typed errors, never a crash.

CI runs each property with Hypothesis's default budget; `make fuzz` selects the "fuzz" profile
(tests/conftest.py) and runs at least a million inputs per target. Strategies lean on what broke
before: decimal numbers past Python's 4,300-digit conversion limit, non-ASCII digits, deep
nesting, and bytes that are almost well-formed.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from agent.at import parsers
from agent.at.channel import classify_final, parse_error_code
from agent.at.lines import MAX_LINE, LineReader
from agent.config import load_config, parse_config
from agent.daemon.control import BadRequest, _salvage_id, parse_request
from agent.errors import AgentError, ConfigError, ParseError
from agent.euicc import es10, tlv
from agent.euicc.transport import channel_for_session, parse_apdu_reply, parse_session_id
from agent.health.probes import parse_dns_reply, parse_http_status_line
from agent.mqtt.commands import (
    CommandContext,
    CommandPolicy,
    CommandRejected,
    decode_request,
    execute,
)
from agent.mqtt.payloads import COMMANDS

pytestmark = pytest.mark.fuzz

# Each example is cheap; the shared settings only lift the per-example deadline (CI machines
# are shared) and the health checks that big generated inputs trip.
FUZZ = settings(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

HUGE_DIGITS = st.integers(min_value=4_000, max_value=6_000).map(lambda n: "9" * n)
ODD_DIGITS = st.text(alphabet="²³¹٠١٢३४௫𝟘𝟙", min_size=1, max_size=8)
AT_ALPHABET = '0123456789ABCDEFabcdefx,"()-+: .\r\n^!@\x1bCGREQPSMINOLTU'
PREFIXES = [
    "+CME ERROR: ", "+CMS ERROR: ", "+CCHO: ", "+CGLA: ", "+CSIM: ", "+CSQ: ", "+CESQ: ",
    "+CREG: ", "+CEREG: ", "+COPS: ", "+CPIN: ", "+CFUN: ", "+CGDCONT: ", "+CGPADDR: ",
    "+QENG: ", "+QCSQ: ", "^HCSQ: ", "^SYSINFOEX: ", "^SMONI: ", "+XLEC: ", "+CCID: ", "",
]  # fmt: skip
NUMBERISH = st.one_of(
    HUGE_DIGITS,
    ODD_DIGITS,
    st.integers().map(str),
    st.text(alphabet=AT_ALPHABET, max_size=60),
)
AT_LINE = st.one_of(
    st.text(max_size=120),
    st.builds(
        lambda p, a, b: f"{p}{a},{b}",
        st.sampled_from(PREFIXES),
        NUMBERISH,
        NUMBERISH,
    ),
    st.builds(lambda p, a: p + a, st.sampled_from(PREFIXES), NUMBERISH),
)


def _one_text_parsers() -> list[tuple[str, Callable[[str], object]]]:
    out = []
    for name, fn in inspect.getmembers(parsers, inspect.isfunction):
        if not name.startswith("parse_") or fn.__module__ != parsers.__name__:
            continue
        params = [p for p in inspect.signature(fn).parameters.values() if p.default is p.empty]
        if len(params) == 1:
            out.append((name, fn))
    return out


TEXT_PARSERS = _one_text_parsers()


def test_every_one_text_parser_is_fuzzed() -> None:
    assert len(TEXT_PARSERS) >= 25


@FUZZ
@given(chunks=st.lists(st.binary(max_size=MAX_LINE // 4), max_size=12))
def test_line_reader_never_raises_and_bounds_lines(chunks: list[bytes]) -> None:
    reader = LineReader()
    for chunk in chunks:
        for line in reader.feed(chunk):
            assert isinstance(line, str)
            assert len(line) <= MAX_LINE


@FUZZ
@given(line=AT_LINE)
@example(line="+CME ERROR: " + "9" * 5_000)
@example(line="+CME ERROR: ²")
def test_final_result_and_error_code_parsing_never_raise(line: str) -> None:
    classify_final(line)
    code, text = parse_error_code(line)
    assert code is None or 0 <= code < 10**6
    assert text is None or len(text) <= 256


@FUZZ
@given(text=AT_LINE, index=st.integers(min_value=0, max_value=10**6))
def test_every_at_parser_raises_only_parse_error(text: str, index: int) -> None:
    _name, parse = TEXT_PARSERS[index % len(TEXT_PARSERS)]
    with contextlib.suppress(ParseError):
        parse(text)


@FUZZ
@given(lines=st.lists(AT_LINE, max_size=4))
@example(lines=["+CCHO: " + "9" * 5_000])
def test_euicc_at_replies_raise_only_parse_error(lines: list[str]) -> None:
    for call in (
        lambda: channel_for_session(parse_session_id(lines)),
        lambda: parse_apdu_reply(lines, "+CGLA"),
        lambda: parse_apdu_reply(lines, "+CSIM"),
    ):
        with contextlib.suppress(ParseError):
            call()


def _tlv_tree(depth: int = 3) -> st.SearchStrategy[bytes]:
    """Almost well-formed BER-TLV: real ES10 tags around random or nested values."""
    tags = st.sampled_from(
        [0xBF2D, 0xBF3E, 0xBF20, 0xBF22, 0xBF28, 0xBF2B, 0xBF31, 0xBF32, 0xBF33, 0xBF34,
         0xE3, 0xA0, 0xA1, 0x5A, 0x4F, 0x80, 0x81, 0x82, 0x90, 0x91, 0x92, 0x9F70, 0x02, 0x30]
    )  # fmt: skip
    leaf = st.one_of(st.binary(max_size=24), st.binary(min_size=9, max_size=600))
    if depth == 0:
        return st.builds(tlv.encode, tags, leaf)
    inner = st.lists(_tlv_tree(depth - 1), max_size=4).map(b"".join)
    return st.builds(tlv.encode, tags, st.one_of(leaf, inner))


ES10_DECODERS: list[Callable[[bytes], object]] = [
    es10.decode_eid,
    es10.decode_euicc_info1,
    es10.decode_euicc_info2,
    es10.decode_profiles_info,
    lambda d: es10.decode_result("EnableProfile", d),
    es10.decode_list_notification,
    es10.decode_retrieve_notifications,
]


@FUZZ
@given(data=st.one_of(st.binary(max_size=300), _tlv_tree()), index=st.integers(0, 10**6))
@example(data=tlv.encode(es10.TAG_ENABLE, tlv.encode(0x80, b"\x7f" * 3_000)), index=4)
def test_tlv_and_es10_decoders_raise_only_typed_errors(data: bytes, index: int) -> None:
    with contextlib.suppress(tlv.TlvError):
        tlv.decode_all(data)
    decode = ES10_DECODERS[index % len(ES10_DECODERS)]
    try:
        result = decode(data)
    except AgentError:
        return
    str(result)  # a decoded value must also be printable (int→str has a digit limit too)


@FUZZ
@given(line=st.binary(max_size=200))
def test_probe_reply_parsers_raise_only_parse_error(line: bytes) -> None:
    for parse in (parse_http_status_line, parse_dns_reply):
        with contextlib.suppress(ParseError):
            parse(line)


JSON_VALUE = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True)
    | st.text(max_size=20)
    | HUGE_DIGITS,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)


def _json_bytes(value: Any) -> bytes:
    try:
        return msgspec.json.encode(value)
    except (TypeError, ValueError, OverflowError):
        return b"null"


def _nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


PAYLOAD = st.one_of(
    st.binary(max_size=200),
    JSON_VALUE.map(_json_bytes),
    st.dictionaries(
        st.sampled_from(["token", "layer", "modem", "iccid", "nickname", "request_id", "x"]),
        JSON_VALUE,
        max_size=5,
    ).map(_json_bytes),
    st.integers(min_value=100, max_value=50_000).map(_nested),
    HUGE_DIGITS.map(str.encode),
)
POLICIES = st.builds(
    CommandPolicy,
    enabled=st.booleans(),
    token=st.sampled_from([None, "tok"]),
)


@FUZZ
@given(
    command=st.one_of(st.sampled_from(sorted(COMMANDS)), st.text(max_size=30)),
    payload=PAYLOAD,
    policy=POLICIES,
)
def test_mqtt_command_intake_raises_only_command_rejected(
    command: str, payload: bytes, policy: CommandPolicy
) -> None:
    with contextlib.suppress(CommandRejected):
        decode_request(command, payload, policy)


@FUZZ
@given(command=st.sampled_from(sorted(COMMANDS)), payload=PAYLOAD)
def test_mqtt_execute_always_answers(command: str, payload: bytes) -> None:
    async def handler(name: str, args: dict[str, Any], ctx: CommandContext) -> object:
        return {"ran": name, "args": len(args)}

    ctx = CommandContext(command, "t", "t/response", None, None, None)
    response = asyncio.run(
        execute(
            command,
            payload,
            ctx,
            policy=CommandPolicy(enabled=True),
            handler=handler,
            timeout=5.0,
        )
    )
    assert response.ok or response.error is not None


@FUZZ
@given(line=PAYLOAD)
def test_control_requests_raise_only_bad_request(line: bytes) -> None:
    _salvage_id(line)
    try:
        _, cmd, args = parse_request(line)
    except BadRequest:
        return
    assert isinstance(cmd, str)
    assert isinstance(args, dict)


CONFIG_KEYS = st.sampled_from(
    ["device_id", "state_dir", "modems", "layers", "usage", "quotas", "probes", "mqtt", "id",
     "port", "profile", "modem", "role", "timeout", "interval", "quota_bytes", "pools", "x"]
)  # fmt: skip
CONFIG_VALUE = st.recursive(
    st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(["1e400 GB", "9" * 30 + " TB", "10 GB", "/tmp/x"]),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(CONFIG_KEYS, children, max_size=4)
    ),
    max_leaves=16,
)


@FUZZ
@given(data=st.dictionaries(CONFIG_KEYS, CONFIG_VALUE, max_size=6))
def test_config_parser_raises_only_config_error(data: dict[str, Any]) -> None:
    with contextlib.suppress(ConfigError):
        parse_config(data)


MINIMAL = """
device_id = "dev1"
state_dir = "/tmp/esim-agent-fuzz"

[[modems]]
id = "m0"
port = "/dev/ttyUSB2"

[[layers]]
name = "primary"
modem = "m0"
profile = "89000000000000000011"
probes = [{ kind = "tcp", target = "127.0.0.1:PORT" }]

[usage.quotas]
"89000000000000000011" = QUOTA
"""
CONFIG_TEXT = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda k, v: f"{k} = {v}\n".encode(), CONFIG_KEYS, HUGE_DIGITS),
    st.integers(min_value=100, max_value=5_000).map(lambda n: b"a = " + _nested(n) + b"\n"),
    st.builds(
        lambda port, quota: MINIMAL.replace("PORT", port).replace("QUOTA", quota).encode(),
        st.one_of(st.integers().map(str), HUGE_DIGITS, ODD_DIGITS),
        st.one_of(
            st.integers().map(str),
            st.sampled_from(['"1e400 GB"', "1e400", "inf", '"' + "9" * 400 + ' GB"']),
        ),
    ),
)


@FUZZ
@given(raw=CONFIG_TEXT)
@example(raw=MINIMAL.replace("PORT", "80").replace("QUOTA", '"' + "9" * 400 + ' GB"').encode())
@example(raw=MINIMAL.replace("PORT", "9" * 5_000).replace("QUOTA", "1").encode())
@example(raw=MINIMAL.replace("PORT", "80").replace("QUOTA", str(2**63)).encode())
def test_config_loader_raises_only_config_error(raw: bytes, tmp_path_factory: Any) -> None:
    path = Path(tmp_path_factory.getbasetemp()) / "fuzz-config.toml"
    path.write_bytes(raw)
    with contextlib.suppress(ConfigError):
        load_config(path)
