"""Modems from udev devices: group a device's ports, give each port a role, match config entries.

Pure functions on `UdevDevice` records (agent.transport.udev) — grouping, roles, matching — plus
the two edges that touch the outside world: who holds a port open (/proc) and a short AT probe.
The live registry that follows hotplug and probes ports is `agent.modem.finder.Finder`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import structlog

from agent.errors import PortGoneError
from agent.transport.udev import UdevDevice

log = structlog.get_logger(__name__)

Role = Literal["at_primary", "at", "ppp", "gps", "diag", "mbim", "qmi", "other", "unknown"]
Bus = Literal["usb", "pci", "other"]

#: Roles an AT engine may use, best first; `unknown` ports are probed before use.
AT_ROLES: tuple[Role, ...] = ("at_primary", "at", "unknown", "ppp")
#: Roles never probed: the port speaks something else and an `AT` would confuse it.
NEVER_PROBE: frozenset[Role] = frozenset({"gps", "diag", "mbim", "qmi", "other"})

_USB_IFACE = re.compile(r"^\d+-[\d.]+:\d+\.(\d+)$")
_USB_DEVICE = re.compile(r"^\d+-[\d.]+$")
_PCI_FUNC = re.compile(r"^[0-9a-fA-F]{4}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]$")
_WWAN_PORT = re.compile(r"^wwan\d+([a-z]+)\d+$")

#: udev properties ModemManager's rules set (and ours may), in order of precedence.
_MM_PORT_TYPES: tuple[tuple[str, Role], ...] = (
    ("ID_MM_PORT_TYPE_AT_PRIMARY", "at_primary"),
    ("ID_MM_PORT_TYPE_AT_SECONDARY", "at"),
    ("ID_MM_PORT_TYPE_AT_PPP", "ppp"),
    ("ID_MM_PORT_TYPE_GPS", "gps"),
    ("ID_MM_PORT_TYPE_QCDM", "diag"),
    ("ID_MM_PORT_TYPE_AUDIO", "other"),
)

#: The kernel WWAN port types (sysfs `type`, and the letters in the port name) and their roles.
_WWAN_TYPES: dict[str, Role] = {
    "at": "at",
    "mbim": "mbim",
    "qmi": "qmi",
    "qcdm": "diag",
    "nmea": "gps",
    "firehose": "other",
    "xmmrpc": "other",
    "fastboot": "other",
    "adb": "other",
    "mipc": "other",
}

#: USB interface layouts of modems we know, from vendor guides and the kernel's option/qcserial
#: tables (sources in tests/fixtures/udev/). Keys are (vendor, product); values map
#: bInterfaceNumber to the port's role. Ports not listed here are `unknown` and get probed.
USB_LAYOUTS: dict[tuple[str, str], dict[str, Role]] = {
    # Quectel EC25/EG25 and EM12/EG12: DM, NMEA, AT, PPP/AT; interface 4 is the QMI network.
    ("2c7c", "0125"): {"00": "diag", "01": "gps", "02": "at_primary", "03": "ppp"},
    ("2c7c", "0512"): {"00": "diag", "01": "gps", "02": "at_primary", "03": "ppp"},
    ("2c7c", "0306"): {"00": "diag", "01": "gps", "02": "at_primary", "03": "ppp"},
    # Sierra Wireless MC/EM74xx (qcserial "SWI" layout): DM 0, NMEA 2, AT 3.
    ("1199", "9071"): {"00": "diag", "02": "gps", "03": "at_primary"},
    ("1199", "9079"): {"00": "diag", "02": "gps", "03": "at_primary"},
    ("413c", "81b6"): {"00": "diag", "02": "gps", "03": "at_primary"},
    # Telit LN920 in its MBIM composition (1bc7:1061): MBIM 0/1, diag 2, AT 4 and 5, NMEA 6.
    ("1bc7", "1061"): {"02": "diag", "04": "at_primary", "05": "at", "06": "gps"},
}


@dataclass(frozen=True)
class Port:
    """One port of a modem."""

    path: str
    name: str
    subsystem: str
    role: Role
    interface: str | None = None
    driver: str | None = None
    links: tuple[str, ...] = ()
    devpath: str = ""


@dataclass
class ModemDevice:
    """A physical modem: its identity on the bus, its ports, its network interfaces."""

    key: str
    bus: Bus
    vendor: str | None = None
    product: str | None = None
    serial: str | None = None
    manufacturer: str | None = None
    model: str | None = None
    ports: list[Port] = field(default_factory=list)
    net: list[str] = field(default_factory=list)

    @property
    def uid(self) -> str:
        """The sysfs path ModemManager uses as the modem's `Device` (its uid for inhibition)."""
        return "/sys" + self.key

    @property
    def netdev(self) -> str | None:
        """The modem's network interface (wwan0, usb0, enx...), the first one udev listed."""
        return self.net[0] if self.net else None

    def at_candidates(self) -> list[Port]:
        """Ports that may speak AT, best first; never a GPS, diagnostics or MBIM/QMI port."""
        rank = {r: i for i, r in enumerate(AT_ROLES)}
        return sorted(
            (p for p in self.ports if p.role in rank),
            key=lambda p: (rank[p.role], p.interface or "", p.path),
        )

    def port(self, path: str) -> Port | None:
        """The port at this path (the node or one of its udev symlinks)."""
        real = os.path.realpath(path)
        for p in self.ports:
            if p.path in (path, real) or path in p.links:
                return p
        return None

    def describe(self) -> str:
        """vendor:product (model) for messages."""
        ids = f"{self.vendor or '?'}:{self.product or '?'}"
        return f"{ids} ({self.model})" if self.model else ids


# ---- grouping ---------------------------------------------------------------------------------


def device_key(devpath: str) -> tuple[str, Bus] | None:
    """The sysfs path of the physical modem a device belongs to, and its bus; None if not a modem's."""
    parts = devpath.rstrip("/").split("/")
    for i in range(len(parts) - 1, 0, -1):
        if _USB_IFACE.match(parts[i]) and _USB_DEVICE.match(parts[i - 1]):
            return "/".join(parts[:i]), "usb"
    if _USB_DEVICE.match(parts[-1]):
        return devpath.rstrip("/"), "usb"
    if "wwan" in parts:
        i = parts.index("wwan")
        bus: Bus = "pci" if i > 0 and _PCI_FUNC.match(parts[i - 1]) else "other"
        return "/".join(parts[:i]), bus
    return None


def _usb_interface(devpath: str, props: Mapping[str, str]) -> str | None:
    num = props.get("ID_USB_INTERFACE_NUM")
    if num:
        return num.lower().zfill(2)
    for part in reversed(devpath.split("/")):
        m = _USB_IFACE.match(part)
        if m:
            # the kernel names interfaces in decimal; udev and sysfs give bInterfaceNumber in hex
            return f"{int(m.group(1)):02x}"
    return None


def port_role(dev: UdevDevice, vendor: str | None, product: str | None) -> Role:
    """What a port is, from udev properties, the WWAN port type, or a known USB layout."""
    props = dev.properties
    if dev.subsystem == "wwan":
        kind = dev.attributes.get("type", "").lower()
        if not kind:
            m = _WWAN_PORT.match(dev.name)
            kind = m.group(1) if m else ""
        return _WWAN_TYPES.get(kind, "other")
    for prop, role in _MM_PORT_TYPES:
        if props.get(prop) == "1":
            return role
    iface = _usb_interface(dev.devpath, props)
    layout = USB_LAYOUTS.get(((vendor or "").lower(), (product or "").lower()), {})
    if iface is not None and iface in layout:
        return layout[iface]
    return "unknown"


def group(devices: Iterable[UdevDevice]) -> list[ModemDevice]:
    """Group devices into modems: USB devices by their usb_device, PCIe modems by the PCI function.

    Only groups with at least one port or network interface are returned: a USB hub or a mouse
    has no tty and no wwan port.
    """
    devices = list(devices)
    modems: dict[str, ModemDevice] = {}

    def modem_for(dev: UdevDevice) -> ModemDevice | None:
        found = device_key(dev.devpath)
        if found is None:
            # a network interface hung directly below the PCI function of a WWAN modem
            for key, modem in modems.items():
                if dev.devpath.startswith(key + "/"):
                    return modem
            return None
        key, bus = found
        if key not in modems:
            modems[key] = ModemDevice(key=key, bus=bus)
        return modems[key]

    # identities first (usb_device, pci attributes), then ports, so roles see vendor/product
    for dev in devices:
        m = modem_for(dev)
        if m is None:
            continue
        p = dev.properties
        if (dev.subsystem == "usb" and dev.devtype == "usb_device") or m.vendor is None:
            m.vendor = (p.get("ID_VENDOR_ID") or m.vendor or "").lower() or None
            m.product = (p.get("ID_MODEL_ID") or m.product or "").lower() or None
            m.serial = p.get("ID_SERIAL_SHORT") or m.serial
            m.manufacturer = (
                p.get("ID_VENDOR_FROM_DATABASE") or p.get("ID_VENDOR") or m.manufacturer
            )
            m.model = p.get("ID_MODEL_FROM_DATABASE") or p.get("ID_MODEL") or m.model
        pci = dev.attributes.get("pci_id")
        if pci and ":" in pci:
            v, _, d = pci.lower().partition(":")
            m.vendor, m.product = m.vendor or v, m.product or d
            m.manufacturer = m.manufacturer or dev.attributes.get("pci_vendor")
            m.model = m.model or dev.attributes.get("pci_model")
    for dev in devices:
        m = modem_for(dev)
        if m is None:
            continue
        if dev.subsystem == "net":
            m.net.append(dev.properties.get("INTERFACE") or dev.name)
            continue
        is_port = dev.subsystem == "tty" or (
            dev.subsystem == "wwan" and dev.devtype != "wwan" and _WWAN_PORT.match(dev.name)
        )
        if not is_port or dev.devnode is None:
            continue
        m.ports.append(
            Port(
                path=dev.devnode,
                name=dev.name,
                subsystem=dev.subsystem,
                role=port_role(dev, m.vendor, m.product),
                interface=_usb_interface(dev.devpath, dev.properties) if m.bus == "usb" else None,
                driver=dev.properties.get("ID_USB_DRIVER") or None,
                links=dev.links,
                devpath=dev.devpath,
            )
        )
    out = [m for m in modems.values() if m.ports or m.net]
    for m in out:
        m.ports.sort(key=lambda p: (p.interface or "", p.path))
        m.net.sort(key=_net_rank)
    return sorted(out, key=lambda m: m.key)


def _net_rank(name: str) -> tuple[int, str]:
    # wwan* is what qmi_wwan, cdc_mbim and the WWAN core name their links; usb*/enx* are
    # ECM/RNDIS/NCM compositions; anything else after them.
    for i, prefix in enumerate(("wwan", "usb", "enx", "eth")):
        if name.startswith(prefix):
            return i, name
    return 9, name


def network_interface(devices: Sequence[ModemDevice], port: str) -> str | None:
    """The network interface of the modem that has this port, if any."""
    for m in devices:
        if m.port(port) is not None:
            return m.netdev
    return None


# ---- matching config entries ------------------------------------------------------------------


@dataclass(frozen=True)
class MatchSpec:
    """How one config entry finds its modem (the part of ModemConfig matching needs)."""

    id: str
    port: str | None = None
    vendor: str | None = None
    product: str | None = None
    serial: str | None = None
    interface: str | None = None
    imei: str | None = None

    @property
    def how(self) -> str:
        """port, usb or imei."""
        return "port" if self.port else "usb" if self.vendor else "imei"


@dataclass(frozen=True)
class Match:
    """The outcome of matching one entry: the modem and AT port, or why none."""

    spec: MatchSpec
    device: ModemDevice | None
    port: str | None
    why: str | None = None


def _norm_iface(value: str) -> str:
    return f"{int(value, 16):02x}"  # bInterfaceNumber is hex in sysfs and in udev


def match_entry(spec: MatchSpec, devices: Sequence[ModemDevice], imeis: Mapping[str, str]) -> Match:
    """Match one entry against the modems present; imeis maps AT port paths to what they said."""
    if spec.port is not None:
        for m in devices:
            p = m.port(spec.port)
            if p is not None:
                return Match(spec, m, spec.port)
        # A path udev does not know (a pty, a custom symlink) is still the user's word.
        if os.path.exists(spec.port):
            return Match(spec, None, spec.port)
        return Match(spec, None, None, f"{spec.port} does not exist")
    if spec.vendor is not None:
        same = [
            m
            for m in devices
            if m.vendor == spec.vendor.lower()
            and m.product == (spec.product or "").lower()
            and (spec.serial is None or m.serial == spec.serial)
        ]
        ids = f"usb {spec.vendor}:{spec.product}" + (
            f" serial {spec.serial}" if spec.serial else ""
        )
        if not same:
            return Match(spec, None, None, f"no device {ids}")
        m = same[0]
        if spec.interface is not None:
            want = _norm_iface(spec.interface)
            for p in m.ports:
                if p.interface == want:
                    return Match(spec, m, p.path)
            return Match(spec, m, None, f"{ids} has no tty on interface {want}")
        candidates = m.at_candidates()
        known = [p for p in candidates if p.role in ("at_primary", "at")]
        if known:
            return Match(spec, m, known[0].path)
        answered = [p for p in candidates if imeis.get(p.path)]
        if answered:
            return Match(spec, m, answered[0].path)
        return Match(spec, m, None, f"{ids}: no port known or probed as AT")
    want_imei = spec.imei or ""
    for m in devices:
        for p in m.at_candidates():
            if imeis.get(p.path) == want_imei:
                return Match(spec, m, p.path)
    return Match(spec, None, None, f"no AT port answered with IMEI {want_imei}")


def usb_at_port(
    devices: Sequence[UdevDevice],
    vendor: str,
    product: str,
    serial: str | None = None,
    interface: str | None = None,
) -> str:
    """The AT port of a USB modem without probing (by interface or role); PortGoneError(why)."""
    spec = MatchSpec("usb", vendor=vendor, product=product, serial=serial, interface=interface)
    match = match_entry(spec, group(devices), {})
    if match.port is None:
        raise PortGoneError(f"usb {vendor}:{product}", match.why or "no such device")
    return match.port


def match_all(
    specs: Sequence[MatchSpec], devices: Sequence[ModemDevice], imeis: Mapping[str, str]
) -> dict[str, Match]:
    """Match every entry; a modem already taken by an earlier entry is not given to another."""
    out: dict[str, Match] = {}
    taken: set[str] = set()
    for spec in specs:
        free = [m for m in devices if m.key not in taken]
        match = match_entry(spec, free, imeis)
        if match.device is None and match.port is None:
            # say "taken" rather than "absent" when the only fitting modem went to another entry
            other = match_entry(spec, devices, imeis)
            if other.device is not None:
                owner = next(
                    (s for s, mm in out.items() if mm.device is other.device), "another entry"
                )
                match = Match(spec, None, None, f"{other.device.describe()} is already {owner}'s")
        if match.device is not None:
            taken.add(match.device.key)
        out[spec.id] = match
    return out
