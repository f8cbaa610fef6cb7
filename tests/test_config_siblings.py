"""Sibling layers, [group] and the group emergency in the config: what loads, what is refused."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from agent.config import Config, config_to_toml, load_config
from agent.errors import ConfigError

WATCH = """
device_id = "watch"
state_dir = "/tmp/esim-agent-test"

[mqtt]
enabled = true

[group]
name = "family"
devices = ["phone", "watch", "tablet"]
priority = { tablet = 1 }

[timers]
companion_grace = 7.5

[[modems]]
id = "m0"
port = "/dev/ttyUSB2"

[[layers]]
name = "phone-hotspot"
device = "phone"
interface = "wlan0"
role = "primary"

[[layers]]
name = "own"
modem = "m0"
profile = "89000000000000000029"
"""

TABLET = """
device_id = "tablet"

[mqtt]
enabled = true

[group]
name = "family"
devices = ["phone", "watch", "tablet"]
emergency_devices = ["tablet"]

[[modems]]
id = "m0"
port = "/dev/ttyUSB2"

[[layers]]
name = "group-emergency"
modem = "m0"
profile = "89000000000000000037"
role = "emergency"
scope = "group"
"""


def load(tmp_path: Path, text: str) -> Config:
    path = tmp_path / "agent.toml"
    path.write_text(textwrap.dedent(text))
    return load_config(path)


def error(tmp_path: Path, text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    return info.value


def test_companion_config_loads_with_sibling_layer_and_group(tmp_path: Path) -> None:
    cfg = load(tmp_path, WATCH)
    hotspot = cfg.layers[0]
    assert hotspot.is_sibling
    assert hotspot.device == "phone"
    assert hotspot.interface == "wlan0"
    assert hotspot.modem == ""
    assert hotspot.profile == ""
    assert not cfg.layers[1].is_sibling
    assert cfg.timers.companion_grace == 7.5
    assert cfg.group is not None
    assert cfg.group.name == "family"
    assert cfg.group.wake_order(["watch", "tablet", "phone"]) == ["phone", "watch", "tablet"]
    assert cfg.group.priority == {"tablet": 1}


def test_defaults_companion_grace_ten_seconds_and_no_group(tmp_path: Path) -> None:
    cfg = load(tmp_path, WATCH.replace("[timers]\ncompanion_grace = 7.5\n", ""))
    assert cfg.timers.companion_grace == 10.0


def test_device_holding_only_the_group_emergency_needs_no_primary(tmp_path: Path) -> None:
    cfg = load(tmp_path, TABLET)
    assert cfg.layers[0].scope == "group"
    assert cfg.layers[0].role == "emergency"


def test_config_round_trips_through_toml(tmp_path: Path) -> None:
    cfg = load(tmp_path, WATCH)
    again = load(tmp_path, config_to_toml(cfg))
    assert again == cfg


@pytest.mark.parametrize(
    ("change", "key", "words"),
    [
        (('device = "phone"', 'device = "phone"\nmodem = "m0"'), "layers[0]", "not both"),
        (('device = "phone"', 'device = "laptop"'), "layers[0].device", "[group] devices"),
        (('device = "phone"', 'device = "watch"'), "layers[0].device", "its own sibling"),
        (('device = "phone"', 'device = "ph/one"'), "layers[0].device", "device_id"),
        (('interface = "wlan0"', 'interface = "wlan0/x"'), "layers[0].interface", "interface"),
        (
            ('modem = "m0"\nprofile', 'interface = "wwan0"\nmodem = "m0"\nprofile'),
            "layers[1].interface",
            "only a sibling",
        ),
        (('modem = "m0"\n', ""), "layers[1].modem", "or give device"),
        (
            ('devices = ["phone", "watch", "tablet"]', 'devices = ["watch", "tablet"]'),
            "layers[0].device",
            "[group] devices",
        ),
        (
            ("priority = { tablet = 1 }", "priority = { laptop = 1 }"),
            "group.priority.laptop",
            "not a device",
        ),
        (('name = "family"', 'name = "fam ily"'), "group.name", "letters"),
        (("companion_grace = 7.5", "companion_grace = -1"), "timers.companion_grace", ">= 0"),
        (("[mqtt]\nenabled = true", "[mqtt]\nenabled = false"), "mqtt.enabled", "needs MQTT"),
        (
            ('role = "primary"', 'role = "primary"\nradio_down_when_inactive = true'),
            "layers[0].radio_down_when_inactive",
            "no radio",
        ),
        (
            ('interface = "wlan0"', 'probes = [{ kind = "icmp", target = "198.18.0.1" }]'),
            "layers[0].probes",
            "need its interface",
        ),
        (
            ('role = "primary"', 'role = "primary"\napn = "internet"'),
            "layers[0].apn",
            "no data context",
        ),
    ],
)
def test_sibling_mistakes_name_the_key(
    tmp_path: Path, change: tuple[str, str], key: str, words: str
) -> None:
    old, new = change
    assert old in WATCH
    err = error(tmp_path, WATCH.replace(old, new, 1))
    assert err.key == key, err
    assert words in str(err)


def test_sibling_layer_without_group_is_refused(tmp_path: Path) -> None:
    text = WATCH.split("[group]", maxsplit=1)[0] + "[[modems]]" + WATCH.split("[[modems]]")[1]
    err = error(tmp_path, text)
    assert err.key == "layers[0].device"


def test_group_scope_only_on_emergency_and_with_a_group(tmp_path: Path) -> None:
    err = error(tmp_path, TABLET.replace('role = "emergency"', 'role = "primary"'))
    assert err.key == "layers[0].scope"
    assert "only an emergency" in str(err)
    no_group = TABLET.split("[group]", maxsplit=1)[0] + "[[modems]]" + TABLET.split("[[modems]]")[1]
    err = error(tmp_path, no_group)
    assert err.key == "layers[0].scope"
    assert "[group]" in str(err)


def test_group_emergency_devices_must_match_this_devices_layers(tmp_path: Path) -> None:
    err = error(
        tmp_path, TABLET.replace('emergency_devices = ["tablet"]', "emergency_devices = []")
    )
    assert err.key == "group.emergency_devices"
    err = error(
        tmp_path, WATCH.replace('name = "family"', 'name = "family"\nemergency_devices = ["watch"]')
    )
    assert err.key == "group.emergency_devices"
    err = error(
        tmp_path,
        TABLET.replace('emergency_devices = ["tablet"]', 'emergency_devices = ["tablet", "pc"]'),
    )
    assert err.key == "group.emergency_devices[1]"


def test_group_must_list_this_device_and_outlive_keepalive(tmp_path: Path) -> None:
    err = error(tmp_path, TABLET.replace('"watch", "tablet"]\n', '"watch"]\n'))
    assert err.key == "group.devices"
    assert "'tablet'" in str(err)
    err = error(tmp_path, TABLET.replace('["tablet"]\n', '["tablet"]\nclaim_ttl = 40.0\n'))
    assert err.key == "group.claim_ttl"


def test_run_check_accepts_sibling_layers(tmp_path: Path) -> None:
    # A child process: `run` sets up the process's logging, which must not leak into other tests.
    path = tmp_path / "agent.toml"
    text = textwrap.dedent(WATCH).replace("/tmp/esim-agent-test", str(tmp_path / "state"))
    text = text.replace("/dev/ttyUSB2", str(tmp_path / "absent-port"))
    path.write_text(text + f'\n[control]\nsocket = "{tmp_path / "control.sock"}"\n')
    result = subprocess.run(
        [sys.executable, "-m", "agent", "run", "--check", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=90.0,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{path}: ok"


def test_check_does_not_ask_a_sibling_layer_for_a_quota(tmp_path: Path) -> None:
    from agent.check.evaluate import quotas_item

    cfg = load(tmp_path, WATCH + '\n[usage.quotas]\n"89000000000000000029" = "1 GB"\n')
    item = quotas_item(cfg)
    assert item.status == "pass", item


def test_claim_config_from_the_group(tmp_path: Path) -> None:
    from agent.siblings.claim import ClaimConfig

    text = TABLET.replace('["tablet"]\n', '["tablet", "watch"]\npriority = { watch = -1 }\n')
    cc = ClaimConfig.from_config(load(tmp_path, text))
    assert cc is not None
    assert cc.order == ("watch", "tablet")
    assert cc.others == ("phone", "watch")
    assert cc.ttl == 60.0
    assert ClaimConfig.from_config(load(tmp_path, WATCH)) is None
