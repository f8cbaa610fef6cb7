"""The data-path keys a user writes: interface per modem, APN and friends per layer."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from agent.config import Config, config_to_dict, load_config, read_secret
from agent.errors import ConfigError

BASE = """
device_id = "dev1"
state_dir = "/tmp/esim-agent-test"

[[modems]]
id = "m0"
port = "/dev/ttyUSB2"
{modem}

[[layers]]
name = "primary"
modem = "m0"
profile = "89000000000000000011"
role = "primary"
{layer}
"""


def load(tmp_path: Path, modem: str = "", layer: str = "") -> Config:
    path = tmp_path / "agent.toml"
    path.write_text(textwrap.dedent(BASE).format(modem=modem, layer=layer))
    return load_config(path)


def error(tmp_path: Path, modem: str = "", layer: str = "") -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, modem, layer)
    return info.value


def test_defaults_keep_todays_behaviour(tmp_path: Path) -> None:
    cfg = load(tmp_path)
    assert cfg.modems[0].interface == "auto"
    layer = cfg.layers[0]
    assert (layer.apn, layer.pdp_type, layer.metered) == ("auto", "ip", False)
    assert layer.apn_user is None
    assert layer.apn_password is None


def test_full_data_path_keys_load(tmp_path: Path) -> None:
    secret = tmp_path / "apn.secret"
    secret.write_text("s3cret\n")
    cfg = load(
        tmp_path,
        modem='interface = "wwan0"',
        layer=(
            'apn = "iot.example.mnc001.mcc234.gprs"\napn_user = "dev"\n'
            f'apn_password_file = "{secret}"\npdp_type = "ipv4v6"\nmetered = true'
        ),
    )
    layer = cfg.layers[0]
    assert cfg.modems[0].interface == "wwan0"
    assert layer.apn == "iot.example.mnc001.mcc234.gprs"
    assert layer.metered is True
    assert layer.pdp_type == "ipv4v6"
    assert read_secret(layer.apn_password, layer.apn_password_file) == "s3cret"


def test_interface_none_is_accepted(tmp_path: Path) -> None:
    assert load(tmp_path, modem='interface = "none"').modems[0].interface == "none"


@pytest.mark.parametrize(
    "name", ["", "eth0/1", "a name", "averyveryverylongname0", "wwan0:1", ".."]
)
def test_bad_interface_names_the_key(tmp_path: Path, name: str) -> None:
    exc = error(tmp_path, modem=f'interface = "{name}"')
    assert exc.key == "modems[0].interface"
    assert "interface name" in exc.reason


@pytest.mark.parametrize(
    ("layer", "key", "words"),
    [
        ('apn = "bad apn"', "layers[0].apn", "must be 'auto' or an APN"),
        ('apn = "-internet"', "layers[0].apn", "must be 'auto' or an APN"),
        ('apn = "internet"\napn_password = "x"', "layers[0].apn_user", "needs apn_user"),
        ('apn_user = "u"', "layers[0].apn", "need an explicit apn"),
        (
            'apn = "internet"\napn_user = "u"\napn_password = "p"\napn_password_file = "/etc/hostname"',
            "layers[0].apn_password_file",
            "not both",
        ),
        (
            'apn = "internet"\napn_user = "u"\napn_password_file = "/nonexistent/secret"',
            "layers[0].apn_password_file",
            "missing or unreadable",
        ),
        ('apn = "internet"\napn_user = "a\\"b"', "layers[0].apn_user", "must not contain"),
        ('pdp_type = "ipx"', "layers[0].pdp_type", "Invalid enum value 'ipx'"),
        ("metered = 1", "layers[0].metered", "Expected `bool`"),
    ],
)
def test_bad_data_keys_name_file_key_and_reason(
    tmp_path: Path, layer: str, key: str, words: str
) -> None:
    exc = error(tmp_path, layer=layer)
    assert exc.key == key
    assert words in exc.reason
    assert str(tmp_path / "agent.toml") in str(exc)


def test_config_show_hides_the_apn_password(tmp_path: Path) -> None:
    cfg = load(tmp_path, layer='apn = "internet"\napn_user = "u"\napn_password = "topsecret"')
    shown = config_to_dict(cfg)
    assert shown["layers"][0]["apn_password"] == "***"
    assert "topsecret" not in repr(shown)


def test_examples_with_data_keys_load() -> None:
    examples = Path(__file__).resolve().parent.parent / "config"
    layers = [layer for f in sorted(examples.glob("*.toml")) for layer in load_config(f).layers]
    assert any(layer.apn != "auto" for layer in layers)
    assert any(layer.metered for layer in layers)


def test_two_modems_cannot_share_an_interface(tmp_path: Path) -> None:
    text = textwrap.dedent(BASE).format(modem='interface = "wwan0"', layer="") + (
        '\n[[modems]]\nid = "m1"\nport = "/dev/ttyUSB5"\ninterface = "wwan0"\n'
    )
    path = tmp_path / "agent.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == "modems[1].interface"
    assert "already modem 'm0'" in info.value.reason
