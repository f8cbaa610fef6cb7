"""The daemon's download room without a daemon: store-and-forward config keys, the progress
throttle, the masked activation code, and ES9+ leaving through a bound link."""

from __future__ import annotations

import os
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent.config import config_to_dict, load_config
from agent.daemon.liveness import DOWNLOAD_STALL_S, session_bound
from agent.daemon.provision import ProgressThrottle, layer_code
from agent.errors import ConfigError
from agent.euicc.activation import masked, parse_activation_code
from agent.euicc.download import Phase
from agent.euicc.es9 import Es9Client, Es9Error, Es9Refused, Resolve
from agent.health.probes import LinkBinding, connect_on_link
from hw_fixtures.pki import TestPki
from hw_fixtures.smdp import SmdpCore, SmdpServer

BASE = """
device_id = "dev1"
state_dir = "/tmp/esim-agent-test"

[[modems]]
id = "m0"
port = "/dev/ttyUSB2"

[[layers]]
name = "primary"
modem = "m0"
profile = "89000000000000000011"
role = "primary"

[[layers]]
name = "emergency"
modem = "m0"
profile = "89000000000000000029"
role = "emergency"
"""

CODE = "LPA:1$smdp.example.com$SECRET-MATCHING-ID"


def load(tmp_path: Path, extra: str) -> object:
    path = tmp_path / "agent.toml"
    path.write_text(textwrap.dedent(BASE) + extra)
    return load_config(path)


def refused(tmp_path: Path, extra: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, extra)
    return str(info.value)


def test_a_layer_carries_its_activation_code(tmp_path: Path) -> None:
    cfg = load(tmp_path, f'activation_code = "{CODE}"\nconfirmation_code = "1234"\n')
    layer = cfg.layers[1]  # type: ignore[attr-defined]
    found = layer_code(layer)
    assert found is not None
    code, confirmation = found
    assert (code.smdp_address, code.matching_id, confirmation) == (
        "smdp.example.com",
        "SECRET-MATCHING-ID",
        "1234",
    )
    shown = config_to_dict(cfg)  # type: ignore[arg-type]
    assert shown["layers"][1]["activation_code"] == "***"
    assert shown["layers"][1]["confirmation_code"] == "***"
    assert layer_code(cfg.layers[0]) is None  # type: ignore[attr-defined]


def test_a_code_file_is_read_relative_to_the_config(tmp_path: Path) -> None:
    (tmp_path / "emergency.code").write_text(f"{CODE}\n")
    cfg = load(tmp_path, 'activation_code_file = "emergency.code"\n')
    layer = cfg.layers[1]  # type: ignore[attr-defined]
    assert layer.activation_code_file == str(tmp_path / "emergency.code")
    found = layer_code(layer)
    assert found is not None
    assert found[0].matching_id == "SECRET-MATCHING-ID"


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ('activation_code = "LPA:2$x$y"\n', "layers[1].activation_code"),
        ('activation_code = "1$smdp.example.com$has space!"\n', "layers[1].activation_code"),
        (
            f'activation_code = "{CODE}"\nactivation_code_file = "/etc/hostname"\n',
            "layers[1].activation_code_file",
        ),
        ('activation_code_file = "/nonexistent/code"\n', "layers[1].activation_code_file"),
        ('confirmation_code = "1234"\n', "layers[1].confirmation_code"),
        (
            f'activation_code = "{CODE}"\nconfirmation_code = "1"\n'
            'confirmation_code_file = "/etc/hostname"\n',
            "layers[1].confirmation_code_file",
        ),
    ],
)
def test_broken_store_and_forward_keys_are_named(tmp_path: Path, extra: str, key: str) -> None:
    message = refused(tmp_path, extra)
    assert key in message
    assert "SECRET-MATCHING-ID" not in message


def test_a_code_file_that_holds_no_code_is_refused(tmp_path: Path) -> None:
    (tmp_path / "bad.code").write_text("not a code\n")
    assert "layers[1].activation_code_file" in refused(
        tmp_path, 'activation_code_file = "bad.code"\n'
    )


def test_the_matching_id_never_shows_in_full() -> None:
    code = parse_activation_code(CODE)
    assert masked(code) == "1$smdp.example.com$SE…(18)"
    assert "…(3)" in masked(parse_activation_code("1$a.b$XYZ"))


def test_progress_throttle_lets_phases_and_steps_through() -> None:
    throttle = ProgressThrottle()
    admitted = []
    now = 100.0
    for phase in (Phase.AUTHENTICATE, Phase.PREPARE, Phase.DOWNLOAD):
        assert throttle.admit(phase, 0, 0, now)
        assert not throttle.admit(phase, 0, 0, now), "the same report twice"
    # 100 segments of 1 KB in 0.1 s: about one report per 10 %, plus the last.
    total = 100_000
    for i in range(101):
        if throttle.admit(Phase.INSTALL, i * 1000, total, now + i * 0.001):
            admitted.append(i)
    assert admitted[0] == 0
    assert admitted[-1] == 100
    assert 10 <= len(admitted) <= 12
    # A slow load still reports every second.
    assert throttle.admit(Phase.INSTALL, 100_000, total, now) is False
    slow = ProgressThrottle()
    assert slow.admit(Phase.INSTALL, 0, 10**9, 0.0)
    assert not slow.admit(Phase.INSTALL, 1000, 10**9, 0.5)
    assert slow.admit(Phase.INSTALL, 2000, 10**9, 1.1)
    assert slow.admit(Phase.NOTIFY, 10**9, 10**9, 1.2)


@pytest.fixture
async def smdp(test_pki: TestPki) -> AsyncIterator[SmdpServer]:
    server = SmdpServer(SmdpCore(pki=test_pki, address=test_pki.smdp_host))
    await server.start()
    server.core.address = f"{test_pki.smdp_host}:{server.port}"
    yield server
    await server.stop()


def client(test_pki: TestPki, smdp: SmdpServer, link: LinkBinding) -> Es9Client:
    assert test_pki.directory is not None

    async def on_link(address: str, port: int) -> object:
        return await connect_on_link(address, port, link, 5.0)

    return Es9Client(
        smdp.core.address,
        [test_pki.directory / "ci.pem"],
        resolve=[Resolve.parse(f"{smdp.core.address}:127.0.0.1")],
        connect=on_link,  # type: ignore[arg-type]
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="SO_BINDTODEVICE needs root (CAP_NET_RAW)")
async def test_es9_leaves_through_the_bound_interface(test_pki: TestPki, smdp: SmdpServer) -> None:
    # Bound to lo, where the test SM-DP+ listens: TLS and the exchange go through.
    with pytest.raises(Es9Refused) as answered:
        await client(test_pki, smdp, LinkBinding(interface="lo")).cancel_session("00" * 16, b"")
    assert answered.value.function == "cancelSession"
    assert smdp.core.calls == ["cancelSession"]
    # Bound to an interface that does not exist: the connection cannot leave by another one.
    with pytest.raises(Es9Error) as failed:
        await client(test_pki, smdp, LinkBinding(interface="esa-nothere0")).cancel_session(
            "00" * 16, b""
        )
    assert "cannot connect" in str(failed.value)
    assert smdp.core.calls == ["cancelSession"], "nothing arrived through another interface"


def test_a_download_gives_its_modem_loop_the_time_a_package_load_takes() -> None:
    # The download holds the modem's lock: its polls wait, the watchdog must not call it stuck.
    assert session_bound(2.0, False, 60.0) < 120.0
    assert session_bound(2.0, False, 60.0, downloading=True) > DOWNLOAD_STALL_S
