"""What this device knows about its siblings: typed decoding of their retained messages, and a
pure verdict on a sibling layer's health.

Decoding is strict (msgspec types, the topic's device must be listed in [group] and match the
payload) and never raises: a message that fails is dropped and logged once per device and reason.
The health function reads no clock: the caller passes `now` (monotonic seconds).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated

import msgspec
import structlog

from agent.policy.engine import Health

log = structlog.get_logger(__name__)

#: Larger sibling payloads are refused unread (a state summary is a few hundred bytes).
MAX_SIBLING_BYTES = 16 * 1024

DeviceId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
LayerName = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]


# --- decoded messages -------------------------------------------------------------------------


class SiblingAvailability(msgspec.Struct, frozen=True, kw_only=True):
    """`<base>/<device>/availability`: `online`, or `offline` (also the sibling's Last Will)."""

    device: str
    online: bool


class SiblingState(msgspec.Struct, frozen=True, kw_only=True):
    """`<base>/<device>/state`: whether the sibling is connected, and over which layer."""

    device: str
    connectivity: bool
    active_layer: str | None = None
    active_profile: str | None = None


class ClaimPayload(msgspec.Struct, frozen=True, kw_only=True):
    """The JSON of `<base>/<device>/claim/<group>`: a holder claims the group emergency."""

    group: DeviceId
    device: DeviceId
    #: Seconds the claim stays valid after it is received (it is refreshed every ttl/3).
    ttl: Annotated[float, msgspec.Meta(gt=0, le=3600)]
    #: Distinguishes one claim of this device from its earlier ones (monotonic per claimant).
    seq: Annotated[int, msgspec.Meta(ge=0)]


class SiblingClaim(msgspec.Struct, frozen=True, kw_only=True):
    """A decoded claim; `ttl` is None when the claimant released it (empty retained payload)."""

    device: str
    group: str
    ttl: float | None
    seq: int = 0


class _StatePayload(msgspec.Struct, kw_only=True):
    # Unknown keys pass (a newer sibling may publish more); known keys must have their types.
    device_id: DeviceId
    connectivity: bool
    active_layer: LayerName | None = None
    active_profile: Annotated[str, msgspec.Meta(max_length=32)] | None = None


SiblingMessage = SiblingAvailability | SiblingState | SiblingClaim

_state_decoder = msgspec.json.Decoder(_StatePayload)
_claim_decoder = msgspec.json.Decoder(ClaimPayload)


class SiblingDecoder:
    """Turns (topic, payload) from the broker into typed sibling messages, or None.

    Only topics `<base>/<device>/{availability,state,claim/<group>}` of devices that [group]
    lists are accepted. This device's own topics are decoded too (the claim protocol needs the
    echo of its own claim); callers that want only others filter on `.device`.
    """

    def __init__(self, base: str, group: str, devices: Iterable[str]) -> None:
        self.base = base.rstrip("/")
        self.group = group
        self.devices = frozenset(devices)
        self._logged: set[tuple[str, str]] = set()

    def subscriptions(self) -> list[str]:
        """The topic filters to subscribe to: exactly the listed devices' topics."""
        out: list[str] = []
        for d in sorted(self.devices):
            root = f"{self.base}/{d}"
            out += [f"{root}/availability", f"{root}/state", f"{root}/claim/{self.group}"]
        return out

    def decode(self, topic: str, payload: bytes) -> SiblingMessage | None:
        """The typed message, or None (logged once per device and reason) when it fails."""
        prefix = self.base + "/"
        if not topic.startswith(prefix):
            return self._drop("?", "topic outside the base topic")
        device, _, rest = topic[len(prefix) :].partition("/")
        if device not in self.devices:
            return self._drop(device[:64], "device not listed in [group] devices")
        if len(payload) > MAX_SIBLING_BYTES:
            return self._drop(device, "payload too large")
        if rest == "availability":
            if payload in (b"online", b"offline"):
                return SiblingAvailability(device=device, online=payload == b"online")
            return self._drop(device, "availability is not 'online' or 'offline'")
        if rest == "state":
            return self._state(device, payload)
        if rest == f"claim/{self.group}":
            return self._claim(device, payload)
        return self._drop(device, "not a sibling topic")

    def _state(self, device: str, payload: bytes) -> SiblingMessage | None:
        try:
            st = _state_decoder.decode(payload)
        except (msgspec.DecodeError, RecursionError):
            return self._drop(device, "state fails its schema")
        if st.device_id != device:
            return self._drop(device, "state names another device than its topic")
        return SiblingState(
            device=device,
            connectivity=st.connectivity,
            active_layer=st.active_layer,
            active_profile=st.active_profile,
        )

    def _claim(self, device: str, payload: bytes) -> SiblingMessage | None:
        if not payload:
            return SiblingClaim(device=device, group=self.group, ttl=None)
        try:
            c = _claim_decoder.decode(payload)
        except (msgspec.DecodeError, RecursionError):
            return self._drop(device, "claim fails its schema")
        if c.device != device or c.group != self.group:
            return self._drop(device, "claim names another device or group than its topic")
        return SiblingClaim(device=device, group=c.group, ttl=c.ttl, seq=c.seq)

    def _drop(self, device: str, reason: str) -> SiblingMessage | None:
        if (device, reason) not in self._logged:
            self._logged.add((device, reason))
            log.warning("sibling_message_ignored", device=device, reason=reason)
        return None


def claim_topic(base: str, device: str, group: str) -> str:
    """Where `device` publishes its claim: under its own tree, so a per-device ACL holds."""
    return f"{base.rstrip('/')}/{device}/claim/{group}"


def encode_claim(group: str, device: str, ttl: float, seq: int) -> bytes:
    """The retained claim payload (an empty payload releases it)."""
    return msgspec.json.encode(ClaimPayload(group=group, device=device, ttl=ttl, seq=seq))


# --- a sibling as a layer -------------------------------------------------------------------


class SiblingObservation(msgspec.Struct, frozen=True, kw_only=True):
    """The latest word from one sibling; `since` is when online/connectivity took their values.

    Start with `SiblingObservation(since=<now when the daemon starts listening>)`.
    """

    online: bool | None = None
    connectivity: bool | None = None
    active_layer: str | None = None
    since: float = 0.0


def observe(
    obs: SiblingObservation, msg: SiblingAvailability | SiblingState, now: float
) -> SiblingObservation:
    """Fold one decoded message into the observation; `since` moves only on a change."""
    online: bool | None
    conn: bool | None
    if isinstance(msg, SiblingAvailability):
        online, conn, layer = msg.online, obs.connectivity, obs.active_layer
    else:
        online, conn, layer = obs.online, msg.connectivity, msg.active_layer
    changed = (online, conn) != (obs.online, obs.connectivity)
    return SiblingObservation(
        online=online, connectivity=conn, active_layer=layer, since=now if changed else obs.since
    )


def sibling_health(
    obs: SiblingObservation,
    *,
    now: float,
    grace: float,
    broker_connected: bool,
    broker_since: float,
    probe: Health | None = None,
) -> tuple[Health, str]:
    """A sibling layer's health and why, from what the sibling says and our own probe.

    - Last Will (`offline`): down at once.
    - Online but no connectivity: degraded (still usable) for `grace` seconds, then down.
    - Online and connected: up, unless our own probe through the link says otherwise.
    - Broker unreachable: the view is stale, so only our own probe counts; without one the layer
      is degraded for `grace` and then down (the broker may have been on the sibling that died).
    """
    if not broker_connected:
        if probe is not None and probe is not Health.UNKNOWN:
            return probe, f"broker unreachable; own probe says {probe.value}"
        if now - broker_since < grace:
            return Health.DEGRADED, "broker unreachable, within companion_grace"
        return Health.DOWN, "broker unreachable and no probe of our own"
    if obs.online is None:
        # `since` is when we started listening: a sibling that never spoke is given the grace.
        if now - obs.since < grace:
            return Health.DEGRADED, "no word from the sibling yet, within companion_grace"
        return Health.DOWN, f"no word from the sibling for {now - obs.since:.1f}s"
    if not obs.online:
        return Health.DOWN, "sibling offline (Last Will)"
    if obs.connectivity is not True:
        if now - obs.since < grace:
            return Health.DEGRADED, "sibling reports no connectivity, within companion_grace"
        return Health.DOWN, f"sibling reports no connectivity for {now - obs.since:.1f}s"
    if probe is Health.DOWN:
        return Health.DOWN, "sibling connected but our own probe through its link fails"
    if probe is Health.DEGRADED:
        return Health.DEGRADED, "sibling connected; our own probe is degraded"
    return Health.UP, "sibling online and connected"
