"""From what was observed to the checklist's items; pure functions, no I/O."""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from agent.check.report import CheckItem, Status
from agent.config import Config, LayerConfig

REGISTERED = ("home", "roaming")


class ModemSeen(msgspec.Struct, kw_only=True):
    """What one configured modem showed, straight or through the daemon."""

    id: str
    port: str | None = None
    #: Why the modem could not be read at all (not found, not answering); None when it answered.
    error: str | None = None
    sim_state: str | None = None
    eid: str | None = None
    #: Why the eUICC could not be read; None when its profile list came back.
    euicc_error: str | None = None
    #: ICCID -> state (enabled/disabled) of every installed profile.
    profiles: dict[str, str] = msgspec.field(default_factory=dict)
    registration: str | None = None


class ProbeSeen(msgspec.Struct, kw_only=True):
    """A layer's data-path verdict: passing, failing, or not known (None)."""

    passing: bool | None
    detail: str


def modems_item(cfg: Config, seen: dict[str, ModemSeen]) -> CheckItem:
    """Every configured modem answers, its SIM is ready and its eUICC lists its profiles."""
    problems: list[str] = []
    fixes: list[str] = []
    for m in cfg.modems:
        s = seen.get(m.id)
        if s is None or s.error is not None:
            problems.append(f"{m.id}: {s.error if s else 'not found'}")
            fixes.append(f"plug in modem {m.id} or correct its port/usb in the config")
        elif s.sim_state != "ready":
            problems.append(f"{m.id}: SIM {s.sim_state or 'unknown'}")
            fixes.append(f"check the eUICC in {m.id} (SIM state should be ready)")
        elif s.euicc_error is not None:
            problems.append(f"{m.id}: eUICC not readable ({s.euicc_error})")
            fixes.append(f"check modems.{m.id}.isdr_aid and apdu for this eUICC")
    if problems:
        return _fail("modems", "; ".join(problems), "; ".join(dict.fromkeys(fixes)))
    ok = ", ".join(f"{m.id} ({seen[m.id].port}, EID {seen[m.id].eid or '?'})" for m in cfg.modems)
    return _pass("modems", f"{len(cfg.modems)} modem(s) answer with a ready SIM and eUICC: {ok}")


def primary_item(
    cfg: Config, seen: dict[str, ModemSeen], probes: dict[str, ProbeSeen]
) -> CheckItem:
    """The primary profile is the enabled one, registered, and its probes pass."""
    layer = _layers(cfg, "primary")[0] if _layers(cfg, "primary") else None
    if layer is None:
        return _skip("primary", "no primary layer in the config")
    s = seen.get(layer.modem)
    if s is None or s.error is not None or s.euicc_error is not None:
        return _skip("primary", f"modem {layer.modem} could not be read (see the modems item)")
    state = s.profiles.get(layer.profile)
    if state is None:
        return _fail(
            "primary",
            f"profile {layer.profile} is not installed on {layer.modem}",
            f"install the primary profile on {layer.modem}, or correct layers.{layer.name}.profile",
        )
    if state != "enabled":
        return _fail(
            "primary",
            f"profile {layer.profile} is {state} on {layer.modem}",
            f"esim-agent profile enable {layer.profile} --port {s.port}  "
            f"(or `esim-agent switch {layer.name}` while the daemon runs)",
        )
    if s.registration not in REGISTERED:
        return _fail(
            "primary",
            f"{layer.modem} is {s.registration or 'unknown'} on {layer.profile}, not registered",
            "check coverage and the profile's subscription (`esim-agent modem info`)",
        )
    probe = probes.get(layer.name)
    if probe is None or probe.passing is None:
        detail = probe.detail if probe else "no probes configured"
        return _pass(
            "primary",
            f"{layer.profile} enabled and {s.registration} on {layer.modem}; probes: {detail}",
        )
    if not probe.passing:
        return _fail(
            "primary",
            f"{layer.profile} is registered ({s.registration}) but its probes fail: {probe.detail}",
            "check the data connection (APN, routes) and the probe targets in the config",
        )
    return _pass(
        "primary",
        f"{layer.profile} enabled and {s.registration} on {layer.modem}; probes pass ({probe.detail})",
    )


def failover_item(cfg: Config, seen: dict[str, ModemSeen]) -> CheckItem:
    """Every failover layer's profile is installed on its modem."""
    layers = _layers(cfg, "failover")
    if not layers:
        return _skip("failover", "no failover layer in the config")
    return _installed("failover", layers, seen, dormant=False)


def emergency_item(cfg: Config, seen: dict[str, ModemSeen]) -> CheckItem:
    """The emergency profile is installed and disabled: dormant until both others fail."""
    layers = _layers(cfg, "emergency")
    if not layers:
        return _skip("emergency", "no emergency layer in the config")
    return _installed("emergency", layers, seen, dormant=True)


def downloads_item(
    cfg: Config, seen: dict[str, ModemSeen], reasons: dict[str, str] | None = None
) -> CheckItem:
    """Store and forward: every layer that carries an activation code has its profile
    installed; a missing one is named with why (`reasons`: the daemon's profile_reason)."""
    layers = [
        x for x in cfg.layers if not x.is_sibling and (x.activation_code or x.activation_code_file)
    ]
    if not layers:
        return _pass("downloads", "no layer waits for a download (no activation_code)")
    problems: list[str] = []
    good: list[str] = []
    for layer in layers:
        s = seen.get(layer.modem)
        if s is None or s.error is not None or s.euicc_error is not None:
            problems.append(f"{layer.name}: modem {layer.modem} could not be read")
        elif layer.profile in s.profiles:
            good.append(f"{layer.profile} on {layer.modem}")
        else:
            why = (reasons or {}).get(layer.name) or "waiting for the daemon and a working link"
            problems.append(
                f"{layer.name}: profile {layer.profile} is missing on {layer.modem} ({why})"
            )
    if problems:
        return _fail(
            "downloads",
            "; ".join(problems),
            "keep the daemon running on a working link: it downloads the profile from the "
            "layer's activation code by itself (`esim-agent status` shows profile_state)",
        )
    return _pass("downloads", f"downloaded: {', '.join(good)}")


def quotas_item(cfg: Config) -> CheckItem:
    """Every profile the layers use has a quota of its own or belongs to a shared pool."""
    pooled = {m for pool in cfg.usage.pools for m in pool.members}
    missing = [
        layer
        for layer in cfg.layers
        if not layer.is_sibling
        and layer.profile not in cfg.usage.quotas
        and layer.profile not in pooled
    ]
    if missing:
        names = ", ".join(f"{x.name} ({x.profile})" for x in missing)
        example = missing[0].profile
        return _fail(
            "quotas",
            f"no quota or pool for {names}",
            f'add [usage.quotas] "{example}" = "10 GB" (or put it in a [[usage.pools]] entry)',
        )
    return _pass(
        "quotas",
        f"all {len(cfg.layers)} layer profile(s) have a quota or a pool",
    )


def _installed(
    item: str, layers: Sequence[LayerConfig], seen: dict[str, ModemSeen], *, dormant: bool
) -> CheckItem:
    problems: list[str] = []
    fixes: list[str] = []
    good: list[str] = []
    for layer in layers:
        s = seen.get(layer.modem)
        if s is None or s.error is not None or s.euicc_error is not None:
            problems.append(f"{layer.name}: modem {layer.modem} could not be read")
            fixes.append(f"see the modems item for {layer.modem}")
            continue
        state = s.profiles.get(layer.profile)
        if state is None:
            problems.append(
                f"{layer.name}: profile {layer.profile} is not installed on {layer.modem}"
            )
            fixes.append(
                f"the daemon downloads it from layers.{layer.name}.activation_code on the "
                "first working link (see the downloads item)"
                if layer.activation_code or layer.activation_code_file
                else f"download the {layer.name} profile to {layer.modem} before you travel"
            )
        elif dormant and state == "enabled":
            problems.append(f"{layer.name}: profile {layer.profile} is enabled, not dormant")
            fixes.append(
                f"esim-agent profile disable {layer.profile} --port {s.port} after enabling "
                "the primary (the daemon enables the emergency profile only when needed; "
                "while it runs, it refuses this without --force)"
            )
        else:
            good.append(f"{layer.profile} on {layer.modem} ({state})")
    if problems:
        return _fail(item, "; ".join(problems), "; ".join(dict.fromkeys(fixes)))
    what = "installed and dormant" if dormant else "installed"
    return _pass(item, f"{what}: {', '.join(good)}")


def _layers(cfg: Config, role: str) -> list[LayerConfig]:
    # A sibling layer has no modem or profile of ours to check.
    return [x for x in cfg.layers if x.role == role and not x.is_sibling]


TITLES = {
    "config": "config valid",
    "modems": "every modem found, SIM and eUICC readable",
    "primary": "primary profile enabled, registered, probes passing",
    "failover": "failover profile installed",
    "emergency": "emergency profile installed and dormant",
    "downloads": "profiles waiting for download (activation codes) installed",
    "quotas": "quotas and pools for the profiles in use",
    "broker": "MQTT broker reachable with the configured credentials and TLS",
    "clock": "clock sane",
    "ports": "serial ports owned by nobody else",
    "modemmanager": "ModemManager kept off our ports",
}
#: Item ids in the order they are shown.
ORDER = tuple(TITLES)


def item(id_: str, status: Status, detail: str, fix: str | None = None) -> CheckItem:
    """A CheckItem with its standard title."""
    return CheckItem(id=id_, title=TITLES[id_], status=status, detail=detail, fix=fix)


def _pass(id_: str, detail: str) -> CheckItem:
    return item(id_, "pass", detail)


def _fail(id_: str, detail: str, fix: str) -> CheckItem:
    return item(id_, "fail", detail, fix)


def _skip(id_: str, detail: str) -> CheckItem:
    return item(id_, "skip", detail)
