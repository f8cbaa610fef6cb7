"""Scenario files (TOML) and the per-modem configuration they produce."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from agent.errors import ConfigError
from hw_fixtures.card_api import ProfileSpec
from hw_fixtures.personalities import USBNET_MODES

REG_STATES = ("home", "roaming", "searching", "denied", "not_registered")
SIM_STATES = ("ready", "pin", "puk", "absent")


@dataclass
class Delays:
    """Seconds the emulated modem takes for slow operations."""

    reattach: float = 2.0
    cops_scan: float = 3.0
    reset: float = 1.0
    response: float = 0.0
    degraded: float = 1.5


@dataclass
class SignalState:
    """Radio measurements in physical units; None means the modem reports 'unknown'."""

    rssi_dbm: int | None = -71
    ber: int | None = None
    rsrp_dbm: int | None = -95
    rsrq_db: int | None = -10
    sinr_db: int | None = 13


@dataclass
class OperatorState:
    """The network the modem registers on."""

    name: str = "Emulated"
    short: str = "EMU"
    mcc_mnc: str = "00101"


@dataclass
class ScanEntry:
    """One operator as AT+COPS=? lists it; status is available|current|forbidden|unknown."""

    name: str
    short: str
    mcc_mnc: str
    status: str = "available"
    act: str = "lte"


@dataclass
class NetworkState:
    """What the network would grant: registration state and the serving cell."""

    state: str = "home"
    act: str = "lte"
    lac: int = 0x1A2B
    tac: int = 0x1A2B
    cell_id: int = 0x01A2B3C4


@dataclass
class ModemConfig:
    """Everything one emulated modem starts from."""

    id: str = "m0"
    vendor: str = "generic"
    imei: str = ""
    manufacturer: str | None = None
    model: str | None = None
    revision: str | None = None
    iccid_form: str | None = None
    refresh: str | None = None
    eid: str = "89049032123451234512345678901235"
    profiles: list[ProfileSpec] = field(default_factory=list)
    signal: SignalState = field(default_factory=SignalState)
    operator: OperatorState | None = None
    operators: list[ScanEntry] = field(default_factory=list)
    network: NetworkState = field(default_factory=NetworkState)
    delays: Delays = field(default_factory=Delays)
    sim_state: str = "ready"
    sim_pin: str = "1234"
    pdp_auto: bool = True
    apn: str = "internet"
    # USB network function (ecm, rndis, ncm, qmi, mbim); None: the personality's default
    usbnet: str | None = None
    replies: dict[str, str] = field(default_factory=dict)
    # Directory written by hw_fixtures.pki: the eUICC can then download profiles (ES10b).
    download_pki: str | None = None
    # How the modem looks to udev (hw_fixtures/udev_feed.py); None: the personality's USB ids.
    usb_vendor: str | None = None
    usb_product: str | None = None
    usb_serial: str | None = None
    usb_interface: str | None = None
    netdev: str | None = None
    # AT+CFUN=1,1 makes the modem leave the bus and come back on a new port (USB modems do)
    reenumerate_on_reset: bool = False


def luhn_complete(digits14: str) -> str:
    """Append the Luhn check digit that a 15-digit IMEI carries."""
    total = 0
    for i, ch in enumerate(reversed(digits14)):
        d = int(ch)
        if i % 2 == 0:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return digits14 + str((10 - total % 10) % 10)


def default_profiles(index: int) -> list[ProfileSpec]:
    """One enabled profile so a bare emulator can register."""
    return [
        ProfileSpec(
            iccid=f"894400000000000{index:04d}1",
            name="Emulated",
            provider="Emulated",
            enabled=True,
            operator_name="Emulated",
            mcc_mnc="00101",
        )
    ]


def default_modem(index: int, vendor: str = "generic") -> ModemConfig:
    """A modem with defaults suitable for the n-th slot."""
    return ModemConfig(
        id=f"m{index}",
        vendor=vendor,
        imei=luhn_complete(f"86769804{index:06d}"),
        eid=f"8904903212345123451234567890{index:04d}",
        profiles=default_profiles(index),
    )


def _build(cls: type[Any], data: dict[str, Any], file: str, key: str) -> Any:
    names = {f.name for f in fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(file, key, f"unknown keys {sorted(unknown)}")
    try:
        return cls(**data)
    except TypeError as exc:
        raise ConfigError(file, key, str(exc)) from exc


def modem_from_table(table: dict[str, Any], index: int, file: str = "<scenario>") -> ModemConfig:
    """Build one ModemConfig from a [[modem]] table, validating names and states."""
    key = f"modem[{index}]"
    cfg = default_modem(index, str(table.get("vendor", "generic")))
    simple = {
        "id",
        "vendor",
        "imei",
        "manufacturer",
        "model",
        "revision",
        "iccid_form",
        "refresh",
        "eid",
        "pdp_auto",
        "apn",
        "usbnet",
        "usb_vendor",
        "usb_product",
        "usb_serial",
        "usb_interface",
        "netdev",
        "reenumerate_on_reset",
    }
    nested = {
        "signal",
        "operator",
        "operators",
        "registration",
        "delays",
        "sim",
        "profiles",
        "replies",
    }
    unknown = set(table) - simple - nested
    if unknown:
        raise ConfigError(file, key, f"unknown keys {sorted(unknown)}")
    for name in simple & set(table):
        setattr(cfg, name, table[name])
    if "signal" in table:
        cfg.signal = _build(SignalState, table["signal"], file, f"{key}.signal")
    if "operator" in table:
        cfg.operator = _build(OperatorState, table["operator"], file, f"{key}.operator")
    if "operators" in table:
        cfg.operators = [
            _build(ScanEntry, op, file, f"{key}.operators") for op in table["operators"]
        ]
    if "registration" in table:
        cfg.network = _build(NetworkState, table["registration"], file, f"{key}.registration")
        if cfg.network.state not in REG_STATES:
            raise ConfigError(file, f"{key}.registration.state", f"one of {REG_STATES}")
    if "delays" in table:
        cfg.delays = _build(Delays, table["delays"], file, f"{key}.delays")
    if "sim" in table:
        sim = dict(table["sim"])
        cfg.sim_state = str(sim.pop("state", "ready"))
        cfg.sim_pin = str(sim.pop("pin", cfg.sim_pin))
        if sim or cfg.sim_state not in SIM_STATES:
            raise ConfigError(file, f"{key}.sim", f"state one of {SIM_STATES}, pin")
    if "profiles" in table:
        cfg.profiles = [_build(ProfileSpec, p, file, f"{key}.profiles") for p in table["profiles"]]
    if "replies" in table:
        cfg.replies = {str(k): str(v) for k, v in table["replies"].items()}
    if cfg.usbnet is not None and cfg.usbnet not in USBNET_MODES:
        raise ConfigError(file, f"{key}.usbnet", f"one of {USBNET_MODES}")
    if sum(p.enabled for p in cfg.profiles) > 1:
        raise ConfigError(file, f"{key}.profiles", "at most one profile may be enabled")
    return cfg


def load_scenario(path: str | Path) -> list[ModemConfig]:
    """Parse a scenario file into modem configurations; ConfigError names what is wrong."""
    file = str(path)
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(file, None, str(exc)) from exc
    tables = data.get("modem", [])
    if not isinstance(tables, list) or not tables:
        raise ConfigError(file, "modem", "need at least one [[modem]] table")
    modems = [modem_from_table(t, i, file) for i, t in enumerate(tables)]
    ids = [m.id for m in modems]
    if len(set(ids)) != len(ids):
        raise ConfigError(file, "modem.id", "ids must be unique")
    return modems
