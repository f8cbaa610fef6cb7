"""Discovery for the daemon and `modem list`: the configured device source, and the report of what
the agent sees (devices, their ports and roles, identities, network interfaces, matched entries).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

import structlog

from agent.config import DiscoveryConfig, ModemConfig
from agent.modem.finder import Finder, spec_for
from agent.transport.discovery import Match, ModemDevice, match_all
from agent.transport.owners import port_holders
from agent.transport.udev import DeviceSource, PyudevSource

log = structlog.get_logger(__name__)

START_TIMEOUT_S = 10.0


def device_source(cfg: DiscoveryConfig) -> DeviceSource | None:
    """The source the config names: udev, the emulator's fake udev feed, or none."""
    if cfg.source == "none":
        return None
    if cfg.source == "emulator":
        # the emulator ships with the agent for tests and the demo; it is imported only here
        from hw_fixtures.udev_feed import EmulatorDeviceSource

        assert cfg.emulator_control is not None  # checked when the config was loaded
        return EmulatorDeviceSource(cfg.emulator_control)
    return PyudevSource()


async def start_finder(cfg: DiscoveryConfig) -> Finder | None:
    """A started Finder on the configured source; None for source = "none" or when it fails."""
    source = device_source(cfg)
    if source is None:
        return None
    finder = Finder(source)
    try:
        async with asyncio.timeout(START_TIMEOUT_S):
            await finder.start()
    except (OSError, TimeoutError, ConnectionError) as exc:
        # Without discovery, entries with a port still work; usb/imei entries say why they wait.
        log.error("discovery_unavailable", source=cfg.source, error=str(exc))
        await finder.stop()
        return None
    log.info("discovery_started", source=cfg.source, modems=len(finder.modems))
    return finder


def _port_view(finder: Finder, device: ModemDevice) -> list[Any]:
    out = []
    for p in device.ports:
        ident = finder.identities.get(p.path)
        out.append(
            {
                "path": p.path,
                "name": p.name,
                "role": p.role,
                "interface": p.interface,
                "driver": p.driver,
                "links": list(p.links),
                "held_by": sorted(port_holders(p.path)),
                "imei": ident.imei if ident else None,
                "probe_error": finder.probe_errors.get(p.path),
            }
        )
    return out


def _unmatched_why(device: ModemDevice, imei: str | None) -> str:
    ids = f"usb {device.vendor}:{device.product}" if device.bus == "usb" else device.describe()
    said = f" or IMEI {imei}" if imei else ""
    return f"no [[modems]] entry matches {ids}{said}: reported, not used"


def report(
    finder: Finder | None,
    modems: Sequence[ModemConfig],
    *,
    source: str,
    modemmanager: bool | None,
    in_use: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The `modem list --json` document (docs/discovery.md describes it).

    in_use maps entry ids to the port a running daemon has open for them; without it the entries
    are matched here from what discovery knows.
    """
    devices = finder.modems if finder is not None else []
    specs = [spec_for(m) for m in modems]
    matches: dict[str, Match] = match_all(specs, devices, finder.imeis() if finder else {})
    if in_use:
        for spec in specs:
            port = in_use.get(spec.id)
            if port is not None:
                dev = finder.device_for_port(port) if finder is not None else None
                matches[spec.id] = Match(spec, dev, port)
    entry_of = {m.device.key: sid for sid, m in matches.items() if m.device is not None}
    out_devices = []
    for d in devices:
        ports = _port_view(finder, d) if finder is not None else []
        imei = next((p["imei"] for p in ports if p["imei"]), None)
        entry = entry_of.get(d.key)
        at_port = matches[entry].port if entry is not None else None
        if at_port is None:
            at_port = next((p.path for p in d.at_candidates()), None)
        out_devices.append(
            {
                "key": d.key,
                "uid": d.uid,
                "bus": d.bus,
                "vendor": d.vendor,
                "product": d.product,
                "serial": d.serial,
                "manufacturer": d.manufacturer,
                "model": d.model,
                "imei": imei,
                "netdev": d.netdev,
                "net": list(d.net),
                "at_port": at_port,
                "ports": ports,
                "entry": entry,
                "why": None if entry is not None else _unmatched_why(d, imei),
            }
        )
    entries = [
        {
            "id": sid,
            "how": m.spec.how,
            "port": m.port,
            "device": m.device.key if m.device is not None else None,
            "netdev": m.device.netdev if m.device is not None else None,
            "why": m.why,
        }
        for sid, m in matches.items()
    ]
    return {
        "source": source,
        "modemmanager": modemmanager,
        "devices": out_devices,
        "entries": entries,
    }
