"""Configuration files as a user writes them: examples load, mistakes name the file and key."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from agent.config import (
    DEFAULT_ISDR_AID,
    EX_CONFIG,
    Config,
    default_demo_config,
    load_config,
    parse_size,
    read_secret,
)
from agent.errors import ConfigError
from agent.policy.engine import PolicyConfig

EXAMPLES = Path(__file__).resolve().parent.parent / "config"

MINIMAL = """
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
name = "backup"
modem = "m0"
profile = "89000000000000000029"
probes = [{ kind = "tcp", target = "127.0.0.1:8080" }]
"""


def write(tmp_path: Path, text: str, name: str = "agent.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def load_error(tmp_path: Path, text: str) -> ConfigError:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value)
    return info.value


@pytest.mark.parametrize("name", ["hub-and-spoke.toml", "distributed.toml", "hybrid.toml"])
def test_example_configs_load(name: str) -> None:
    cfg = load_config(EXAMPLES / name)
    assert cfg.layers[0].role == "primary"
    assert all(layer.modem in {m.id for m in cfg.modems} for layer in cfg.layers)
    PolicyConfig.from_config(cfg)  # the policy accepts what the loader accepts


def test_minimal_config_gets_documented_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, MINIMAL))
    assert isinstance(cfg, Config)
    m = cfg.modems[0]
    assert (m.vendor, m.refresh, m.apdu, m.isdr_aid) == ("auto", "auto", "auto", DEFAULT_ISDR_AID)
    assert cfg.layers[1].role == "failover"
    probe = cfg.layers[1].probes[0]
    assert (probe.interval, probe.timeout, probe.window) == (5.0, 1.0, 5)
    assert (cfg.policy.down_after, cfg.policy.up_after) == (1, 1)
    assert cfg.mqtt.base_topic == "esim-agent"
    assert cfg.mqtt.commands.enabled is False
    assert cfg.usage.alert_thresholds == [50, 75, 90]
    assert cfg.control_socket == "/run/esim-agent/control.sock"
    assert EX_CONFIG == 78


def test_wrong_type_names_the_dotted_key(tmp_path: Path) -> None:
    err = load_error(tmp_path, MINIMAL.replace('profile = "89000000000000000029"', "profile = 42"))
    assert err.key == "layers[1].profile"
    assert "layers[1].profile" in str(err)
    assert "str" in err.reason


def test_missing_and_unknown_fields_name_the_field(tmp_path: Path) -> None:
    err = load_error(
        tmp_path,
        MINIMAL.replace(
            'modem = "m0"\nprofile = "89000000000000000029"', 'profile = "89000000000000000029"'
        ),
    )
    assert err.key == "layers[1].modem"
    err = load_error(tmp_path, MINIMAL + "\n[timers]\nhold_dwon = 5\n")
    assert err.key == "timers.hold_dwon"


def test_bad_enum_value(tmp_path: Path) -> None:
    err = load_error(
        tmp_path,
        MINIMAL.replace('port = "/dev/ttyUSB2"', 'port = "/dev/ttyUSB2"\nrefresh = "reboot"'),
    )
    assert err.key == "modems[0].refresh"


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    err = load_error(tmp_path, "device_id = \n")
    assert err.key is None
    assert "TOML" in err.reason


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")


@pytest.mark.parametrize(
    ("change", "key", "reason"),
    [
        (('name = "backup"', 'name = "primary"'), "layers[1].name", "duplicate"),
        (
            (
                'modem = "m0"\nprofile = "89000000000000000029"',
                'modem = "m9"\nprofile = "89000000000000000029"',
            ),
            "layers[1].modem",
            "m9",
        ),
        (('profile = "89000000000000000029"', 'profile = "8900"'), "layers[1].profile", "18-20"),
        (('role = "primary"', 'role = "failover"'), "layers", "primary"),
        (
            ('port = "/dev/ttyUSB2"', 'port = "/dev/ttyUSB2"\nimei = "356938035643809"'),
            "modems[0]",
            "exactly one",
        ),
        (
            ('port = "/dev/ttyUSB2"', 'usb = { vendor = "zz", product = "0125" }'),
            "modems[0].usb.vendor",
            "hex",
        ),
        (
            ('target = "127.0.0.1:8080"', 'target = "127.0.0.1"'),
            "layers[1].probes[0].target",
            "host:port",
        ),
        (('kind = "tcp"', 'kind = "dns"'), "layers[1].probes[0].target", "dns"),
        (('device_id = "dev1"', 'device_id = "a/b"'), "device_id", "MQTT"),
    ],
)
def test_cross_field_checks(tmp_path: Path, change: tuple[str, str], key: str, reason: str) -> None:
    assert change[0] in MINIMAL
    err = load_error(tmp_path, MINIMAL.replace(change[0], change[1], 1))
    assert err.key == key
    assert reason in err.reason


def test_emergency_rules(tmp_path: Path) -> None:
    two = MINIMAL.replace(
        'probes = [{ kind = "tcp", target = "127.0.0.1:8080" }]', 'role = "emergency"'
    )
    assert load_config(write(tmp_path, two)).layers[1].role == "emergency"
    three = (
        two
        + '\n[[layers]]\nname = "x"\nmodem = "m0"\nprofile = "89000000000000000037"\nrole = "emergency"\n'
    )
    err = load_error(tmp_path, three)
    assert err.key == "layers[1].role"


def test_timers_and_thresholds_must_be_ordered(tmp_path: Path) -> None:
    err = load_error(tmp_path, MINIMAL + "\n[timers]\nhold_down = 60\nhold_down_max = 30\n")
    assert err.key == "timers.hold_down_max"
    err = load_error(tmp_path, MINIMAL + "\n[usage]\nalert_thresholds = [90, 50]\n")
    assert err.key == "usage.alert_thresholds"
    err = load_error(tmp_path, MINIMAL + "\n[timers]\nswitch_timeout = 10\nrollback_timeout = 30\n")
    assert err.key == "timers.rollback_timeout"


def test_remote_commands_need_allow_list_and_token(tmp_path: Path) -> None:
    err = load_error(tmp_path, MINIMAL + "\n[mqtt.commands]\nenabled = true\nallowed = []\n")
    assert err.key == "mqtt.commands.allowed"
    err = load_error(tmp_path, MINIMAL + '\n[mqtt.commands]\nenabled = true\nallowed = ["drill"]\n')
    assert err.key == "mqtt.commands.token"
    err = load_error(
        tmp_path, MINIMAL + '\n[mqtt.commands]\nenabled = true\nallowed = ["reboot"]\ntoken = "x"\n'
    )
    assert err.key == "mqtt.commands.allowed[0]"
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-s3cret-s3cret\n")
    ok = MINIMAL + '\n[mqtt.commands]\nenabled = true\nallowed = ["drill"]\ntoken_file = "token"\n'
    cfg = load_config(write(tmp_path, ok))
    c = cfg.mqtt.commands
    assert read_secret(c.token, c.token_file, tmp_path) == "s3cret-s3cret-s3cret"


def test_secret_files_must_exist(tmp_path: Path) -> None:
    err = load_error(tmp_path, MINIMAL + '\n[mqtt]\npassword_file = "/nonexistent/pw"\n')
    assert err.key == "mqtt.password_file"
    err = load_error(
        tmp_path, MINIMAL + '\n[mqtt]\npassword = "a"\npassword_file = "/etc/hostname"\n'
    )
    assert err.key == "mqtt.password_file"


def test_hooks_must_be_absolute_executables(tmp_path: Path) -> None:
    err = load_error(tmp_path, MINIMAL + '\n[hooks]\non_transition = ["notify.sh"]\n')
    assert err.key == "hooks.on_transition[0]"
    script = tmp_path / "hook.sh"
    script.write_text("#!/bin/sh\n")
    err = load_error(tmp_path, MINIMAL + f'\n[hooks]\non_transition = ["{script}"]\n')
    assert "not executable" in err.reason
    os.chmod(script, 0o755)
    assert load_config(write(tmp_path, MINIMAL + f'\n[hooks]\non_transition = ["{script}"]\n'))


def test_liberal_iccids_and_sizes(tmp_path: Path) -> None:
    text = MINIMAL.replace(
        'profile = "89000000000000000029"', 'profile = "8900 0000 0000 0000 029F"'
    )
    text += '\n[usage.quotas]\n"89000000000000000029" = "1.5 GB"\n'
    cfg = load_config(write(tmp_path, text))
    assert cfg.layers[1].profile == "8900000000000000029"
    assert parse_size(cfg.usage.quotas["89000000000000000029"]) == 1_500_000_000
    assert parse_size("512 MiB") == 512 * 2**20
    assert parse_size(10) == 10
    with pytest.raises(ValueError, match="size"):
        parse_size("lots")


def test_bad_quota_size_names_the_key(tmp_path: Path) -> None:
    err = load_error(tmp_path, MINIMAL + '\n[usage.quotas]\n"89000000000000000029" = "many"\n')
    assert err.key == "usage.quotas.89000000000000000029"


def test_demo_config_from_emulator_info(tmp_path: Path) -> None:
    info = {
        "port": "/dev/pts/7",
        "control": "/tmp/ctl",
        "modems": [
            {
                "id": "m0",
                "port": "/dev/pts/7",
                "link": str(tmp_path / "modem0"),
                "vendor": "quectel",
                "tcp_port": 40001,
                "http_port": 40002,
                "dns_port": 40003,
                "http_url": "http://127.0.0.1:40002/generate_204",
            }
        ],
    }
    iccids = ["89000000000000000011", "89000000000000000029", "89000000000000000037"]
    cfg = default_demo_config(info, 18830, tmp_path, iccids, command_token="t" * 20)
    assert [(layer.name, layer.role) for layer in cfg.layers] == [
        ("primary", "primary"),
        ("failover", "failover"),
        ("emergency", "emergency"),
    ]
    assert cfg.modems[0].port == str(tmp_path / "modem0")  # the link follows replugs
    assert cfg.mqtt.enabled
    assert cfg.mqtt.port == 18830
    assert cfg.mqtt.commands.enabled
    assert {p.kind for p in cfg.layers[0].probes} == {"tcp", "http", "dns"}
    assert cfg.state_dir == str(tmp_path)
    no_mqtt = default_demo_config(info, None, tmp_path, iccids[:2])
    assert not no_mqtt.mqtt.enabled
    assert [layer.role for layer in no_mqtt.layers] == ["primary", "failover"]


def test_written_config_reads_back_the_same(tmp_path: Path) -> None:
    from agent.config import config_to_toml

    for example in sorted(Path("config").glob("*.toml")):
        cfg = load_config(example)
        out = tmp_path / example.name
        out.write_text(config_to_toml(cfg))
        assert load_config(out) == cfg
