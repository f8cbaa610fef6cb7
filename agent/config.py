"""Agent configuration: TOML read with tomllib, typed with msgspec, then cross-checked as a whole."""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import msgspec

from agent.errors import ConfigError
from agent.euicc.es9 import Resolve
from agent.iccid import ICCID_RULE, is_iccid, parse_iccid

#: The one default control socket, for the daemon and the CLI alike: systemd's
#: RuntimeDirectory=esim-agent. Shipped examples and docs name this path (a test checks).
DEFAULT_CONTROL_SOCKET = "/run/esim-agent/control.sock"
EX_CONFIG = 78  # sysexits.h: the CLI exits with this status on ConfigError

DEFAULT_ISDR_AID = "A0000005591010FFFFFFFF8900000100"
COMMAND_NAMES: tuple[str, ...] = (
    "status",
    "switch_layer",
    "profile_enable",
    "profile_disable",
    "profile_nickname",
    "drill",
    "profile_download",
    "profile_transfer",
    "profile_transfer_in",
)

VendorHint = Literal[
    "auto", "generic", "quectel", "sierra", "fibocom", "simcom", "huawei", "dell", "cinterion"
]
RefreshMode = Literal["auto", "none", "refresh", "cfun", "reset"]
ApduMode = Literal["auto", "ccho", "csim"]
Role = Literal["primary", "failover", "emergency"]
ProbeKind = Literal["tcp", "http", "dns", "icmp"]
LogLevel = Literal["debug", "info", "warning", "error"]
PdpType = Literal["ip", "ipv6", "ipv4v6"]
CommandName = Literal[
    "status",
    "switch_layer",
    "profile_enable",
    "profile_disable",
    "profile_nickname",
    "drill",
    "profile_download",
    "profile_transfer",
    "profile_transfer_in",
]

# Linux interface names: at most 15 bytes (IFNAMSIZ - 1), no '/', ':' or whitespace.
_IFNAME_RE = re.compile(r"^[A-Za-z0-9_.@-][A-Za-z0-9_.@+-]{0,14}$")
# APNs are dot-separated labels (23.003 §9.1) of at most 100 characters in all.
_APN_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9.-]{0,98}[A-Za-z0-9])?$")
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_AID_RE = re.compile(r"^[0-9A-Fa-f]{10,32}$")
_SIZE_RE = re.compile(r"^\s*([0-9]{1,20}(?:\.[0-9]{1,20})?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
MAX_SIZE = 2**63 - 1  # sizes are stored in SQLite INTEGER columns (64-bit signed)
_SIZE_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


class _Section(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Base for every section: unknown keys are errors, so a typo never passes silently."""


class UsbMatch(_Section):
    """Find a modem by USB vendor/product id (hex), optionally its serial number and interface."""

    vendor: str
    product: str
    serial: str | None = None
    #: bInterfaceNumber of the AT port ("02"); without it the port is chosen by its role.
    interface: str | None = None


class ModemConfig(_Section):
    """One `[[modems]]` entry: how to find the modem and how to talk to its eUICC."""

    id: str
    port: str | None = None
    usb: UsbMatch | None = None
    imei: str | None = None
    vendor: VendorHint = "auto"
    isdr_aid: str = DEFAULT_ISDR_AID
    refresh: RefreshMode = "auto"
    apdu: ApduMode = "auto"
    poll_interval: float = 30.0
    #: The modem's network interface: "auto" (found from udev), "none" (probes use the host's
    #: default route, as with the loopback emulator), or a name such as "wwan0".
    interface: str = "auto"
    #: ModemManager keeps the modem; the agent inhibits it over D-Bus around eUICC work.
    share_with_modemmanager: bool = False


class ProbeConfig(_Section):
    """A data-path probe; target syntax depends on kind (see docs/configuration.md)."""

    kind: ProbeKind
    target: str
    #: The idle round interval; [health] probe_budget may stretch it (docs/health.md).
    interval: float = 5.0
    timeout: float = 1.0
    window: int = 5


class LayerConfig(_Section):
    """One `[[layers]]` entry; the order of entries in the file is the priority order."""

    name: str
    #: This device's own modem and profile; "" when the layer is a sibling (`device`).
    modem: str = ""
    profile: str = ""
    #: A sibling's device_id: this device is online through that sibling (hotspot, tether,
    #: companion link). Give either `device` or `modem` and `profile`, never both.
    device: str | None = None
    #: With `device`: the local interface that reaches the sibling, for this device's own probe.
    interface: str | None = None
    role: Role = "failover"
    #: "group" marks an emergency layer as the group's (docs/siblings.md): it wakes only when
    #: every sibling is down or offline and this device wins the claim.
    scope: Literal["device", "group"] = "device"
    radio_down_when_inactive: bool = False
    probes: list[ProbeConfig] = msgspec.field(default_factory=list)
    #: The data context's APN; "auto" keeps the modem's current default context (cid 1).
    apn: str = "auto"
    apn_user: str | None = None
    apn_password: str | None = None
    apn_password_file: str | None = None
    pdp_type: PdpType = "ip"
    #: A metered layer gets no default route in the main table until it is the active one.
    metered: bool = False
    #: Store and forward: the activation code of `profile` while it is not installed yet; the
    #: daemon downloads it on the first working link (docs/configuration.md). The matching ID
    #: in it is a bearer token: prefer activation_code_file (mode 0600).
    activation_code: str | None = None
    activation_code_file: str | None = None
    confirmation_code: str | None = None
    confirmation_code_file: str | None = None

    @property
    def is_sibling(self) -> bool:
        """Whether the layer is another device of the group rather than a profile of ours."""
        return self.device is not None


class GroupConfig(_Section):
    """`[group]`: the devices that act as one system over MQTT (docs/siblings.md)."""

    name: str
    #: Every device_id of the group, this one included; messages from others are ignored.
    devices: list[str] = msgspec.field(default_factory=list)
    #: The devices that hold the group emergency layer (`scope = "group"`), this one included
    #: when it holds it: the claim protocol takes turns among them only.
    emergency_devices: list[str] = msgspec.field(default_factory=list)
    #: Wake order among the devices holding the group emergency layer: lower first, then id.
    priority: dict[str, int] = msgspec.field(default_factory=dict)
    #: How long a claim stays valid after its last refresh (it is refreshed every ttl/3).
    claim_ttl: float = 60.0

    def wake_order(self, holders: Sequence[str]) -> list[str]:
        """The holders in the order they may claim: config priority, then device id."""
        return sorted(holders, key=lambda d: (self.priority.get(d, 0), d))


class HealthConfig(_Section):
    """How the health monitor turns probe rounds and signal readings into up/degraded/down."""

    rssi_dbm_min: int | None = -105
    rsrp_dbm_min: float | None = -120.0
    down_after: int = 3
    up_after: int = 3
    degraded_ratio: float = 0.5
    #: After a failed round (or other bad evidence) confirm this soon instead of `interval`.
    failure_interval: float = 0.5
    #: Skip a round when the interface received traffic since the last one.
    traffic_aware: bool = True
    #: Bytes per layer per day probing may cost at most (0 = no limit); stretches the interval.
    probe_budget: int = 1_000_000


class PolicyConfig(_Section):
    """How many consecutive health reports make the policy count a layer down or up.

    The daemon reports a layer's health when it changes, after the monitor has already
    counted probe rounds ([health] down_after/up_after); so 1 is the right default here.
    """

    down_after: int = 1
    up_after: int = 1


class TimersConfig(_Section):
    """Anti-flap and switch timers, all in seconds."""

    hold_down: float = 30.0
    hold_down_max: float = 600.0
    hold_down_multiplier: float = 2.0
    hold_down_decay: float = 900.0
    failback_stable: float = 120.0
    switch_timeout: float = 180.0
    rollback_timeout: float = 120.0
    #: How long a companion's sibling may report no connectivity before our own profile wakes.
    companion_grace: float = 10.0


class TlsConfig(_Section):
    """TLS towards the broker; insecure skips certificate verification (testing only)."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    insecure: bool = False


class CommandsConfig(_Section):
    """Remote commands over MQTT: off by default, allow-listed, and always authenticated."""

    enabled: bool = False
    allowed: list[CommandName] = msgspec.field(default_factory=lambda: ["status"])
    token: str | None = None
    token_file: str | None = None
    allowed_senders: list[str] = msgspec.field(default_factory=list)


class MqttConfig(_Section):
    """The MQTT session that publishes status and, when allowed, takes commands."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 1883
    tls: TlsConfig | None = None
    username: str | None = None
    password: str | None = None
    password_file: str | None = None
    client_id: str | None = None
    base_topic: str = "esim-agent"
    keepalive: int = 30
    discovery: bool = False
    discovery_prefix: str = "homeassistant"
    redact: bool = False
    commands: CommandsConfig = msgspec.field(default_factory=CommandsConfig)


class HooksConfig(_Section):
    """Executables run (without a shell) on every transition, event JSON on stdin."""

    on_transition: list[str] = msgspec.field(default_factory=list)
    timeout: float = 10.0


class PoolConfig(_Section):
    """A data quota shared by several profiles, possibly across several devices."""

    name: str
    members: list[str]
    quota_bytes: int | str
    #: The other devices sharing the pool (this one may be listed too).
    devices: list[str] = msgspec.field(default_factory=list)
    #: Per-device limits inside the pool (device_id -> bytes or "5 GB"); each device alerts on
    #: its own limit only.
    device_limits: dict[str, int | str] = msgspec.field(default_factory=dict)
    #: What this device does when it reaches its own limit: "none", "disable_profile" (the
    #: pool's profile it runs) or "switch_layer:<layer>" (pin that layer).
    on_limit: str = "none"
    #: The device that publishes the pool's own alerts; None: every device publishes them.
    manager: str | None = None
    #: Who takes the manager's duty, in order, when it is offline for manager_takeover seconds;
    #: empty: the pool's other devices by device_id. Give the same order on every device.
    successors: list[str] = msgspec.field(default_factory=list)
    manager_takeover: float = 300.0

    def pool_devices(self, me: str) -> list[str]:
        """Every device sharing the pool, this one (`me`) included."""
        return [me, *(d for d in self.devices if d != me)]

    def duty_order(self, me: str) -> list[str]:
        """Who holds the duty of publishing the pool's alerts, first come first: the manager,
        then its successors; empty without a manager."""
        if self.manager is None:
            return []
        rest = self.successors or sorted(d for d in self.pool_devices(me) if d != self.manager)
        return [self.manager, *(d for d in rest if d != self.manager)]


#: The actions a device may take when it reaches its limit inside a pool.
LIMIT_ACTIONS = ("none", "disable_profile", "switch_layer:<layer>")


def parse_on_limit(value: str) -> tuple[Literal["none", "disable_profile", "switch_layer"], str]:
    """("none" | "disable_profile" | "switch_layer", layer or ""); ValueError otherwise."""
    if value == "none":
        return "none", ""
    if value == "disable_profile":
        return "disable_profile", ""
    kind, sep, layer = value.partition(":")
    if kind == "switch_layer" and sep and layer:
        return "switch_layer", layer
    raise ValueError(f"must be one of {', '.join(LIMIT_ACTIONS)}")


class UsageConfig(_Section):
    """Per-profile quotas (ICCID → bytes or "10 GB"), alert thresholds in percent, pools."""

    quotas: dict[str, int | str] = msgspec.field(default_factory=dict)
    alert_thresholds: list[int] = msgspec.field(default_factory=lambda: [50, 75, 90])
    period_start_day: int = 1
    pools: list[PoolConfig] = msgspec.field(default_factory=list)


class RspConfig(_Section):
    """`[rsp]`: talking to SM-DP+ servers (ES9+) for downloads and notifications.

    TLS to an SM-DP+ is always verified against `ci_certs` (PEM files of the GSMA CI roots, or
    a test CI); no GSMA root is bundled. Relative paths are read from the config's directory.
    """

    ci_certs: list[str] = msgspec.field(default_factory=list)
    #: "HOST:PORT:ADDR" overrides for test networks (TLS still checks HOST).
    resolve: list[str] = msgspec.field(default_factory=list)
    #: The daemon sends pending eUICC notifications to their SM-DP+ on its own; None (unset)
    #: means on exactly when `ci_certs` are configured (without them no SM-DP+ can be trusted).
    notifications: bool | None = None
    #: Backoff of one SM-DP+ that failed: the first wait, doubled per failure up to the cap.
    notification_retry_initial: float = 30.0
    notification_retry_max: float = 3600.0

    @property
    def notifications_on(self) -> bool:
        """Whether the daemon's notification courier runs."""
        return bool(self.ci_certs) if self.notifications is None else self.notifications


class ControlConfig(_Section):
    """The local control socket; None means DEFAULT_CONTROL_SOCKET."""

    socket: str | None = None


class DiscoveryConfig(_Section):
    """Where the agent learns which devices exist: udev, or the emulator's fake udev feed."""

    source: Literal["udev", "emulator", "none"] = "udev"
    #: The emulator's control socket, for source = "emulator".
    emulator_control: str | None = None
    #: D-Bus address to find ModemManager on; None: the system bus.
    dbus_address: str | None = None


class Config(_Section):
    """The whole agent configuration."""

    device_id: str
    state_dir: str = "/var/lib/esim-agent"
    log_level: LogLevel = "info"
    modems: list[ModemConfig] = msgspec.field(default_factory=list)
    layers: list[LayerConfig] = msgspec.field(default_factory=list)
    health: HealthConfig = msgspec.field(default_factory=HealthConfig)
    policy: PolicyConfig = msgspec.field(default_factory=PolicyConfig)
    timers: TimersConfig = msgspec.field(default_factory=TimersConfig)
    mqtt: MqttConfig = msgspec.field(default_factory=MqttConfig)
    hooks: HooksConfig = msgspec.field(default_factory=HooksConfig)
    usage: UsageConfig = msgspec.field(default_factory=UsageConfig)
    control: ControlConfig = msgspec.field(default_factory=ControlConfig)
    discovery: DiscoveryConfig = msgspec.field(default_factory=DiscoveryConfig)
    group: GroupConfig | None = None
    rsp: RspConfig = msgspec.field(default_factory=RspConfig)

    @property
    def control_socket(self) -> str:
        """Path of the local control socket (DEFAULT_CONTROL_SOCKET unless configured)."""
        return self.control.socket or DEFAULT_CONTROL_SOCKET

    @property
    def mqtt_client_id(self) -> str:
        """The MQTT client id, defaulting to `esim-agent-<device_id>`."""
        return self.mqtt.client_id or f"esim-agent-{self.device_id}"

    def modem(self, modem_id: str) -> ModemConfig:
        """The modem with this id; KeyError when there is none."""
        for m in self.modems:
            if m.id == modem_id:
                return m
        raise KeyError(modem_id)

    def layer(self, name: str) -> LayerConfig:
        """The layer with this name; KeyError when there is none."""
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)


class _Invalid(Exception):
    """One cross-field problem: the dotted key and the reason."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason


# --- pure helpers ---------------------------------------------------------------------------


def parse_size(value: int | str) -> int:
    """Bytes from an int or a string such as "10 GB", "512MiB", "1.5GB"; ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError("a size must be a number of bytes or a string like '10 GB'")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        if value > MAX_SIZE:
            raise ValueError("a size must fit in 64 bits")
        return value
    m = _SIZE_RE.match(value) if isinstance(value, str) and len(value) <= 64 else None
    if not m:
        raise ValueError(f"cannot read {str(value)[:64]!r} as a size (try 10000000 or '10 GB')")
    unit = (m.group(2) or "B").lower()
    size = float(m.group(1)) * _SIZE_UNITS[unit]
    if not size <= MAX_SIZE:
        raise ValueError("a size must fit in 64 bits")
    return int(size)


def normalize_iccid(value: str) -> str:
    """ICCID digits as printed: spaces and dashes removed, a trailing F pad dropped; a value
    that breaks the ICCID rule is kept as written so that validation names it."""
    try:
        return parse_iccid(value)
    except ValueError:
        return value


def _is_iccid(value: str) -> bool:
    """A normalized ICCID: digits only, by the one rule."""
    return value.isdigit() and is_iccid(value)


def key_from_validation_path(message: str) -> tuple[str | None, str]:
    """Split a msgspec ValidationError message into (dotted key, reason).

    "Expected `str`, got `int` - at `$.layers[1].profile`" gives ("layers[1].profile", reason).
    Missing and unknown fields name the field in the message, so it is appended to the key.
    """
    reason, sep, where = message.rpartition(" - at ")
    if not sep:
        return None, message
    key = where.strip().strip("`").removeprefix("$").lstrip(".")
    field = re.search(r"(?:missing required field|unknown field) `([^`]+)`", reason)
    if field:
        key = f"{key}.{field.group(1)}" if key else field.group(1)
    return (key or None), reason


def _check(cond: bool, key: str, reason: str) -> None:
    if not cond:
        raise _Invalid(key, reason)


def _validate(cfg: Config, base_dir: Path) -> None:
    """Cross-field checks that a schema cannot express; raises _Invalid on the first problem."""
    _check(
        bool(_ID_RE.match(cfg.device_id)),
        "device_id",
        "must be 1-64 letters, digits, '_', '.', '-' (it is used in MQTT topics)",
    )
    _check(bool(cfg.state_dir), "state_dir", "must not be empty")

    modem_ids: set[str] = set()
    interfaces: dict[str, str] = {}
    for i, m in enumerate(cfg.modems):
        key = f"modems[{i}]"
        _check(bool(_ID_RE.match(m.id)), f"{key}.id", "must be 1-64 letters, digits, '_', '.', '-'")
        _check(m.id not in modem_ids, f"{key}.id", f"duplicate modem id {m.id!r}")
        modem_ids.add(m.id)
        chosen = [n for n, v in (("port", m.port), ("usb", m.usb), ("imei", m.imei)) if v]
        _check(len(chosen) == 1, key, "give exactly one of port, usb or imei to find the modem")
        if m.port is not None:
            _check(m.port.startswith("/"), f"{key}.port", "must be an absolute device path")
        if m.usb is not None:
            for f in ("vendor", "product"):
                v = getattr(m.usb, f)
                _check(
                    bool(re.fullmatch(r"(0x)?[0-9A-Fa-f]{4}", v)),
                    f"{key}.usb.{f}",
                    "must be a 4-digit hex USB id such as '2c7c'",
                )
            if m.usb.interface is not None:
                _check(
                    bool(re.fullmatch(r"(0x)?[0-9A-Fa-f]{1,2}", m.usb.interface)),
                    f"{key}.usb.interface",
                    "must be a USB interface number such as '02'",
                )
        if m.imei is not None:
            _check(bool(re.fullmatch(r"[0-9]{14,16}", m.imei)), f"{key}.imei", "must be 15 digits")
        _check(bool(_AID_RE.match(m.isdr_aid)), f"{key}.isdr_aid", "must be 5-16 bytes of hex")
        _check(m.poll_interval > 0, f"{key}.poll_interval", "must be > 0")
        _check(
            m.interface in ("auto", "none")
            or (bool(_IFNAME_RE.match(m.interface)) and m.interface not in (".", "..")),
            f"{key}.interface",
            "must be 'auto', 'none' or a network interface name of at most 15 characters "
            "without '/', ':' or spaces, e.g. 'wwan0'",
        )
        if m.interface not in ("auto", "none"):
            _check(
                m.interface not in interfaces,
                f"{key}.interface",
                f"{m.interface!r} is already modem {interfaces.get(m.interface)!r}'s interface",
            )
            interfaces[m.interface] = m.id

    if cfg.discovery.source == "emulator":
        _check(
            bool(cfg.discovery.emulator_control),
            "discovery.emulator_control",
            "source = 'emulator' needs the emulator's control socket path",
        )
    _check(len(cfg.layers) > 0 or not cfg.modems, "layers", "define at least one layer")
    names: set[str] = set()
    primaries = emergencies = 0
    for i, layer in enumerate(cfg.layers):
        key = f"layers[{i}]"
        _check(bool(_ID_RE.match(layer.name)), f"{key}.name", "must be 1-64 letters, digits, '_-.'")
        _check(layer.name not in names, f"{key}.name", f"duplicate layer name {layer.name!r}")
        names.add(layer.name)
        if layer.device is not None:
            _validate_sibling_layer(cfg, layer, key)
        else:
            for f in ("modem", "profile"):
                _check(
                    bool(getattr(layer, f)),
                    f"{key}.{f}",
                    f"missing required field `{f}` (or give device for a sibling layer)",
                )
            _check(
                layer.interface is None,
                f"{key}.interface",
                "only a sibling layer (device) takes an interface; a modem's is set in [[modems]]",
            )
            _check(layer.modem in modem_ids, f"{key}.modem", f"no modem with id {layer.modem!r}")
            _check(
                _is_iccid(layer.profile),
                f"{key}.profile",
                f"must be an ICCID ({ICCID_RULE})",
            )
        if layer.scope == "group":
            _check(
                layer.role == "emergency", f"{key}.scope", "only an emergency layer can be 'group'"
            )
            _check(cfg.group is not None, f"{key}.scope", "'group' needs a [group] section")
        _validate_apn(layer, key, base_dir)
        _validate_activation(layer, key, base_dir)
        primaries += layer.role == "primary"
        emergencies += layer.role == "emergency"
        if layer.role == "primary":
            _check(i == 0, f"{key}.role", "the primary layer must be listed first")
        if layer.role == "emergency":
            _check(i == len(cfg.layers) - 1, f"{key}.role", "the emergency layer must be last")
        for j, p in enumerate(layer.probes):
            pkey = f"{key}.probes[{j}]"
            _check(p.interval > 0, f"{pkey}.interval", "must be > 0")
            _check(0 < p.timeout <= p.interval, f"{pkey}.timeout", "must be > 0 and <= interval")
            _check(p.window >= 1, f"{pkey}.window", "must be >= 1")
            problem = probe_target_problem(p.kind, p.target)
            _check(problem is None, f"{pkey}.target", problem or "")
    if cfg.layers:
        # A device that only holds the group emergency (a tablet in a drawer) has no primary.
        only_group = all(layer.scope == "group" for layer in cfg.layers)
        _check(
            primaries == 1 or (primaries == 0 and only_group),
            "layers",
            f"exactly one layer must be primary (found {primaries})",
        )
        _check(emergencies <= 1, "layers", "at most one layer can be emergency")

    _validate_group(cfg)
    _validate_rsp(cfg.rsp, base_dir)

    h = cfg.health
    if h.rssi_dbm_min is not None:
        _check(-120 <= h.rssi_dbm_min <= -40, "health.rssi_dbm_min", "must be in -120..-40 dBm")
    if h.rsrp_dbm_min is not None:
        _check(-150 <= h.rsrp_dbm_min <= -40, "health.rsrp_dbm_min", "must be in -150..-40 dBm")
    _check(h.down_after >= 1, "health.down_after", "must be >= 1")
    _check(h.up_after >= 1, "health.up_after", "must be >= 1")
    _check(0 < h.degraded_ratio <= 1, "health.degraded_ratio", "must be in (0, 1]")
    _check(0 < h.failure_interval <= 60, "health.failure_interval", "must be in (0, 60] s")
    _check(0 <= h.probe_budget <= 1 << 50, "health.probe_budget", "must be >= 0 bytes")
    _check(cfg.policy.down_after >= 1, "policy.down_after", "must be >= 1")
    _check(cfg.policy.up_after >= 1, "policy.up_after", "must be >= 1")

    t = cfg.timers
    for f in ("hold_down", "failback_stable", "hold_down_decay"):
        _check(getattr(t, f) >= 0, f"timers.{f}", "must be >= 0")
    _check(t.hold_down_max >= t.hold_down, "timers.hold_down_max", "must be >= timers.hold_down")
    _check(t.hold_down_multiplier >= 1, "timers.hold_down_multiplier", "must be >= 1")
    _check(t.switch_timeout > 0, "timers.switch_timeout", "must be > 0")
    _check(t.rollback_timeout > 0, "timers.rollback_timeout", "must be > 0")
    _check(t.companion_grace >= 0, "timers.companion_grace", "must be >= 0")
    _check(
        t.rollback_timeout <= t.switch_timeout,
        "timers.rollback_timeout",
        "must be <= timers.switch_timeout (a switch includes its rollback)",
    )

    q = cfg.mqtt
    if q.enabled:
        _check(bool(q.host), "mqtt.host", "must not be empty")
    _check(1 <= q.port <= 65535, "mqtt.port", "must be a TCP port (1-65535)")
    _check(q.keepalive >= 5, "mqtt.keepalive", "must be >= 5 seconds")
    _check(
        bool(re.fullmatch(r"[^#+\s]+", q.base_topic)) and not q.base_topic.endswith("/"),
        "mqtt.base_topic",
        "must not contain wildcards or spaces, nor end with '/'",
    )
    _check(
        not (q.password and q.password_file),
        "mqtt.password_file",
        "give either password or password_file, not both",
    )
    if q.password_file:
        _check_readable(q.password_file, base_dir, "mqtt.password_file")
    if q.tls is not None:
        for f in ("ca_file", "cert_file", "key_file"):
            value = getattr(q.tls, f)
            if value:
                _check_readable(value, base_dir, f"mqtt.tls.{f}")
        _check(
            (q.tls.cert_file is None) == (q.tls.key_file is None),
            "mqtt.tls.key_file",
            "cert_file and key_file go together",
        )
    c = q.commands
    _check(len(set(c.allowed)) == len(c.allowed), "mqtt.commands.allowed", "duplicate command")
    if c.enabled:
        _check(bool(c.allowed), "mqtt.commands.allowed", "list the commands to allow")
        _check(
            bool(c.token) != bool(c.token_file),
            "mqtt.commands.token",
            "remote commands need exactly one of token or token_file",
        )
        if c.token is not None:
            _check(len(c.token) >= 16, "mqtt.commands.token", "must be at least 16 characters")
        if c.token_file:
            _check_readable(c.token_file, base_dir, "mqtt.commands.token_file")

    for i, exe in enumerate(cfg.hooks.on_transition):
        key = f"hooks.on_transition[{i}]"
        _check(os.path.isabs(exe), key, "must be an absolute path (hooks run without a shell)")
        _check(os.path.isfile(exe), key, f"{exe} does not exist")
        _check(os.access(exe, os.X_OK), key, f"{exe} is not executable")
    _check(cfg.hooks.timeout > 0, "hooks.timeout", "must be > 0")

    u = cfg.usage
    for iccid, quota in u.quotas.items():
        key = f"usage.quotas.{iccid}"
        _check(_is_iccid(iccid), key, f"quota keys must be ICCIDs ({ICCID_RULE})")
        _size(quota, key)
    th = u.alert_thresholds
    _check(all(0 < x <= 100 for x in th), "usage.alert_thresholds", "must be percents in 1..100")
    _check(th == sorted(set(th)), "usage.alert_thresholds", "must be strictly increasing")
    _check(1 <= u.period_start_day <= 28, "usage.period_start_day", "must be in 1..28")
    pool_names: set[str] = set()
    for i, pool in enumerate(u.pools):
        key = f"usage.pools[{i}]"
        _check(pool.name not in pool_names, f"{key}.name", f"duplicate pool {pool.name!r}")
        pool_names.add(pool.name)
        _check(bool(pool.members), f"{key}.members", "a pool needs at least one member")
        for j, iccid in enumerate(pool.members):
            _check(_is_iccid(iccid), f"{key}.members[{j}]", f"must be an ICCID ({ICCID_RULE})")
        _size(pool.quota_bytes, f"{key}.quota_bytes")
        _validate_pool_duty(cfg, pool, key)
    if cfg.control.socket is not None:
        _check(os.path.isabs(cfg.control.socket), "control.socket", "must be an absolute path")


def _validate_pool_duty(cfg: Config, pool: PoolConfig, key: str) -> None:
    """Per-device limits, the limit action and the plan manager of one pool."""
    _check(
        bool(_ID_RE.match(pool.name)),
        f"{key}.name",
        "must be 1-64 letters, digits, '_', '.', '-' (it is used in MQTT topics)",
    )
    for j, device in enumerate(pool.devices):
        _check(bool(_ID_RE.match(device)), f"{key}.devices[{j}]", "must be a device_id")
    members = pool.pool_devices(cfg.device_id)
    _check(len(set(members)) == len(members), f"{key}.devices", "duplicate device")
    for device, limit in pool.device_limits.items():
        dkey = f"{key}.device_limits.{device}"
        _check(device in members, dkey, f"{device!r} is not this device nor listed in devices")
        _size(limit, dkey)
    try:
        kind, layer = parse_on_limit(pool.on_limit)
    except ValueError as exc:
        raise _Invalid(f"{key}.on_limit", str(exc)) from None
    if kind != "none":
        _check(
            cfg.device_id in pool.device_limits,
            f"{key}.on_limit",
            f"needs a device_limits entry for this device ({cfg.device_id!r})",
        )
    if kind == "switch_layer":
        _check(
            any(x.name == layer for x in cfg.layers),
            f"{key}.on_limit",
            f"no layer named {layer!r}",
        )
    if pool.manager is None:
        _check(not pool.successors, f"{key}.successors", "successors need a manager")
        return
    _check(
        pool.manager in members,
        f"{key}.manager",
        f"{pool.manager!r} is not this device nor listed in devices",
    )
    for j, device in enumerate(pool.successors):
        _check(device in members, f"{key}.successors[{j}]", f"{device!r} is not in the pool")
        _check(device != pool.manager, f"{key}.successors[{j}]", "the manager is first already")
    _check(
        len(set(pool.successors)) == len(pool.successors), f"{key}.successors", "duplicate device"
    )
    _check(pool.manager_takeover > 0, f"{key}.manager_takeover", "must be > 0 seconds")


def _validate_sibling_layer(cfg: Config, layer: LayerConfig, key: str) -> None:
    """A layer that is another device: no modem keys, a device the group lists."""
    device = layer.device or ""
    _check(
        not layer.modem and not layer.profile,
        key,
        "give either device (a sibling) or modem and profile, not both",
    )
    _check(bool(_ID_RE.match(device)), f"{key}.device", "must be a device_id (1-64 letters, ...)")
    _check(device != cfg.device_id, f"{key}.device", "a device cannot be its own sibling")
    _check(
        cfg.group is not None and device in cfg.group.devices,
        f"{key}.device",
        f"{device!r} must be listed in [group] devices",
    )
    _check(layer.role != "emergency", f"{key}.role", "a sibling layer cannot be the emergency")
    _check(
        not layer.radio_down_when_inactive,
        f"{key}.radio_down_when_inactive",
        "a sibling layer has no radio of ours",
    )
    _check(
        not layer.probes or layer.interface is not None,
        f"{key}.probes",
        "probes of a sibling layer need its interface (they run through the link to the sibling)",
    )
    if layer.interface is not None:
        _check(
            bool(_IFNAME_RE.match(layer.interface)) and layer.interface not in (".", ".."),
            f"{key}.interface",
            "must be a network interface name of at most 15 characters, e.g. 'wlan0'",
        )
    _check(
        layer.apn == "auto"
        and layer.apn_user is None
        and not layer.apn_password
        and not layer.apn_password_file,
        f"{key}.apn",
        "a sibling layer has no data context of its own (no apn keys)",
    )


def _validate_group(cfg: Config) -> None:
    """[group]: a name usable in topics, known devices including this one, consistent priority."""
    g = cfg.group
    if g is None:
        return
    _check(bool(_ID_RE.match(g.name)), "group.name", "must be 1-64 letters, digits, '_', '.', '-'")
    for i, d in enumerate(g.devices):
        _check(bool(_ID_RE.match(d)), f"group.devices[{i}]", "must be a device_id")
    _check(len(set(g.devices)) == len(g.devices), "group.devices", "lists a device twice")
    _check(
        cfg.device_id in g.devices,
        "group.devices",
        f"must list this device ({cfg.device_id!r}) too",
    )
    for d in g.priority:
        _check(d in g.devices, f"group.priority.{d}", "not a device of [group] devices")
    for i, d in enumerate(g.emergency_devices):
        _check(d in g.devices, f"group.emergency_devices[{i}]", "not a device of [group] devices")
    holds = any(layer.scope == "group" for layer in cfg.layers)
    _check(
        holds == (cfg.device_id in g.emergency_devices),
        "group.emergency_devices",
        f"must list this device ({cfg.device_id!r}) exactly when it has a scope = 'group' layer",
    )
    _check(
        g.claim_ttl >= 1.5 * cfg.mqtt.keepalive,
        "group.claim_ttl",
        "must be >= 1.5 x mqtt.keepalive (a claimant must notice a lost broker before expiry)",
    )
    _check(cfg.mqtt.enabled, "mqtt.enabled", "a [group] needs MQTT (siblings talk over it)")


def _validate_rsp(rsp: RspConfig, base_dir: Path) -> None:
    for i, text in enumerate(rsp.resolve):
        try:
            Resolve.parse(text)
        except ConfigError as exc:
            raise _Invalid(f"rsp.resolve[{i}]", exc.reason) from None
    rsp.ci_certs = [str(base_dir / c) if not Path(c).is_absolute() else c for c in rsp.ci_certs]
    _check(
        not (rsp.notifications and not rsp.ci_certs),
        "rsp.notifications",
        "needs rsp.ci_certs (the CI roots an SM-DP+ is checked against)",
    )
    _check(rsp.notification_retry_initial > 0, "rsp.notification_retry_initial", "must be > 0")
    _check(
        rsp.notification_retry_max >= rsp.notification_retry_initial,
        "rsp.notification_retry_max",
        "must be >= rsp.notification_retry_initial",
    )


def _validate_apn(layer: LayerConfig, key: str, base_dir: Path) -> None:
    """The data-context keys of one layer: APN syntax, credentials that go together."""
    _check(
        layer.apn == "auto" or bool(_APN_RE.match(layer.apn)),
        f"{key}.apn",
        "must be 'auto' or an APN such as 'internet' or 'iot.example.mnc001.mcc234.gprs' "
        "(letters, digits, '.', '-'; at most 100 characters)",
    )
    _check(
        not (layer.apn_password and layer.apn_password_file),
        f"{key}.apn_password_file",
        "give either apn_password or apn_password_file, not both",
    )
    has_password = bool(layer.apn_password or layer.apn_password_file)
    _check(
        not has_password or bool(layer.apn_user),
        f"{key}.apn_user",
        "an APN password needs apn_user as well",
    )
    _check(
        not (layer.apn == "auto" and (layer.apn_user or has_password)),
        f"{key}.apn",
        "APN credentials need an explicit apn (with 'auto' the modem's own context is used)",
    )
    for f in ("apn_user", "apn_password"):
        value = getattr(layer, f)
        _check(
            value is None or ('"' not in value and all(c.isprintable() for c in value)),
            f"{key}.{f}",
            "must be printable and must not contain '\"' (it is sent inside an AT command)",
        )
    if layer.apn_password_file:
        _check_readable(layer.apn_password_file, base_dir, f"{key}.apn_password_file")


def _size(value: int | str, key: str) -> int:
    try:
        return parse_size(value)
    except ValueError as exc:
        raise _Invalid(key, str(exc)) from None


def _validate_activation(layer: LayerConfig, key: str, base_dir: Path) -> None:
    """Store-and-forward keys: one source each, a code that parses, readable files (made
    absolute). Messages never quote the code: its matching ID is a bearer token."""
    from agent.euicc.activation import ActivationCodeError, parse_activation_code

    has_code = bool(layer.activation_code or layer.activation_code_file)
    _check(
        not (layer.activation_code and layer.activation_code_file),
        f"{key}.activation_code_file",
        "give either activation_code or activation_code_file, not both",
    )
    _check(
        not (layer.confirmation_code and layer.confirmation_code_file),
        f"{key}.confirmation_code_file",
        "give either confirmation_code or confirmation_code_file, not both",
    )
    _check(
        has_code or not (layer.confirmation_code or layer.confirmation_code_file),
        f"{key}.confirmation_code",
        "a confirmation code needs activation_code or activation_code_file",
    )
    _check(
        not has_code or layer.device is None,
        f"{key}.activation_code",
        "a sibling layer has no profile of ours to download",
    )
    text = layer.activation_code
    for f in ("activation_code_file", "confirmation_code_file"):
        path = getattr(layer, f)
        if path:
            _check_readable(path, base_dir, f"{key}.{f}")
            absolute = str(Path(path) if os.path.isabs(path) else base_dir / path)
            setattr(layer, f, absolute)
    if layer.activation_code_file:
        try:
            text = read_secret(None, layer.activation_code_file)
        except (OSError, UnicodeDecodeError) as exc:
            raise _Invalid(f"{key}.activation_code_file", f"cannot read it: {exc}") from None
    if layer.activation_code_file or text is not None:
        try:
            parse_activation_code(text or "")
        except ActivationCodeError as exc:
            where = "activation_code_file" if layer.activation_code_file else "activation_code"
            raise _Invalid(f"{key}.{where}", f"not an activation code: {exc}") from None


def _check_readable(path: str, base_dir: Path, key: str) -> None:
    p = Path(path) if os.path.isabs(path) else base_dir / path
    _check(p.is_file() and os.access(p, os.R_OK), key, f"{p} is missing or unreadable")


def probe_target_problem(kind: str, target: str) -> str | None:
    """Why a probe target cannot work for its kind, or None when it looks right."""
    if kind == "tcp":
        host, sep, port = target.rpartition(":")
        if not (sep and host and port.isascii() and port.isdigit() and len(port) <= 5) or not (
            0 < int(port) < 65536
        ):
            return "a tcp target is host:port, e.g. '1.1.1.1:443'"
    elif kind == "http":
        if not re.fullmatch(r"https?://[^/\s]+(/\S*)?", target):
            return "an http target is a URL such as 'http://connectivitycheck.gstatic.com/generate_204'"
    elif kind == "dns" and not (
        re.fullmatch(r"[^@\s]+@[^:\s]+(:[0-9]{1,5})?", target)
        or re.fullmatch(r"[^:/\s]+(:[0-9]{1,5})?/[^\s]+", target)
    ):
        return "a dns target is 'name@server[:port]' or 'server[:port]/name'"
    elif kind == "icmp":
        try:
            ipaddress.ip_address(target.strip("[]"))
        except ValueError:
            return "an icmp target is an IP address, e.g. '9.9.9.9'"
    return None


def parse_config(data: Mapping[str, Any], file: str = "<config>") -> Config:
    """Type and cross-check already-parsed TOML data; raises ConfigError naming file and key."""
    try:
        cfg = msgspec.convert(data, Config)
    except msgspec.ValidationError as exc:
        key, reason = key_from_validation_path(str(exc))
        raise ConfigError(file, key, reason) from None
    cfg = _normalized(cfg)
    base_dir = Path(file).parent if file != "<config>" else Path.cwd()
    try:
        _validate(cfg, base_dir)
    except _Invalid as exc:
        raise ConfigError(file, exc.key, exc.reason) from None
    return cfg


def _normalized(cfg: Config) -> Config:
    """Liberal input: ICCIDs may carry spaces or an F pad, USB ids a 0x prefix."""
    for layer in cfg.layers:
        if layer.profile:
            layer.profile = normalize_iccid(layer.profile)
    cfg.usage.quotas = {normalize_iccid(k): v for k, v in cfg.usage.quotas.items()}
    for pool in cfg.usage.pools:
        pool.members = [normalize_iccid(m) for m in pool.members]
    for m in cfg.modems:
        if m.usb is not None:
            m.usb.vendor = m.usb.vendor.lower().removeprefix("0x")
            m.usb.product = m.usb.product.lower().removeprefix("0x")
            if m.usb.interface is not None:
                m.usb.interface = f"{int(m.usb.interface, 16):02x}"
        m.isdr_aid = m.isdr_aid.upper()
    return cfg


def load_config(path: str | Path) -> Config:
    """Read, type and cross-check a TOML config file; ConfigError names the file, key and reason."""
    file = str(path)
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
        data = tomllib.loads(_config_text(raw, file))
    except FileNotFoundError:
        raise ConfigError(file, None, "file not found") from None
    except PermissionError:
        raise ConfigError(file, None, "permission denied") from None
    except IsADirectoryError:
        raise ConfigError(file, None, "is a directory") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(file, None, f"invalid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(file, None, "not UTF-8 text") from None
    except ValueError as exc:  # e.g. an integer longer than Python converts (4,300 digits)
        raise ConfigError(file, None, f"invalid TOML: {str(exc)[:200]}") from None
    except RecursionError:
        raise ConfigError(file, None, "invalid TOML: nested too deeply") from None
    except OSError as exc:
        raise ConfigError(file, None, f"cannot read: {exc.strerror or exc}") from None
    return parse_config(data, file)


def _config_text(raw: bytes, file: str) -> str:
    """The file as text: UTF-8 without a byte-order mark, as TOML requires."""
    if raw.startswith(b"\xef\xbb\xbf"):
        raise ConfigError(file, None, "starts with a byte-order mark: save it as UTF-8 without BOM")
    if b"\x00" in raw:
        raise ConfigError(file, None, "is a binary file, not TOML text")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            file, None, f"is not UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start})"
        ) from None


def read_secret(value: str | None, file: str | None, base_dir: Path | None = None) -> str | None:
    """The inline secret, or the first line of the secret file (so it can live outside the config)."""
    if value is not None:
        return value
    if file is None:
        return None
    p = Path(file)
    if not p.is_absolute() and base_dir is not None:
        p = base_dir / p
    text = p.read_text(encoding="utf-8")
    return text.splitlines()[0].strip() if text.strip() else None


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """The config as plain data (for `config show` and tests); secrets replaced by '***'."""
    data: dict[str, Any] = msgspec.to_builtins(cfg)
    mqtt = data["mqtt"]
    if mqtt.get("password"):
        mqtt["password"] = "***"
    if mqtt["commands"].get("token"):
        mqtt["commands"]["token"] = "***"
    for layer in data["layers"]:
        for key in ("apn_password", "activation_code", "confirmation_code"):
            if layer.get(key):
                layer[key] = "***"
    return data


def default_demo_config(
    emulator_info: Mapping[str, Any],
    broker_port: int | None,
    state_dir: Path,
    iccids: Sequence[str] | None = None,
    *,
    device_id: str = "demo",
    command_token: str | None = None,
) -> Config:
    """A config that drives the emulator: one layer per profile, fast timers, MQTT on loopback.

    emulator_info is the emulator's first stdout line ({"modems": [{"id", "port", "link",
    "tcp_port", "http_url", "dns_port"}, ...]}). iccids lists the profiles in priority order; each
    modem entry may also carry "iccids". With one modem every layer lives on it; with two or more
    the primary uses the first modem, the failover the second, and the emergency the last.
    """
    modems_info = list(emulator_info.get("modems") or [])
    if not modems_info and emulator_info.get("port"):
        modems_info = [{"id": "m0", "port": emulator_info["port"]}]
    if not modems_info:
        raise ConfigError("<demo>", "modems", "the emulator reported no modem")
    profiles = list(iccids or [])
    if not profiles:
        for m in modems_info:
            profiles.extend(m.get("iccids") or [])
    if not profiles:
        profiles = ["89000000000000000011", "89000000000000000029", "89000000000000000037"]
    roles: list[str] = ["primary"] + ["failover"] * (len(profiles) - 1)
    if len(profiles) >= 3:
        roles[-1] = "emergency"
    modems: list[dict[str, Any]] = []
    for i, m in enumerate(modems_info):
        modems.append(
            {
                "id": str(m.get("id") or f"m{i}"),
                "port": str(m.get("link") or m["port"]),
                "vendor": str(m.get("vendor") or "auto")
                if m.get("vendor") in {"auto", "generic", "quectel", "sierra", "fibocom", "simcom"}
                else "auto",
                "poll_interval": 2.0,
            }
        )
    layers: list[dict[str, Any]] = []
    for i, (iccid, role) in enumerate(zip(profiles, roles, strict=True)):
        mi = min(i, len(modems_info) - 1) if role != "emergency" else len(modems_info) - 1
        m = modems_info[mi]
        probes: list[dict[str, Any]] = []
        if m.get("http_url"):
            probes.append(
                {"kind": "http", "target": m["http_url"], "interval": 1.0, "timeout": 1.0}
            )
        if m.get("tcp_port"):
            probes.append(
                {
                    "kind": "tcp",
                    "target": f"127.0.0.1:{m['tcp_port']}",
                    "interval": 1.0,
                    "timeout": 1.0,
                }
            )
        if m.get("dns_port"):
            probes.append(
                {
                    "kind": "dns",
                    "target": f"example.com@127.0.0.1:{m['dns_port']}",
                    "interval": 1.0,
                    "timeout": 1.0,
                }
            )
        name = role if role != "failover" or roles.count("failover") == 1 else f"failover{i}"
        layers.append(
            {
                "name": name,
                "modem": modems[mi]["id"],
                "profile": iccid,
                "role": role,
                "probes": probes,
            }
        )
    data: dict[str, Any] = {
        "device_id": device_id,
        "state_dir": str(state_dir),
        "log_level": "info",
        "modems": modems,
        "layers": layers,
        # Loopback endpoints cost nothing: no probe byte budget (it would stretch 1 s rounds).
        "health": {"down_after": 2, "up_after": 2, "probe_budget": 0},
        "policy": {"down_after": 1, "up_after": 1},
        "timers": {
            "hold_down": 2.0,
            "hold_down_max": 20.0,
            "hold_down_decay": 60.0,
            "failback_stable": 5.0,
            "switch_timeout": 60.0,
            "rollback_timeout": 30.0,
        },
        "mqtt": {
            "enabled": broker_port is not None,
            "host": "127.0.0.1",
            "port": broker_port or 1883,
            "client_id": f"esim-agent-{device_id}",
            "discovery": True,
            "commands": {
                "enabled": command_token is not None,
                "allowed": list(COMMAND_NAMES),
                "token": command_token,
            },
        },
        "control": {"socket": str(state_dir / "control.sock")},
    }
    return parse_config(data, "<demo>")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return msgspec.json.encode(value).decode()  # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        inner = ", ".join(
            f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items() if v is not None
        )
        return "{ " + inner + " }" if inner else "{}"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml_value(key)


def _toml_table(data: Mapping[str, Any], path: str, out: list[str]) -> None:
    scalars = {k: v for k, v in data.items() if v is not None and not _is_table(v)}
    tables = {k: v for k, v in data.items() if v is not None and _is_table(v)}
    if path and (scalars or not tables):
        out.append(f"\n[{path}]")
    for key, value in scalars.items():
        out.append(f"{_toml_key(key)} = {_toml_value(value)}")
    for key, value in tables.items():
        sub = f"{path}.{_toml_key(key)}" if path else _toml_key(key)
        if isinstance(value, list):
            for item in value:
                out.append(f"\n[[{sub}]]")
                _toml_array_item(item, sub, out)
        else:
            _toml_table(value, sub, out)


def _toml_array_item(item: Mapping[str, Any], path: str, out: list[str]) -> None:
    for key, value in item.items():
        if value is not None:
            out.append(f"{_toml_key(key)} = {_toml_value(value)}")


def _is_table(value: Any) -> bool:
    return isinstance(value, dict) or (
        isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)
    )


def config_to_toml(cfg: Config) -> str:
    """Write a Config as a TOML file that load_config reads back to the same Config."""
    out: list[str] = ["# Written by esim-agent; see docs/configuration.md."]
    _toml_table(msgspec.to_builtins(cfg), "", out)
    return "\n".join(out) + "\n"
