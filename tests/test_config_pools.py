"""`[[usage.pools]]` as a user writes it: per-device limits, the limit action, the manager."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from agent.config import load_config, parse_on_limit
from agent.errors import ConfigError

HEAD = """
device_id = "phone"
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
"""

POOL = """
[[usage.pools]]
name = "family"
members = ["89000000000000000011"]
quota_bytes = "20 GB"
devices = ["watch", "tablet"]
"""


def load(tmp_path: Path, extra: str) -> object:
    path = tmp_path / "agent.toml"
    path.write_text(textwrap.dedent(HEAD + POOL + extra))
    return load_config(path)


def error(tmp_path: Path, extra: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, extra)
    return info.value


def test_a_complete_pool_loads(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        """
        device_limits = { phone = "5 GB", watch = "1 GB", tablet = 2000000000 }
        on_limit = "switch_layer:backup"
        manager = "tablet"
        successors = ["phone", "watch"]
        manager_takeover = 120
        """,
    )
    pool = cfg.usage.pools[0]  # type: ignore[attr-defined]
    assert pool.duty_order("phone") == ["tablet", "phone", "watch"]
    assert pool.pool_devices("phone") == ["phone", "watch", "tablet"]
    assert parse_on_limit(pool.on_limit) == ("switch_layer", "backup")


def test_without_successors_the_order_is_by_device_id(tmp_path: Path) -> None:
    cfg = load(tmp_path, 'manager = "watch"\n')
    assert cfg.usage.pools[0].duty_order("phone") == ["watch", "phone", "tablet"]  # type: ignore[attr-defined]
    # Every device computes the same order from its own list (it names the others).
    watch_view = cfg.usage.pools[0]  # type: ignore[attr-defined]
    watch_view.devices = ["phone", "tablet"]
    assert watch_view.duty_order("watch") == ["watch", "phone", "tablet"]


@pytest.mark.parametrize(
    ("extra", "key", "reason"),
    [
        ('device_limits = { van = "1 GB" }', "usage.pools[0].device_limits.van", "not this device"),
        ('device_limits = { phone = "lots" }', "usage.pools[0].device_limits.phone", "size"),
        ('on_limit = "explode"', "usage.pools[0].on_limit", "switch_layer:<layer>"),
        ('on_limit = "disable_profile"', "usage.pools[0].on_limit", "device_limits entry"),
        (
            'device_limits = { phone = "1 GB" }\non_limit = "switch_layer:nowhere"',
            "usage.pools[0].on_limit",
            "no layer named 'nowhere'",
        ),
        ('manager = "van"', "usage.pools[0].manager", "not this device"),
        ('successors = ["watch"]', "usage.pools[0].successors", "need a manager"),
        (
            'manager = "phone"\nsuccessors = ["phone"]',
            "usage.pools[0].successors[0]",
            "first already",
        ),
        ('manager = "phone"\nsuccessors = ["van"]', "usage.pools[0].successors[0]", "not in"),
        ('manager = "phone"\nmanager_takeover = 0', "usage.pools[0].manager_takeover", "> 0"),
    ],
)
def test_pool_mistakes_name_the_key(tmp_path: Path, extra: str, key: str, reason: str) -> None:
    exc = error(tmp_path, extra)
    assert exc.key == key
    assert reason in exc.reason


def test_a_pool_name_must_fit_in_a_topic(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(textwrap.dedent(HEAD + POOL.replace('"family"', '"fam/ily"')))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == "usage.pools[0].name"
