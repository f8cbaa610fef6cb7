"""Typed records shared by the CLI, the daemon and MQTT payloads; field names are a public contract."""

from __future__ import annotations

import msgspec


class Identity(msgspec.Struct, kw_only=True):
    """Who the modem says it is; imei is None when the modem reports an ESN/MEID instead."""

    manufacturer: str | None = None
    model: str | None = None
    revision: str | None = None
    imei: str | None = None


class SimStatus(msgspec.Struct, kw_only=True):
    """SIM state (`ready`, `absent`, `unknown`, or a lock such as `sim-pin`) and ICCID digits."""

    state: str = "unknown"
    iccid: str | None = None


class Signal(msgspec.Struct, kw_only=True):
    """Signal quality in physical units; None where the modem does not report a value."""

    rssi_dbm: int | None = None
    ber: int | None = None
    rsrp_dbm: float | None = None
    rsrq_db: float | None = None
    sinr_db: float | None = None


class Registration(msgspec.Struct, kw_only=True):
    """Network registration folded to home/roaming/searching/denied/not_registered/unknown."""

    state: str = "unknown"
    act: str = "unknown"
    lac: int | None = None
    tac: int | None = None
    cell_id: int | None = None


class Operator(msgspec.Struct, kw_only=True):
    """The operator the modem is registered on."""

    name: str | None = None
    mcc_mnc: str | None = None


class ModemInfo(msgspec.Struct, kw_only=True):
    """`esim-agent modem info --json`: keys identity, sim, signal, registration, operator and
    interface (the modem's network interface; not read over AT, so the driver leaves it None)."""

    identity: Identity = msgspec.field(default_factory=Identity)
    sim: SimStatus = msgspec.field(default_factory=SimStatus)
    signal: Signal = msgspec.field(default_factory=Signal)
    registration: Registration = msgspec.field(default_factory=Registration)
    operator: Operator = msgspec.field(default_factory=Operator)
    interface: str | None = None


class ScannedOperator(msgspec.Struct, kw_only=True):
    """One entry of AT+COPS=?; status is current, available, forbidden or unknown."""

    long: str | None = None
    short: str | None = None
    numeric: str | None = None
    status: str = "unknown"
    act: str = "unknown"


class ScanResult(msgspec.Struct, kw_only=True):
    """`esim-agent modem scan --json`."""

    operators: list[ScannedOperator] = msgspec.field(default_factory=list)
