"""The pool limit action against the command table's contract: which commands it sends, and how
it reports a device left without a working layer (the daemon end to end is in
test_e2e_pool_limits.py)."""

from __future__ import annotations

from typing import Any

import msgspec

from agent.config import PoolConfig
from agent.daemon.commands import (
    Command,
    CommandTable,
    NoArgs,
    ProfileChangeArgs,
    SwitchLayerArgs,
)
from agent.daemon.poolaction import carry_out
from agent.mqtt.commands import CommandRejected

HOME = "89000000000000000011"
TRAVEL = "89000000000000000029"


class Device:
    """A command table over a device's layers as `status` reports them."""

    def __init__(self, layers: list[dict[str, Any]], enabled: str | None) -> None:
        self.layers = layers
        self.enabled = enabled
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.table = CommandTable(
            [
                Command("status", NoArgs, self.status, ""),
                Command("switch_layer", SwitchLayerArgs, self.switch_layer, ""),
                Command("profile_disable", ProfileChangeArgs, self.profile_disable, ""),
            ]
        )

    async def status(self, _: NoArgs) -> object:
        return {
            "layers": self.layers,
            "modems": [{"id": "m0", "enabled_iccid": self.enabled}],
        }

    async def switch_layer(self, args: SwitchLayerArgs) -> object:
        self.calls.append(("switch_layer", msgspec.to_builtins(args)))
        if args.layer == "gone":
            raise CommandRejected("unknown_layer", "no layer 'gone'")
        return {"accepted": True, "transition": None}

    async def profile_disable(self, args: ProfileChangeArgs) -> object:
        self.calls.append(("profile_disable", msgspec.to_builtins(args)))
        self.enabled = None
        return {"iccid": args.iccid, "state": "disabled"}


def pool(on_limit: str) -> PoolConfig:
    return PoolConfig(
        name="team",
        members=[HOME],
        quota_bytes=1000,
        device_limits={"phone": 100},
        on_limit=on_limit,
    )


LAYERS = [
    {"name": "primary", "profile": HOME, "health": "up"},
    {"name": "backup", "profile": TRAVEL, "health": "down"},
]


async def test_disabling_the_only_working_layer_is_done_and_said_loudly() -> None:
    device = Device(LAYERS, enabled=HOME)
    out = await carry_out(pool("disable_profile"), "phone", device.table.call)
    assert device.calls == [
        ("profile_disable", {"modem": "m0", "iccid": HOME, "force": True}),
    ]
    assert out["outcome"] == "done"
    assert out["disabled"] == [HOME]
    assert out["working_layers"] == []
    assert out["no_working_layer"] is True


async def test_nothing_to_disable_when_the_pool_profile_is_not_running() -> None:
    device = Device(LAYERS, enabled=TRAVEL)
    out = await carry_out(pool("disable_profile"), "phone", device.table.call)
    assert device.calls == []
    assert (out["outcome"], out["disabled"]) == ("nothing_to_do", [])


async def test_switch_layer_pins_and_a_refusal_is_reported_not_raised() -> None:
    device = Device(LAYERS, enabled=HOME)
    out = await carry_out(pool("switch_layer:backup"), "phone", device.table.call)
    assert device.calls == [("switch_layer", {"layer": "backup"})]
    assert out["outcome"] == "done"
    refused = await carry_out(pool("switch_layer:gone"), "phone", device.table.call)
    assert refused["outcome"] == "failed"
    assert "unknown_layer" in refused["detail"] or "no layer" in refused["detail"]
