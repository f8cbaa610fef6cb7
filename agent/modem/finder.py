"""The live view of the modems present: follows a device source, probes AT ports, locates entries.

One `Finder` serves every modem session of a daemon (and `modem list`). Each port is probed under
its own lock with a short deadline, so a hung port delays only whoever asked about that port.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog

from agent.at.channel import AtChannel
from agent.config import ModemConfig
from agent.errors import AgentError, AtError, PortBusyError, PortGoneError
from agent.modem.driver import Modem
from agent.transport.discovery import (
    Match,
    MatchSpec,
    ModemDevice,
    group,
    match_entry,
)
from agent.transport.owners import port_holders
from agent.transport.udev import DeviceEvent, DeviceSource, UdevDevice

log = structlog.get_logger(__name__)

PROBE_DEADLINE_S = 1.0
PROBE_TRIES = 3


@dataclass(frozen=True)
class Identity:
    """What an AT port said about its modem."""

    imei: str | None = None
    manufacturer: str | None = None
    model: str | None = None


class ProbeSkipped(AgentError):
    """A port was not probed: another process (or one of our sessions) holds it."""


Prober = Callable[[str], Awaitable[Identity]]


async def probe_identity(
    path: str,
    *,
    deadline: float = PROBE_DEADLINE_S,
    tries: int = PROBE_TRIES,
) -> Identity:
    """`AT` until OK (short deadline, a few tries), then the identity; ProbeSkipped if held open."""
    held = port_holders(path)
    if held:
        who = ", ".join(f"{pid} ({name})" for pid, name in sorted(held.items()))
        raise ProbeSkipped(f"{path} is open in pid {who}")
    try:
        channel = await asyncio.wait_for(AtChannel.open(path), deadline)
    except PortBusyError as exc:
        raise ProbeSkipped(f"{path}: {exc.reason}") from exc
    try:
        # the whole AT phase is bounded: a silent port costs a few seconds, not a resync's worth
        async with asyncio.timeout(deadline * (tries + 1)):
            for attempt in range(tries):
                try:
                    await channel.command("AT", timeout=deadline)
                    break
                except AtError:
                    if channel.is_lost or attempt == tries - 1:
                        raise
        ident = await asyncio.wait_for(Modem(channel, None).identity(), deadline * 8)
        return Identity(imei=ident.imei, manufacturer=ident.manufacturer, model=ident.model)
    finally:
        await channel.close()


def spec_for(cfg: ModemConfig) -> MatchSpec:
    """The matching part of a `[[modems]]` entry."""
    usb = cfg.usb
    return MatchSpec(
        id=cfg.id,
        port=cfg.port,
        vendor=usb.vendor if usb else None,
        product=usb.product if usb else None,
        serial=usb.serial if usb else None,
        interface=usb.interface if usb else None,
        imei=cfg.imei,
    )


@dataclass(frozen=True)
class Found:
    """Where an entry's modem is now."""

    port: str
    device: ModemDevice | None

    @property
    def netdev(self) -> str | None:
        """The modem's network interface, when udev showed one."""
        return self.device.netdev if self.device is not None else None


class Finder:
    """Devices from a source, grouped into modems; identities probed once per port and cached."""

    def __init__(self, source: DeviceSource, *, prober: Prober | None = None) -> None:
        self.source = source
        self._prober: Prober = prober or probe_identity
        self._devices: dict[str, UdevDevice] = {}
        self.modems: list[ModemDevice] = []
        #: What each AT port said (by port path); forgotten when the port goes away.
        self.identities: dict[str, Identity] = {}
        #: Why a port could not be probed (held open, no answer).
        self.probe_errors: dict[str, str] = {}
        #: Which entry owns which modem (device key, or the port path for udev-less ports).
        self.claims: dict[str, str] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._changed = asyncio.Event()
        self._removed: list[Callable[[str], None]] = []
        self._task: asyncio.Task[None] | None = None
        self.started = False
        #: Counts device changes; `wait_change(since=...)` compares against it.
        self.generation = 0

    # ---- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Take the snapshot and follow events in the background."""
        if self.started:
            return
        self.started = True
        events = self.source.events()
        for dev in await self.source.enumerate():
            self._devices[dev.devpath] = dev
        self._regroup()
        self._task = asyncio.create_task(self._follow(events), name="discovery")

    async def stop(self) -> None:
        """Stop following."""
        await self.source.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _follow(self, events: object) -> None:
        async for event in events:  # type: ignore[attr-defined]
            self.apply(event)

    def apply(self, event: DeviceEvent) -> None:
        """Take one event into the view; tell removal listeners about vanished ports."""
        dev = event.device
        if event.action == "remove":
            self._devices.pop(dev.devpath, None)
            if dev.devnode:
                self.identities.pop(dev.devnode, None)
                self.probe_errors.pop(dev.devnode, None)
                for cb in list(self._removed):
                    cb(dev.devnode)
        else:
            self._devices[dev.devpath] = dev
            if event.action == "add" and dev.devnode:
                # a replugged modem may come back on the same node with another identity
                self.identities.pop(dev.devnode, None)
                self.probe_errors.pop(dev.devnode, None)
        log.debug("udev_event", action=event.action, devpath=dev.devpath, node=dev.devnode)
        self._regroup()

    def _regroup(self) -> None:
        self.modems = group(self._devices.values())
        self.generation += 1
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def wait_change(self, timeout: float, since: int | None = None) -> bool:
        """Wait for a device change after generation `since` (default: from now), up to timeout.

        Returns at once when one already happened since then, so a caller that looked at the
        devices, worked, and waits again cannot miss an event that arrived while it worked.
        """
        if since is not None and since != self.generation:
            return True
        changed = self._changed
        try:
            async with asyncio.timeout(timeout):
                await changed.wait()
        except TimeoutError:
            return False
        return True

    def on_port_removed(self, callback: Callable[[str], None]) -> Callable[[], None]:
        """callback(devnode) whenever a port vanishes; returns the unsubscribe function."""
        self._removed.append(callback)
        return lambda: self._removed.remove(callback) if callback in self._removed else None

    # ---- identities -----------------------------------------------------------------------

    def imeis(self) -> dict[str, str]:
        """Port path -> IMEI for every port that told us."""
        return {p: i.imei for p, i in self.identities.items() if i.imei}

    def note_identity(self, path: str, identity: Identity) -> None:
        """A session that opened this port tells what the modem said (saves a probe later)."""
        self.identities[os.path.realpath(path)] = identity
        self.identities[path] = identity

    async def identify(self, path: str) -> Identity | None:
        """The identity behind an AT port, probing it once; None if skipped or silent."""
        if path in self.identities:
            return self.identities[path]
        lock = self._locks.setdefault(path, asyncio.Lock())
        async with lock:
            if path in self.identities:
                return self.identities[path]
            try:
                ident = await self._prober(path)
            except ProbeSkipped as exc:
                self.probe_errors[path] = str(exc)
                log.info("port_probe_skipped", port=path, reason=str(exc))
                return None
            except (AgentError, OSError, TimeoutError) as exc:
                self.probe_errors[path] = f"no AT answer: {exc}"
                log.info("port_probe_failed", port=path, error=str(exc))
                return None
            self.probe_errors.pop(path, None)
            self.identities[path] = ident
            log.info("port_identified", port=path, imei=ident.imei, model=ident.model)
            return ident

    async def identify_all(self, exclude: set[str] | None = None) -> None:
        """Probe every candidate AT port not yet known, each modem in parallel."""

        async def one(m: ModemDevice) -> None:
            for p in m.at_candidates():
                if exclude and p.path in exclude:
                    continue
                if await self.identify(p.path) is not None:
                    return  # one answering AT port per modem is enough to know it

        await asyncio.gather(*(one(m) for m in self.modems))

    # ---- locating config entries ----------------------------------------------------------

    def _free(self, spec: MatchSpec) -> list[ModemDevice]:
        return [m for m in self.modems if self.claims.get(m.key, spec.id) == spec.id]

    async def locate(self, spec: MatchSpec) -> Found:
        """Where this entry's modem is now; PortGoneError(why) when it is not present."""
        free = self._free(spec)
        match = match_entry(spec, free, self.imeis())
        if match.port is None and spec.how != "port":
            # probe what could answer: the unknown ports of the entry's USB device, or (IMEI)
            # every free modem's candidates, modems in parallel so a hung one delays nobody
            targets = [match.device] if match.device is not None else free
            match = await self._probe_until_match(spec, targets) or match
        if match.port is None:
            raise PortGoneError(spec.how + " match", match.why or "not present")
        key = match.device.key if match.device is not None else match.port
        for k, owner in list(self.claims.items()):
            if owner == spec.id and k != key:
                del self.claims[k]
        self.claims[key] = spec.id
        return Found(port=match.port, device=match.device)

    async def _probe_until_match(self, spec: MatchSpec, targets: list[ModemDevice]) -> Match | None:
        async def walk(m: ModemDevice) -> None:
            for p in m.at_candidates():
                if spec.how == "usb" and p.role in ("at_primary", "at"):
                    continue  # known by role: no probe needed
                if await self.identify(p.path) is not None:
                    return  # this modem answered: its IMEI is known now

        pending = {asyncio.create_task(walk(m)) for m in targets}
        try:
            while pending:
                _done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                match = match_entry(spec, self._free(spec), self.imeis())
                if match.port is not None:
                    return match
        finally:
            for task in pending:
                task.cancel()
        return None

    def device_for_port(self, path: str) -> ModemDevice | None:
        """The modem that has this port."""
        return next((m for m in self.modems if m.port(path) is not None), None)
