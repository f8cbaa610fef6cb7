"""Gathering what the check judges: straight from the modems, or from the daemon that owns them."""

from __future__ import annotations

import asyncio
from typing import Any

from agent.check.evaluate import ModemSeen, ProbeSeen
from agent.config import Config, ModemConfig
from agent.errors import AgentError, PortGoneError
from agent.euicc.lpa import Lpa
from agent.euicc.transport import MODE_CGLA, MODE_CSIM, AtApduTransport
from agent.health.probes import probe_from_spec
from agent.modem.driver import open_modem
from agent.transport.discovery import usb_at_port
from agent.transport.udev import udev_devices

MODEM_ANSWER_S = 3.0
MODEM_READ_S = 60.0
_APDU_MODES = {"auto": None, "ccho": MODE_CGLA, "cgla": MODE_CGLA, "csim": MODE_CSIM}


def resolve_port(m: ModemConfig) -> str:
    """The tty of a configured modem: its port, or its USB device's AT port as udev shows it."""
    if m.port:
        return m.port
    if m.usb is not None:
        u = m.usb
        return usb_at_port(udev_devices(), u.vendor, u.product, u.serial, u.interface)
    raise PortGoneError(f"imei {m.imei}", "a modem found by IMEI is checked through the daemon")


def resolved_ports(cfg: Config) -> dict[str, str | None]:
    """Modem id -> port, None where it cannot be resolved."""
    out: dict[str, str | None] = {}
    for m in cfg.modems:
        try:
            out[m.id] = resolve_port(m)
        except AgentError:
            out[m.id] = None
    return out


async def read_modem(m: ModemConfig) -> ModemSeen:
    """Open one modem, read its SIM, registration and eUICC profiles, close it again."""
    try:
        port = resolve_port(m)
    except PortGoneError as exc:
        return ModemSeen(id=m.id, error=str(exc))
    seen = ModemSeen(id=m.id, port=port)
    vendor = None if m.vendor == "auto" else m.vendor
    try:
        async with (
            asyncio.timeout(MODEM_READ_S),
            open_modem(port, vendor=vendor, answer_within=MODEM_ANSWER_S) as modem,
        ):
            info = await modem.info()
            seen.sim_state = info.sim.state
            seen.registration = info.registration.state
            transport = AtApduTransport(
                modem.channel,
                modem.port,
                aid=bytes.fromhex(m.isdr_aid),
                mode=_APDU_MODES.get(m.apdu),
            )
            try:
                async with Lpa(transport) as lpa:
                    seen.eid = await lpa.get_eid()
                    seen.profiles = {
                        p.iccid: p.state or "unknown" for p in await lpa.list_profiles() if p.iccid
                    }
            except AgentError as exc:
                seen.euicc_error = str(exc)
    except PortGoneError as exc:
        seen.error = exc.reason
    except AgentError as exc:
        seen.error = str(exc)
    except TimeoutError:
        seen.error = f"no complete answer within {MODEM_READ_S:g} s"
    return seen


async def run_probes(cfg: Config, layer_name: str) -> ProbeSeen:
    """One round of a layer's probes: passing when any passes (as the daemon judges a switch)."""
    layer = cfg.layer(layer_name)
    if not layer.probes:
        return ProbeSeen(passing=None, detail="no probes configured")
    probes = [probe_from_spec(p.kind, p.target, p.timeout) for p in layer.probes]
    results = await asyncio.gather(*(p.run() for p in probes))
    parts = [
        f"{p.kind} {p.target}: "
        + (
            f"ok {r.latency_ms:.0f} ms"
            if r.ok and r.latency_ms is not None
            else "ok"
            if r.ok
            else r.error or "failed"
        )
        for p, r in zip(probes, results, strict=True)
    ]
    return ProbeSeen(passing=any(r.ok for r in results), detail="; ".join(parts))


async def observe_direct(cfg: Config) -> tuple[dict[str, ModemSeen], dict[str, ProbeSeen]]:
    """Read every modem in turn, then run the primary layer's probes once."""
    seen = {m.id: await read_modem(m) for m in cfg.modems}
    probes: dict[str, ProbeSeen] = {}
    for layer in cfg.layers:
        if layer.role == "primary":
            probes[layer.name] = await run_probes(cfg, layer.name)
    return seen, probes


def observe_status(
    cfg: Config, status: dict[str, Any]
) -> tuple[dict[str, ModemSeen], dict[str, ProbeSeen]]:
    """The same observations from a running daemon's `status` (it owns the ports)."""
    by_id = {m.get("id"): m for m in status.get("modems", [])}
    seen: dict[str, ModemSeen] = {}
    for m in cfg.modems:
        entry = by_id.get(m.id)
        if entry is None:
            seen[m.id] = ModemSeen(
                id=m.id, error="the daemon does not know this modem (reload it?)"
            )
            continue
        s = ModemSeen(id=m.id, port=entry.get("port"), eid=entry.get("eid"))
        info = entry.get("info") or {}
        if not entry.get("online"):
            s.error = f"offline ({entry.get('last_error') or 'not connected'})"
        else:
            s.sim_state = (info.get("sim") or {}).get("state")
            s.registration = (info.get("registration") or {}).get("state")
            profiles = entry.get("profiles") or []
            if profiles:
                s.profiles = {
                    p["iccid"]: p.get("state") or "unknown" for p in profiles if p.get("iccid")
                }
            else:
                s.euicc_error = "the daemon has read no profiles from it"
        seen[m.id] = s
    probes: dict[str, ProbeSeen] = {}
    for layer in status.get("layers", []):
        health, reason = layer.get("health"), layer.get("reason")
        passing = {"up": True, "degraded": True, "down": False}.get(str(health))
        probes[str(layer.get("name"))] = ProbeSeen(
            passing=passing, detail=f"health {health} ({reason})"
        )
    return seen, probes


def ports_from_status(cfg: Config, status: dict[str, Any]) -> dict[str, str | None]:
    """Modem id -> the port the daemon has open."""
    by_id = {m.get("id"): m for m in status.get("modems", [])}
    return {m.id: (by_id.get(m.id) or {}).get("port") for m in cfg.modems}
