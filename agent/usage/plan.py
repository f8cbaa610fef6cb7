"""The shared pool's plan manager, decided without clocks or I/O.

One device of a pool (its `manager`) announces the pool's threshold crossings. When it has been
offline (its retained availability `offline`, the Last Will) for `takeover_s` seconds, the next
device in the duty order takes the duty; when an earlier device is back, the duty returns to it.
Thresholds announced in a period are remembered by every device (each publishes a retained
record of what it announced), so whoever holds the duty announces only what nobody has yet.

The caller passes `now` (monotonic seconds) and what it observed; nothing here reads a clock.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Protocol

import msgspec

#: A device that just connected waits this long before it takes a duty, so the retained records
#: of what others announced have reached it first.
SETTLE_S = 2.0
#: Larger records are refused unread (a record is well under a hundred bytes).
MAX_RECORD_BYTES = 4096

Threshold = Annotated[int, msgspec.Meta(ge=1, le=100)]
Name = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
Period = Annotated[str, msgspec.Meta(pattern=r"^[0-9]{4}-[0-9]{2}$")]


class Presence(Protocol):
    """What a device was last seen as (agent.siblings.view.SiblingObservation fits)."""

    @property
    def online(self) -> bool | None:
        """True (online), False (offline, or its Last Will), None (never heard of)."""
        ...

    @property
    def since(self) -> float:
        """When `online` took its value (or when listening began, for None)."""
        ...


@dataclass(frozen=True, slots=True)
class Duty:
    """Who holds a pool's duty in this device's view, and when that may change by itself."""

    holder: str | None
    recheck_at: float | None = None
    #: Devices ahead of the holder that are taken as gone.
    skipped: tuple[str, ...] = ()


def gone(presence: Presence | None, now: float, takeover_s: float, listening_since: float) -> bool:
    """A device offline (or never heard of since we listen) for at least takeover_s."""
    if presence is None:
        return now - listening_since >= takeover_s
    return presence.online is not True and now - presence.since >= takeover_s


def duty_holder(
    order: Sequence[str],
    me: str,
    now: float,
    presence: Mapping[str, Presence],
    *,
    me_since: float | None,
    takeover_s: float,
    listening_since: float,
    settle_s: float = SETTLE_S,
) -> Duty:
    """Who holds the duty: the first device in `order` that is not gone.

    `me_since`: since when this device has been connected to the broker (None: it is not), so
    its own view of the others is fresh. A device ahead of us that is offline but within
    takeover_s keeps the duty (nobody announces meanwhile; what crossed is announced after).
    This device holds the duty only once it has been connected for settle_s.
    """
    skipped: list[str] = []
    for device in order:
        if device == me:
            if me_since is None:
                return Duty(None, None, tuple(skipped))
            if now - me_since < settle_s:
                return Duty(None, me_since + settle_s, tuple(skipped))
            return Duty(me, None, tuple(skipped))
        seen = presence.get(device)
        if not gone(seen, now, takeover_s, listening_since):
            since = listening_since if seen is None else seen.since
            recheck = since + takeover_s if seen is None or seen.online is not True else None
            return Duty(device, recheck, tuple(skipped))
        skipped.append(device)
    return Duty(None, None, tuple(skipped))


def crossed(used: int, quota: int, thresholds: Iterable[int]) -> list[int]:
    """Thresholds (percent) that `used` has reached against `quota`, ascending."""
    if quota <= 0:
        return []
    return sorted(t for t in set(thresholds) if used * 100 >= t * quota)


def to_announce(
    used: int, quota: int, thresholds: Iterable[int], announced: Iterable[int]
) -> list[int]:
    """Thresholds reached and not yet announced by anyone this period, ascending."""
    done = set(announced)
    return [t for t in crossed(used, quota, thresholds) if t not in done]


def limit_thresholds(thresholds: Iterable[int]) -> tuple[int, ...]:
    """A device's limit alerts: the configured thresholds and 100 (the limit itself)."""
    return tuple(sorted({*thresholds, 100}))


# --- the retained record of what a device announced ---------------------------------------


class PoolAlertRecord(msgspec.Struct, frozen=True, kw_only=True):
    """`<base>/<device>/usage/pool/<pool>/alerts` (retained): the thresholds this device
    announced for the pool in `period`."""

    pool: Name
    device: Name
    period: Period
    thresholds: Annotated[list[Threshold], msgspec.Meta(max_length=100)]


_record_decoder = msgspec.json.Decoder(PoolAlertRecord)


def decode_record(payload: bytes) -> PoolAlertRecord | None:
    """The record, or None when it is too large or fails its schema."""
    if len(payload) > MAX_RECORD_BYTES:
        return None
    try:
        return _record_decoder.decode(payload)
    except (msgspec.DecodeError, RecursionError):
        return None


def announced_in(records: Iterable[PoolAlertRecord], pool: str, period: str) -> frozenset[int]:
    """Every threshold any device announced for the pool in the period."""
    return frozenset(
        t for r in records if r.pool == pool and r.period == period for t in r.thresholds
    )
