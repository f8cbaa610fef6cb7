"""What a device does when it reaches its own limit inside a shared pool (`on_limit`).

The action goes through the daemon's one command table (`switch_layer`, `profile_disable`), so
it behaves as the same command from the CLI or MQTT would. Before acting it reads `status`: a
profile disabled here must never leave the device without a working layer silently, so the
outcome names the layers still working and says so loudly when none is.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import Any

import structlog

from agent.config import PoolConfig, parse_on_limit
from agent.errors import AgentError
from agent.mqtt.commands import CommandRejected

log = structlog.get_logger(__name__)

#: A command by name with its arguments (CommandTable.call).
CommandRunner = Callable[[str, Mapping[str, Any]], Awaitable[object]]
WORKING = ("up", "degraded")


async def carry_out(pool: PoolConfig, device: str, run: CommandRunner) -> dict[str, Any]:
    """Carry out the pool's `on_limit` for this device; returns the `pool_limit_action` event
    data (`outcome`: done, failed or nothing_to_do). Never raises for a refused command."""
    kind, layer = parse_on_limit(pool.on_limit)
    out: dict[str, Any] = {"pool": pool.name, "device": device, "action": pool.on_limit}
    try:
        status = await run("status", {})
        layers = _list(status, "layers")
        if kind == "switch_layer":
            result = await run("switch_layer", {"layer": layer})
            accepted = isinstance(result, Mapping) and bool(result.get("accepted"))
            out["outcome"] = "done" if accepted else "failed"
            out["detail"] = f"pinned layer {layer}" if accepted else f"switch to {layer} refused"
            out["working_layers"] = _working(layers, excluded=())
        elif kind == "disable_profile":
            members = set(pool.members)
            targets = [
                (str(m.get("id")), str(m.get("enabled_iccid")))
                for m in _list(status, "modems")
                if m.get("enabled_iccid") in members
            ]
            for modem, iccid in targets:
                await run("profile_disable", {"modem": modem, "iccid": iccid, "force": True})
            disabled = [iccid for _, iccid in targets]
            lost = [str(x.get("name")) for x in layers if x.get("profile") in disabled]
            out["outcome"] = "done" if targets else "nothing_to_do"
            out["detail"] = (
                f"disabled the pool's profile on {', '.join(m for m, _ in targets)}"
                if targets
                else "no pool profile is enabled"
            )
            out["disabled"] = disabled
            out["working_layers"] = _working(layers, excluded=lost)
        else:
            out["outcome"] = "nothing_to_do"
            out["working_layers"] = _working(layers, excluded=())
    except (CommandRejected, AgentError, TimeoutError) as exc:
        out["outcome"] = "failed"
        out["detail"] = f"{type(exc).__name__}: {exc}"
        log.error("pool_limit_action_failed", **out)
        return out
    if kind != "none" and not out["working_layers"]:
        out["no_working_layer"] = True
        log.error("pool_limit_no_working_layer", **out)
    else:
        log.warning("pool_limit_action", **out)
    return out


def _list(status: object, key: str) -> list[Mapping[str, Any]]:
    if not isinstance(status, Mapping):
        return []
    items = status.get(key)
    return [x for x in items if isinstance(x, Mapping)] if isinstance(items, list) else []


def _working(layers: list[Mapping[str, Any]], excluded: Collection[str]) -> list[str]:
    gone = set(excluded)
    return [
        str(x.get("name"))
        for x in layers
        if x.get("health") in WORKING and x.get("name") not in gone
    ]
