"""The data path of every layer, composed for the daemon: the modem's data connection (AT), the
interface's addresses (static or DHCP), the layer's routes and rules, and its probes' binding.

One DataPath per daemon. Per modem the daemon starts `run_modem()` as a supervised task once
the modem's AT channel is online, tells it which layer the modem serves (`serve()`), and tells
the DataPath which layer is active (`set_active()`). Probes built with `binding(layer)` follow
whatever this module learns about the layer's link. Nothing here decides anything: the policy
does, this carries it out.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from agent.config import Config, LayerConfig
from agent.daemon.evidence import interface_of
from agent.health.probes import LinkBinding
from agent.modem.dataconn import (
    Channel,
    DataConnection,
    DataProfile,
    DataState,
    DataStatus,
)
from agent.modem.vendors import VendorProfile
from agent.net.addressing import DhcpClient, InterfaceAddresses, Lease
from agent.net.routes import NETLINK_TIMEOUT, RouteError, RouteManager

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class _ModemLink:
    """What the data path holds per modem."""

    modem_id: str
    interface: str | None
    layer: str | None = None
    conn: DataConnection | None = None
    status: DataStatus = field(default_factory=DataStatus)
    dhcp: DhcpClient | None = None
    lease: Lease | None = None


class DataPath:
    """Per layer: data connection, addresses, routes, probe binding (see the module docstring)."""

    def __init__(
        self,
        cfg: Config,
        routes: RouteManager | None,
        addresser: InterfaceAddresses | None,
        base_dir: Path | None = None,
    ) -> None:
        self.cfg = cfg
        self.routes = routes
        self.addresser = addresser
        self.base_dir = base_dir
        self._bindings = {layer.name: LinkBinding() for layer in cfg.layers}
        self._modems: dict[str, _ModemLink] = {}
        for m in cfg.modems:
            self._modems[m.id] = _ModemLink(modem_id=m.id, interface=interface_of(m))
        self._lock = asyncio.Lock()
        self._active: str | None = None
        #: Set after every change of a link's state has been carried out (for publishers).
        self.updated = asyncio.Event()

    @classmethod
    async def open(cls, cfg: Config, base_dir: Path | None = None) -> DataPath:
        """Open netlink, sweep what a crashed run left, and hold per-layer state.

        Without any modem interface named in the config (loopback emulator, `interface =
        "none"`, "auto" before discovery found one) netlink is not touched at all and probes
        stay unbound; `attach_netlink()` opens it once discovery names an interface.
        """
        dp = cls(cfg, None, None, base_dir)
        # A sibling layer's `interface` is routed over too (set_sibling_active).
        if any(interface_of(m) is not None for m in cfg.modems) or any(
            x.interface for x in cfg.layers
        ):
            await dp.attach_netlink()
        return dp

    async def attach_netlink(self) -> bool:
        """Open netlink and sweep (once); False when it cannot be had (no CAP_NET_ADMIN)."""
        if self.routes is not None:
            return True
        routes: RouteManager | None = None
        try:
            routes = await RouteManager.open([layer.name for layer in self.cfg.layers])
            swept = await routes.sweep_stale()
            self.addresser = InterfaceAddresses.open()
            log.info("datapath.open", swept=swept)
        except RouteError as exc:
            # No CAP_NET_ADMIN (or no netlink): probes still run, bound where possible.
            log.warning("datapath.no_netlink", error=str(exc))
            if routes is not None:
                await routes.close(clean=False)
            return False
        self.routes = routes
        for link in self._modems.values():
            for layer in self._layers_of(link.modem_id):
                self._bindings[layer.name].fwmark = (
                    self._fwmark(layer.name) if link.interface else None
                )
        return True

    # ----------------------------------------------------------------------- wiring points

    def binding(self, layer: str) -> LinkBinding:
        """The link binding to pass to probe_from_spec(..., link=) for `layer`'s probes."""
        return self._bindings[layer]

    def set_interface(self, modem_id: str, ifname: str | None) -> None:
        """The modem's interface as discovery found it (udev); config names win over 'auto'."""
        link = self._modems[modem_id]
        if self.cfg.modem(modem_id).interface == "auto":
            link.interface = ifname
            for layer in self._layers_of(modem_id):
                binding = self._bindings[layer.name]
                binding.interface = ifname
                binding.fwmark = self._fwmark(layer.name) if ifname else None

    def modems(self) -> frozenset[str]:
        """The modem ids this data path was built for (a reload may add others)."""
        return frozenset(self._modems)

    def layers(self) -> frozenset[str]:
        """The layer names this data path was built for."""
        return frozenset(self._bindings)

    def interface(self, modem_id: str) -> str | None:
        """The modem's interface name, None when it has none (or 'none')."""
        return self._modems[modem_id].interface

    async def run_modem(
        self, modem_id: str, channel: Channel, vendor: VendorProfile, layer: str
    ) -> None:
        """Bring the modem's context up for `layer` and keep it up; runs until cancelled.

        Start it when the modem's AT channel is online; cancel it when the channel goes (the
        task's exit takes the layer's addresses and routes away).
        """
        link = self._modems[modem_id]
        link.layer = layer
        self._bind(layer, link)

        async def changed(status: DataStatus) -> None:
            await self._on_status(link, status)

        conn = DataConnection(channel, vendor, interface=link.interface, on_change=changed)
        link.conn = conn
        try:
            await conn.run(self._profile(layer))
        finally:
            link.conn = None
            with contextlib.suppress(Exception):
                await self._withdraw(link)

    def serve(self, modem_id: str, layer: str) -> None:
        """The modem now serves `layer` (its profile was enabled): re-create the context.

        Call it after every profile switch on the modem, even back to the same layer."""
        link = self._modems[modem_id]
        old, link.layer = link.layer, layer
        if old is not None and old != layer:
            self._bindings[old].dns = ()
        self._bind(layer, link)
        if link.conn is not None:
            link.conn.set_profile(self._profile(layer))

    def context_lost(self, modem_id: str) -> None:
        """Evidence (netlink carrier loss, failed probes) that the modem's context went."""
        conn = self._modems[modem_id].conn
        if conn is not None:
            conn.context_lost()

    async def set_active(self, layer: str | None) -> None:
        """Traffic follows `layer`: its default route gets the lowest metric in the main table."""
        self._active = layer
        if self.routes is not None:
            async with self._lock:
                await self.routes.set_active(layer)

    async def set_sibling_active(self, layer: str, ifname: str) -> None:
        """A sibling layer carries us through `ifname` (Wi-Fi, tether, companion link), whose
        addresses something else manages: route over what the interface has (its addresses,
        the main table's gateway through it), then make it the active layer."""
        if self.routes is None:
            return  # no netlink: the system's own routes are all there is
        sources, gateways = await _interface_routing(ifname)
        if sources:
            async with self._lock:
                await self.routes.set_layer(
                    layer, ifname, gateways, sources, metered=self.cfg.layer(layer).metered
                )
        await self.set_active(layer)

    def snapshot(self) -> dict[str, dict[str, object]]:
        """Per layer, for `status --json` / MQTT: interface, addresses, metric, default, data."""
        routed = self.routes.snapshot() if self.routes is not None else {}
        out: dict[str, dict[str, object]] = {}
        for layer in self.cfg.layers:
            if layer.modem not in self._modems:
                # A sibling layer: its interface is the config's; no data connection of ours.
                r = routed.get(layer.name)
                out[layer.name] = {
                    "interface": layer.interface,
                    "addresses": r["addresses"] if r else [],
                    "metric": r.get("metric") if r else None,
                    "default": bool(r.get("default")) if r else False,
                    "data": None,
                }
                continue
            link = self._modems[layer.modem]
            serving = link.layer == layer.name
            r = routed.get(layer.name)
            granted = [a.split("/")[0] for a in link.status.addresses] if serving else []
            out[layer.name] = {
                "interface": link.interface,
                "addresses": r["addresses"] if r else granted,
                "metric": r.get("metric") if r else None,
                "default": bool(r.get("default")) if r else False,
                "data": link.status.to_dict() if serving else None,
            }
        return out

    async def close(self, *, clean: bool = True) -> None:
        """Remove every address and route the agent added (clean) and release netlink."""
        for link in self._modems.values():
            with contextlib.suppress(Exception):
                await self._withdraw(link)
        if self.routes is not None:
            await self.routes.close(clean=clean)
        if self.addresser is not None:
            self.addresser.close()

    # ----------------------------------------------------------------------- internals

    def _layers_of(self, modem_id: str) -> list[LayerConfig]:
        return [layer for layer in self.cfg.layers if layer.modem == modem_id]

    def _fwmark(self, layer: str) -> int | None:
        return self.routes.fwmark(layer) if self.routes is not None else None

    def _profile(self, layer: str) -> DataProfile:
        return DataProfile.from_layer(self.cfg.layer(layer), self.base_dir)

    def _bind(self, layer: str, link: _ModemLink) -> None:
        binding = self._bindings[layer]
        # Bound even while the link is down: a dead link's probes must fail, not leave by Wi-Fi.
        binding.interface = link.interface
        binding.fwmark = self._fwmark(layer) if link.interface else None

    async def _on_status(self, link: _ModemLink, status: DataStatus) -> None:
        try:
            await self._carry_out(link, status)
        except (RouteError, OSError) as exc:
            # The modem side must go on whatever netlink says; the next change tries again.
            log.warning("datapath.carry_out_failed", modem=link.modem_id, error=str(exc))
        finally:
            self.updated.set()

    async def _carry_out(self, link: _ModemLink, status: DataStatus) -> None:
        link.status = status
        layer = link.layer
        if layer is None:
            return
        binding = self._bindings[layer]
        if status.state == DataState.UP:
            binding.dns = status.dns
            if link.interface is None or self.addresser is None or self.routes is None:
                return
            if status.addressing == "dhcp":
                await self._start_dhcp(link)
                return
            await self._apply(link, layer, status.addresses, status.gateways)
        elif status.state == DataState.UNSUPPORTED:
            await self._adopt(link, layer)
        elif status.state == DataState.DOWN:
            binding.dns = ()
            await self._withdraw(link)

    async def _apply(
        self, link: _ModemLink, layer: str, addresses: tuple[str, ...], gateways: tuple[str, ...]
    ) -> None:
        if self.addresser is None or self.routes is None or link.interface is None:
            return
        cfg = self.cfg.layer(layer)
        try:
            async with self._lock:
                await self.addresser.apply(link.interface, addresses)
                await self.routes.set_layer(
                    layer,
                    link.interface,
                    gateways,
                    [a.split("/")[0] for a in addresses],
                    metered=cfg.metered,
                )
        except RouteError as exc:
            log.warning("datapath.apply_failed", layer=layer, error=str(exc))

    async def _start_dhcp(self, link: _ModemLink) -> None:
        if link.dhcp is not None or link.interface is None:
            return
        layer = link.layer

        async def on_lease(lease: Lease | None) -> None:
            link.lease = lease
            if layer is None or link.layer != layer:
                return
            if lease is None:
                if self.routes is not None:
                    await self.routes.remove_layer(layer)
                return
            self._bindings[layer].dns = lease.dns or self._bindings[layer].dns
            await self._apply(link, layer, lease.addresses, lease.gateways)

        client = DhcpClient(link.interface, on_lease)
        link.dhcp = client
        try:
            lease = await client.start()
        except (TimeoutError, OSError) as exc:
            link.dhcp = None
            log.warning("datapath.dhcp_failed", interface=link.interface, error=str(exc))
            return
        await on_lease(lease)

    async def _adopt(self, link: _ModemLink, layer: str) -> None:
        """QMI/MBIM data brought up by something else: route through what the interface has."""
        if link.interface is None or self.addresser is None or self.routes is None:
            return
        from pyroute2 import AsyncIPRoute

        try:
            async with asyncio.timeout(NETLINK_TIMEOUT), AsyncIPRoute() as ipr:
                found = await ipr.link_lookup(ifname=link.interface)
                if not found:
                    return
                sources = [
                    a.get("address")
                    async for a in await ipr.addr("dump", index=found[0])
                    if a.get("family") in (socket.AF_INET, socket.AF_INET6) and a.get("scope") == 0
                ]
        except (OSError, TimeoutError) as exc:
            log.warning("datapath.adopt_failed", interface=link.interface, error=str(exc))
            return
        if sources:
            async with self._lock:
                await self.routes.set_layer(
                    layer, link.interface, (), sources, metered=self.cfg.layer(layer).metered
                )

    async def _withdraw(self, link: _ModemLink) -> None:
        """Take the layer's routes and the agent's addresses off the modem's interface."""
        if link.dhcp is not None:
            client, link.dhcp = link.dhcp, None
            with contextlib.suppress(Exception):
                await client.stop()
        if self.routes is None or self.addresser is None or link.interface is None:
            return
        async with self._lock:
            for layer in self._layers_of(link.modem_id):
                await self.routes.remove_layer(layer.name)
            await self.addresser.clear(link.interface)


async def _interface_routing(ifname: str) -> tuple[list[str], list[str]]:
    """The interface's global addresses, and at most one gateway per family from the main
    table's default routes through it."""
    from pyroute2 import AsyncIPRoute

    sources: list[str] = []
    gateways: dict[int, str] = {}
    try:
        async with asyncio.timeout(NETLINK_TIMEOUT), AsyncIPRoute() as ipr:
            found = await ipr.link_lookup(ifname=ifname)
            if not found:
                return [], []
            index = found[0]
            async for a in await ipr.addr("dump", index=index):
                if a.get("family") in (socket.AF_INET, socket.AF_INET6) and a.get("scope") == 0:
                    sources.append(str(a.get("address")))
            for family in (socket.AF_INET, socket.AF_INET6):
                async for r in await ipr.route("dump", family=family):
                    if (
                        r.get("oif") == index
                        and r["dst_len"] == 0
                        and r.get("table") == 254
                        and r.get("gateway")
                    ):
                        gateways.setdefault(family, str(r.get("gateway")))
    except (OSError, TimeoutError) as exc:
        log.warning("datapath.sibling_link_unreadable", interface=ifname, error=str(exc))
        return [], []
    return sources, list(gateways.values())
