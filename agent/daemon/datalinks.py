"""The daemon's side of the data path: which layer each modem serves, its data connection as a
supervised task while the modem is online, and the one answer to "which interface is it".

The DataPath (agent/daemon/datapath.py) does the work; this module only follows the sessions:

    links = await DataLinks.open(cfg, supervisor, base_dir)   # before the probes are built
    probe_from_spec(kind, target, timeout, links.binding(layer.name))
    await links.follow(session)        # on every session update: start/stop the data task
    links.switch_probe(modem, profile, check)   # safe_switch's verify: new context, then check
    links.switched(session)            # after a profile switch: follow the profile it runs
    await links.set_active(layer)      # once the policy's choice is verified
    links.layer_status(layer)          # interface, addresses, metric, default, data
    links.evidence(modem, ev)          # carrier/context loss seen elsewhere
    await links.close()                # clean stop: every route, rule and address removed

A modem without an interface (`interface = "none"`, the loopback emulator, "auto" that found
nothing) gets no data task and no netlink: it behaves exactly as it did before the data path.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol

import structlog

from agent.at.channel import AtChannel
from agent.config import Config, LayerConfig
from agent.daemon.datapath import DataPath
from agent.daemon.supervisor import Supervisor
from agent.health.detect import Evidence
from agent.health.probes import LinkBinding
from agent.modem.vendors import VendorProfile
from agent.net.netdev import interface_of_port

log = structlog.get_logger(__name__)

#: How long a switch's verify step waits for the new context to carry traffic.
DATA_UP_TIMEOUT_S = 30.0
#: Re-check at least this often while waiting (also woken by every data-path change).
RECHECK_S = 0.5
#: Bound on taking the data connections down at a clean stop.
STOP_TIMEOUT_S = 10.0
#: Evidence after which the modem's context is checked at once instead of at the next poll.
CONTEXT_EVIDENCE = frozenset({"carrier_lost", "pdn_deactivated", "registration_lost"})


class _Modem(Protocol):
    channel: AtChannel
    vendor: VendorProfile


class Session(Protocol):
    """What DataLinks reads from a ModemSession."""

    id: str
    online: bool
    port: str | None

    @property
    def modem(self) -> _Modem | None: ...

    @property
    def enabled_iccid(self) -> str | None: ...


class DataLinks:
    """One per daemon (see the module docstring)."""

    def __init__(self, cfg: Config, datapath: DataPath, supervisor: Supervisor) -> None:
        self.cfg = cfg
        self.datapath = datapath
        self.supervisor = supervisor
        #: modem id -> (task name, the channel its data task runs on, the layer it serves)
        self._running: dict[str, tuple[str, AtChannel, str]] = {}
        self._generation = 0

    @classmethod
    async def open(
        cls, cfg: Config, supervisor: Supervisor, base_dir: Path | None = None
    ) -> DataLinks:
        """Open the data path (sweeping what a crashed run left) when any modem has an
        interface; without one, netlink is never opened."""
        return cls(cfg, await DataPath.open(cfg, base_dir), supervisor)

    # ----------------------------------------------------------------------- questions

    def binding(self, layer: str) -> LinkBinding:
        """Pass to probe_from_spec(..., link=) for every probe of `layer`."""
        return self.datapath.binding(layer)

    def interface(self, modem_id: str) -> str | None:
        """The modem's network interface: the config's name, else what discovery found."""
        return self.datapath.interface(modem_id)

    def serving(self, modem_id: str, enabled_iccid: str | None) -> LayerConfig | None:
        """The layer the modem carries now: the one whose profile is enabled, else (profiles
        not read yet, or a profile no layer names) the modem's first non-emergency layer."""
        mine = [x for x in self.cfg.layers if x.modem == modem_id]
        for layer in mine:
            if enabled_iccid is not None and layer.profile == enabled_iccid:
                return layer
        return next((x for x in mine if x.role != "emergency"), mine[0] if mine else None)

    def layer_status(self, layer: str) -> dict[str, object]:
        """`interface`, `addresses`, `metric`, `default` and `data` of one layer."""
        return self.datapath.snapshot()[layer]

    # ----------------------------------------------------------------------- following

    async def set_interface(self, modem_id: str, ifname: str | None) -> None:
        """Discovery found the modem's interface (used when the config says "auto"); the
        first one found opens netlink."""
        if self.cfg.modem(modem_id).interface != "auto":
            return
        if ifname != self.datapath.interface(modem_id):
            if ifname is not None:
                await self.datapath.attach_netlink()
            self.datapath.set_interface(modem_id, ifname)
            log.info("datapath.interface", modem=modem_id, interface=ifname)

    async def follow(self, session: Session) -> None:
        """Start the modem's data task when it is online (again, on a new channel), stop it
        when it goes offline. Call on every session update. With `interface = "auto"` the
        interface is looked up first: discovery's finding (`session.netdev`) when the session
        has one, else the network child of the AT port's device in sysfs."""
        if self.cfg.modem(session.id).interface == "auto" and session.online:
            found = getattr(session, "netdev", None)
            if found is None and session.port is not None:
                found = interface_of_port(session.port)
            await self.set_interface(session.id, found if _exists(found) else None)
        modem = session.modem
        running = self._running.get(session.id)
        if not session.online or modem is None or self.interface(session.id) is None:
            if running is not None:
                self._stop(session.id)
            return
        if running is not None and running[1] is modem.channel:
            return
        layer = self.serving(session.id, session.enabled_iccid)
        if layer is None:
            return
        if running is not None:
            self._stop(session.id)
        self._generation += 1
        name = f"data-{session.id}-{self._generation}"
        channel, vendor = modem.channel, modem.vendor

        async def run() -> None:
            await self.datapath.run_modem(session.id, channel, vendor, layer.name)

        self._running[session.id] = (name, channel, layer.name)
        self.supervisor.start(name, run)
        log.info("datapath.modem_started", modem=session.id, layer=layer.name)

    def switch_probe(
        self, modem_id: str, profile: str, check: Callable[[], Awaitable[bool]] | None
    ) -> Callable[[], Awaitable[bool]] | None:
        """The safe switch's verify step for a modem with a data path: re-create the context
        with the new profile's APN first, then check the layer over its own link until the
        check passes or DATA_UP_TIMEOUT_S runs out (the context takes a moment to come up)."""
        if modem_id not in self._running:
            return check
        layer = next(
            (x.name for x in self.cfg.layers if x.modem == modem_id and x.profile == profile),
            None,
        )
        if layer is None:
            return check

        async def probe() -> bool:
            self._serve(modem_id, layer)
            if check is None:
                return True
            deadline = asyncio.get_running_loop().time() + DATA_UP_TIMEOUT_S
            while not await check():
                left = deadline - asyncio.get_running_loop().time()
                if left <= 0:
                    return False
                self.datapath.updated.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(left, RECHECK_S)):
                        await self.datapath.updated.wait()
            return True

        return probe

    def switched(self, session: Session) -> None:
        """A profile switch on the modem ended (switched or rolled back): the context follows
        the profile the modem runs now, re-created when that is another layer's."""
        running = self._running.get(session.id)
        layer = self.serving(session.id, session.enabled_iccid)
        if running is not None and layer is not None and running[2] != layer.name:
            self._serve(session.id, layer.name)

    def _serve(self, modem_id: str, layer: str) -> None:
        running = self._running.get(modem_id)
        if running is not None:
            self._running[modem_id] = (running[0], running[1], layer)
        log.info("datapath.serve", modem=modem_id, layer=layer)
        self.datapath.serve(modem_id, layer)

    def evidence(self, modem_id: str, ev: Evidence) -> None:
        """Carrier, registration or context loss seen elsewhere: check the context now."""
        if ev.kind in CONTEXT_EVIDENCE and modem_id in self._running:
            self.datapath.context_lost(modem_id)

    async def set_active(self, layer: str | None) -> None:
        """Traffic follows `layer` (its default route gets the lowest metric)."""
        await self.datapath.set_active(layer)

    async def set_sibling_active(self, layer: str, ifname: str) -> None:
        """Traffic follows a sibling layer through its `interface` (docs/siblings.md)."""
        await self.datapath.set_sibling_active(layer, ifname)

    async def close(self, *, clean: bool = True) -> None:
        """Stop the data tasks and remove every route, rule and address the agent added."""
        tasks = [t for modem_id in list(self._running) if (t := self._stop(modem_id))]
        if tasks:
            await asyncio.wait(tasks, timeout=STOP_TIMEOUT_S)
        await self.datapath.close(clean=clean)

    def _stop(self, modem_id: str) -> asyncio.Task[None] | None:
        name, _, _ = self._running.pop(modem_id)
        record = self.supervisor.records.pop(name, None)
        log.info("datapath.modem_stopped", modem=modem_id)
        if record is None or record.task is None:
            return None
        # The task's own exit takes the context down and withdraws addresses and routes.
        record.task.cancel()
        return record.task


def _exists(ifname: str | None) -> bool:
    """Whether the interface is in this process's network namespace (a name discovery reports
    for a device whose interface lives elsewhere, or is gone, is no interface of ours)."""
    if ifname is None:
        return False
    try:
        socket.if_nametoindex(ifname)
    except OSError:
        return False
    return True
