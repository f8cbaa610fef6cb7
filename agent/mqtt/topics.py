"""The MQTT topic tree in one place: every topic the agent publishes or subscribes to is built here."""

from __future__ import annotations

from dataclasses import dataclass

# MQTT forbids wildcards and NUL in publish topics; "/" would split a name into extra levels.
_FORBIDDEN = frozenset("+#/\x00")

COMMAND_NAMES: tuple[str, ...] = (
    "status",
    "switch_layer",
    "profile_enable",
    "profile_disable",
    "profile_nickname",
    "drill",
    "profile_transfer",
    "profile_transfer_in",
)

RESPONSE_SUFFIX = "response"


def check_segment(segment: str) -> str:
    """Return `segment` if it is a usable single topic level, else raise ValueError."""
    if not segment or any(ch in _FORBIDDEN for ch in segment):
        raise ValueError(f"invalid MQTT topic segment: {segment!r}")
    return segment


def object_id(*parts: str) -> str:
    """Join parts into a Home Assistant object id (letters, digits, underscore only)."""
    joined = "_".join(parts)
    return "".join(ch if ch.isascii() and ch.isalnum() else "_" for ch in joined).lower()


@dataclass(frozen=True, slots=True)
class Topics:
    """Topics under `<base>/<device_id>/`; `base` may itself hold several levels."""

    base: str
    device_id: str

    def __post_init__(self) -> None:
        for level in self.base.split("/"):
            check_segment(level)
        check_segment(self.device_id)

    @property
    def root(self) -> str:
        """`<base>/<device_id>`."""
        return f"{self.base}/{self.device_id}"

    def key(self, key: str) -> str:
        """Topic of a state key such as `state`, `modems/<id>` or `health/<layer>`."""
        parts = key.split("/")
        for part in parts:
            check_segment(part)
        if parts[0] == "cmd" or parts[0] == "events":
            raise ValueError(f"{key!r} is not a state key")
        return f"{self.root}/{key}"

    @property
    def availability(self) -> str:
        """Retained `online`/`offline`, also the Last Will."""
        return f"{self.root}/availability"

    @property
    def state(self) -> str:
        """Retained summary of the device."""
        return f"{self.root}/state"

    def modem(self, modem_id: str) -> str:
        """Retained modem record."""
        return f"{self.root}/modems/{check_segment(modem_id)}"

    def modem_availability(self, modem_id: str) -> str:
        """Retained `online`/`offline` of one modem (Home Assistant's per-modem availability)."""
        return f"{self.modem(modem_id)}/availability"

    def profiles(self, modem_id: str) -> str:
        """Retained profile list of one modem's eUICC."""
        return f"{self.root}/profiles/{check_segment(modem_id)}"

    @property
    def layers(self) -> str:
        """Retained list of failover layers and the active one."""
        return f"{self.root}/layers"

    def health(self, layer: str) -> str:
        """Retained health of one layer."""
        return f"{self.root}/health/{check_segment(layer)}"

    @property
    def events(self) -> str:
        """Non-retained transition events."""
        return f"{self.root}/events"

    def command(self, name: str) -> str:
        """Request topic of one command."""
        return f"{self.root}/cmd/{check_segment(name)}"

    @property
    def command_filter(self) -> str:
        """Subscription filter for every command request (one level: responses do not match)."""
        return f"{self.root}/cmd/+"

    def command_response(self, name: str) -> str:
        """Fallback response topic for requests that carry no MQTT v5 response topic."""
        return f"{self.root}/cmd/{check_segment(name)}/{RESPONSE_SUFFIX}"

    def command_name(self, topic: str) -> str | None:
        """Command name of a request topic under this device, or None if it is not one."""
        prefix = f"{self.root}/cmd/"
        if not topic.startswith(prefix):
            return None
        name = topic[len(prefix) :]
        return name if name and "/" not in name else None


def discovery_topic(prefix: str, component: str, object_id: str) -> str:
    """Home Assistant discovery config topic `<prefix>/<component>/<object_id>/config`."""
    return f"{prefix}/{check_segment(component)}/{check_segment(object_id)}/config"
