"""msgspec Structs for every MQTT payload and command, JSON encoding, redaction and JSON Schema export."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from agent.iccid import ICCID_PATTERN, parse_iccid
from agent.models import Identity, ModemInfo, Operator, Registration, Signal, SimStatus

MAX_COMMAND_BYTES = 16 * 1024
MAX_NICKNAME_BYTES = 64

# Keys whose values identify a subscriber or a device; one table for everything we publish.
REDACTED_KEYS = frozenset({"imei", "imsi", "iccid", "eid"})

Availability = Literal["online", "offline"]


def utc_now() -> str:
    """Current time as ISO 8601 UTC with a `Z` suffix and millisecond precision."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# ---------------------------------------------------------------------------- retained state


class DeviceState(msgspec.Struct, kw_only=True):
    """`<base>/<device>/state`: the summary Home Assistant reads most."""

    device_id: str
    active_layer: str | None = None
    active_profile: str | None = None
    connectivity: bool = False
    updated_at: str = msgspec.field(default_factory=utc_now)


class ModemState(msgspec.Struct, kw_only=True):
    """`<base>/<device>/modems/<modem_id>`: the ModemInfo fields plus id, port, online, eid and
    the modem's network interface (null when it has none)."""

    id: str
    port: str | None = None
    online: bool = False
    eid: str | None = None
    interface: str | None = None
    identity: Identity = msgspec.field(default_factory=Identity)
    sim: SimStatus = msgspec.field(default_factory=SimStatus)
    signal: Signal = msgspec.field(default_factory=Signal)
    registration: Registration = msgspec.field(default_factory=Registration)
    operator: Operator = msgspec.field(default_factory=Operator)
    updated_at: str = msgspec.field(default_factory=utc_now)

    @classmethod
    def from_info(
        cls,
        modem_id: str,
        info: ModemInfo,
        *,
        port: str | None,
        online: bool,
        eid: str | None,
        interface: str | None = None,
    ) -> ModemState:
        """Build the retained modem record from a driver's ModemInfo.

        An offline modem keeps its identity but not its measurements: signal, registration and
        operator are nulled, so nobody reads the last signal of an unplugged modem as current.
        """
        if not online:
            return cls(
                id=modem_id,
                port=port,
                online=False,
                eid=eid,
                interface=interface,
                identity=info.identity,
            )
        return cls(
            id=modem_id,
            port=port,
            online=online,
            eid=eid,
            interface=interface,
            identity=info.identity,
            sim=info.sim,
            signal=info.signal,
            registration=info.registration,
            operator=info.operator,
        )


class ProfileEntry(msgspec.Struct, kw_only=True):
    """One eUICC profile; same keys as `esim-agent profile list --json`."""

    iccid: str
    isdp_aid: str | None = None
    state: str = "unknown"
    nickname: str | None = None
    service_provider_name: str | None = None
    profile_name: str | None = None
    profile_class: str | None = None


class ProfilesState(msgspec.Struct, kw_only=True):
    """`<base>/<device>/profiles/<modem_id>`."""

    modem: str
    profiles: list[ProfileEntry] = msgspec.field(default_factory=list)
    updated_at: str = msgspec.field(default_factory=utc_now)


class LayerEntry(msgspec.Struct, kw_only=True):
    """One failover layer; health is up, degraded, down or unknown."""

    name: str
    role: str
    modem: str | None = None
    profile: str | None = None
    health: str = "unknown"
    active: bool = False


class LayersState(msgspec.Struct, kw_only=True):
    """`<base>/<device>/layers`: every layer in priority order and the active one."""

    layers: list[LayerEntry] = msgspec.field(default_factory=list)
    active: str | None = None
    updated_at: str = msgspec.field(default_factory=utc_now)


class HealthState(msgspec.Struct, kw_only=True):
    """`<base>/<device>/health/<layer>`: the latest verdict of a layer's monitor."""

    layer: str
    status: str = "unknown"
    latency_ms: float | None = None
    consecutive_failures: int = 0
    consecutive_successes: int = 0
    detail: str | None = None
    checked_at: str = msgspec.field(default_factory=utc_now)


class Event(msgspec.Struct, kw_only=True):
    """`<base>/<device>/events` (not retained): one transition; `data` depends on `type`."""

    type: str
    at: str = msgspec.field(default_factory=utc_now)
    data: dict[str, Any] = msgspec.field(default_factory=dict)


# ---------------------------------------------------------------------------------- commands

Name = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
Iccid = Annotated[str, msgspec.Meta(pattern=ICCID_PATTERN)]
Token = Annotated[str, msgspec.Meta(max_length=1024)]
RequestId = Annotated[str, msgspec.Meta(max_length=128)]


class CommandBase(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Fields every request may carry: the shared secret, a sender name and an id to echo."""

    token: Token | None = None
    sender: Name | None = None
    request_id: RequestId | None = None


class StatusCommand(CommandBase, kw_only=True, forbid_unknown_fields=True):
    """`cmd/status`: answer with the current state."""


class SwitchLayerCommand(CommandBase, kw_only=True, forbid_unknown_fields=True):
    """`cmd/switch_layer`: pin the named layer; `"layer": null` unpins (back to automatic)."""

    layer: Name | None


class ProfileEnableCommand(CommandBase, kw_only=True, forbid_unknown_fields=True):
    """`cmd/profile_enable`: enable a profile on a modem's eUICC."""

    modem: Name
    iccid: Iccid

    def __post_init__(self) -> None:
        # The rule allows a trailing F pad; the daemon compares digits.
        self.iccid = parse_iccid(self.iccid)


class ProfileDisableCommand(CommandBase, kw_only=True, forbid_unknown_fields=True):
    """`cmd/profile_disable`: disable a profile on a modem's eUICC."""

    modem: Name
    iccid: Iccid

    def __post_init__(self) -> None:
        # The rule allows a trailing F pad; the daemon compares digits.
        self.iccid = parse_iccid(self.iccid)


class ProfileNicknameCommand(CommandBase, kw_only=True, forbid_unknown_fields=True):
    """`cmd/profile_nickname`: set a profile's nickname (at most 64 UTF-8 bytes)."""

    modem: Name
    iccid: Iccid
    nickname: Annotated[str, msgspec.Meta(max_length=MAX_NICKNAME_BYTES)]

    def __post_init__(self) -> None:
        # The rule allows a trailing F pad; the daemon compares digits.
        self.iccid = parse_iccid(self.iccid)


class DrillCommand(CommandBase, kw_only=True, forbid_unknown_fields=True):
    """`cmd/drill`: run a failover drill."""


class ProfileDownloadCommand(CommandBase, kw_only=True, forbid_unknown_fields=True):
    """`cmd/profile_download`: download a profile by activation code over the active layer
    (`enable` then switches to it); progress comes as `download_progress` events."""

    code: Annotated[str, msgspec.Meta(min_length=1, max_length=1024)]
    confirmation_code: Annotated[str, msgspec.Meta(min_length=1, max_length=64)] | None = None
    modem: Name | None = None
    enable: bool = False


ActivationCodeText = Annotated[str, msgspec.Meta(min_length=1, max_length=512)]
ConfirmationCode = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
TransferId = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{8,64}$")]


class ProfileTransferCommand(CommandBase, kw_only=True, forbid_unknown_fields=True):
    """`cmd/profile_transfer`: move the profile from_iccid to device `to`, which installs the
    operator's new activation code `code` (docs/transfer.md)."""

    from_iccid: Iccid
    to: Name
    code: ActivationCodeText
    confirmation_code: ConfirmationCode | None = None
    modem: Name | None = None

    def __post_init__(self) -> None:
        # The rule allows a trailing F pad; the daemon compares digits.
        self.from_iccid = parse_iccid(self.from_iccid)


class ProfileTransferInCommand(CommandBase, kw_only=True, forbid_unknown_fields=True):
    """`cmd/profile_transfer_in`: a sibling's transfer: download `code`, enable, verify.
    Asked again with the same transfer_id it answers for the same work (never downloads twice);
    it answers `in_progress` after at most wait_s seconds."""

    transfer_id: TransferId
    code: ActivationCodeText
    confirmation_code: ConfirmationCode | None = None
    modem: Name | None = None
    wait_s: Annotated[float, msgspec.Meta(ge=0, le=240)] = 60.0


COMMANDS: dict[str, type[CommandBase]] = {
    "status": StatusCommand,
    "switch_layer": SwitchLayerCommand,
    "profile_enable": ProfileEnableCommand,
    "profile_disable": ProfileDisableCommand,
    "profile_nickname": ProfileNicknameCommand,
    "drill": DrillCommand,
    "profile_download": ProfileDownloadCommand,
    "profile_transfer": ProfileTransferCommand,
    "profile_transfer_in": ProfileTransferInCommand,
}


class ErrorBody(msgspec.Struct, kw_only=True):
    """Why a command failed; `code` is a stable snake_case token."""

    code: str
    message: str = ""


class CommandResponse(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Every command's answer: ok with a result, or not ok with an error."""

    ok: bool
    command: str | None = None
    request_id: str | None = None
    result: Any = None
    error: ErrorBody | None = None


# ---------------------------------------------------------------------------------- encoding

_encoder = msgspec.json.Encoder()


def to_builtins(payload: msgspec.Struct | Mapping[str, Any]) -> Any:
    """A payload as JSON-ready builtins."""
    return msgspec.to_builtins(payload)


def redact_value(value: str) -> str:
    """Hide all but the last four characters of an identifier."""
    keep = 4 if len(value) > 4 else 0
    return "*" * (len(value) - keep) + value[len(value) - keep :]


def redact(obj: Any) -> Any:
    """Copy of a builtins tree with every REDACTED_KEYS string value masked."""
    if isinstance(obj, dict):
        return {
            k: (redact_value(v) if k in REDACTED_KEYS and isinstance(v, str) else redact(v))
            for k, v in obj.items()
        }
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    return obj


def encode(payload: msgspec.Struct | Mapping[str, Any], *, redacted: bool = False) -> bytes:
    """JSON bytes of a payload, optionally with identifiers masked."""
    builtins = to_builtins(payload)
    if redacted:
        builtins = redact(builtins)
    return _encoder.encode(builtins)


# ------------------------------------------------------------------------------ JSON Schemas

SCHEMA_TYPES: dict[str, Any] = {
    "state": DeviceState,
    "modem": ModemState,
    "profiles": ProfilesState,
    "layers": LayersState,
    "health": HealthState,
    "event": Event,
    "availability": Availability,
    "response": CommandResponse,
    **{f"cmd.{name}": struct for name, struct in COMMANDS.items()},
}


def schemas() -> dict[str, dict[str, Any]]:
    """JSON Schema of every payload and command, keyed by the schema file's stem."""
    return {name: msgspec.json.schema(tp) for name, tp in SCHEMA_TYPES.items()}


def render_schema(schema: Mapping[str, Any]) -> str:
    """Stable text form of a schema as committed in docs/schemas."""
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def write_schemas(directory: Path) -> list[Path]:
    """Write `<name>.schema.json` for every schema into `directory`; return the paths written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, schema in schemas().items():
        path = directory / f"{name}.schema.json"
        path.write_text(render_schema(schema), encoding="utf-8")
        written.append(path)
    return written
