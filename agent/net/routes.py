"""Routes and rules that make traffic follow the active layer, over netlink (pyroute2).

Everything the agent adds carries routing protocol `RT_PROTO` and lives either in the main
table (the layers' default routes, told apart by metric) or in the agent's own tables
`TABLE_BASE + index`. That tag is what `sweep_stale()` looks for after a crash, so a route or
rule of anybody else is never touched. The manager keeps a desired state per layer and
reconciles the kernel against it: every change dumps what carries our tag, deletes what is not
wanted and adds what is missing, so calls are idempotent and never leave duplicates.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

from agent.errors import AgentError

log = structlog.get_logger(__name__)

#: Routing protocol number on every route and rule the agent adds ("esim-agent"; unassigned in
#: /etc/iproute2/rt_protos, above the numbers routing daemons use).
RT_PROTO = 229
#: Per-layer tables are TABLE_BASE + layer index; 0x4553 is "ES".
TABLE_BASE = 0x4553_0000
#: How many tables the range holds (layer indexes 0..TABLE_SPAN-1).
TABLE_SPAN = 0x100
#: Per-layer firewall mark: the same number as the layer's table.
FWMARK_BASE = TABLE_BASE
FWMARK_MASK = 0xFFFF_FFFF
#: Priority of the agent's rules: before the main table's lookup (32766).
RULE_PRIORITY = 17_000
#: Main-table metric of the active layer's default route; the others use theirs (higher).
ACTIVE_METRIC = 10
#: Default main-table metric of a standby layer: STANDBY_METRIC + 10 * index.
STANDBY_METRIC = 1000
#: Metric of the default route in a layer's own table (explicit: IPv6 would turn 0 into 1024).
TABLE_METRIC = 100
#: Deadline of one netlink request.
NETLINK_TIMEOUT = 5.0

_RTNH_F_ONLINK = 4
_RT_TABLE_MAIN = 254
_RT_SCOPE_UNIVERSE = 0
_RT_SCOPE_LINK = 253


class RouteError(AgentError):
    """A netlink request about routes or rules failed; carries the operation and errno."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


@dataclass(slots=True)
class _Layer:
    """What one layer asked for."""

    index: int
    ifname: str
    gateways: tuple[str, ...]
    sources: tuple[str, ...]
    metric: int
    metered: bool


@dataclass(frozen=True, slots=True)
class _Route:
    """A default route as the kernel identifies it (plus what we compare to find changes)."""

    family: int
    table: int
    metric: int
    oif: int
    gateway: str | None
    dst: str = "default"


@dataclass(frozen=True, slots=True)
class _Rule:
    """A policy rule: by fwmark or by source address, to one of our tables."""

    family: int
    table: int
    fwmark: int | None
    src: str | None
    src_len: int
    priority: int = RULE_PRIORITY


@dataclass(slots=True)
class LayerRoutes:
    """One layer in `snapshot()`: its interface, addresses, main-table metric, default or not."""

    interface: str
    addresses: list[str]
    table: int
    fwmark: int
    metric: int | None
    default: bool

    def to_dict(self) -> dict[str, object]:
        """Plain data for `status --json` and MQTT."""
        return {
            "interface": self.interface,
            "addresses": list(self.addresses),
            "table": self.table,
            "fwmark": self.fwmark,
            "metric": self.metric,
            "default": self.default,
        }


def layer_table(index: int) -> int:
    """The routing table (and fwmark) of the layer at position `index` in the config."""
    if not 0 <= index < TABLE_SPAN:
        raise ValueError(f"layer index {index} outside 0..{TABLE_SPAN - 1}")
    return TABLE_BASE + index


def is_agent_table(table: int | None) -> bool:
    """Whether a table id lies in the agent's range."""
    return table is not None and TABLE_BASE <= table < TABLE_BASE + TABLE_SPAN


def _family(address: str) -> int:
    return socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET


def _default_dst(family: int) -> str:
    return "::/0" if family == socket.AF_INET6 else "0.0.0.0/0"


@dataclass(slots=True)
class RouteManager:
    """Owns the agent's routes and rules in one network namespace; see the module docstring.

    Layers are known by name; their position in `layers` (the config's order) picks their table
    and fwmark, so numbers stay the same across restarts.
    """

    layers: tuple[str, ...]
    _ipr: Any = None
    _wanted: dict[str, _Layer] = field(default_factory=dict)
    _active: str | None = None
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @classmethod
    async def open(cls, layers: Sequence[str]) -> RouteManager:
        """A manager for the namespace this thread is in; RouteError when netlink is unusable."""
        if len(layers) > TABLE_SPAN:
            raise ValueError(f"at most {TABLE_SPAN} layers")
        if len(set(layers)) != len(layers):
            raise ValueError("layer names must be unique")
        try:
            ipr = AsyncIPRoute()
        except OSError as exc:
            raise RouteError(f"cannot open netlink: {exc}", exc.errno) from exc
        return cls(layers=tuple(layers), _ipr=ipr)

    def table(self, name: str) -> int:
        """The table of layer `name` (also its fwmark)."""
        return layer_table(self._index(name))

    def fwmark(self, name: str) -> int:
        """The firewall mark that sends a socket's traffic through layer `name`'s table."""
        return FWMARK_BASE + self._index(name)

    def _index(self, name: str) -> int:
        try:
            return self.layers.index(name)
        except ValueError:
            raise KeyError(f"unknown layer {name!r}") from None

    # ----------------------------------------------------------------------- public API

    async def sweep_stale(self) -> int:
        """Remove every route and rule carrying our tag (left by a crashed run); returns the count.

        Call once at start, before the first `set_layer`: it forgets nothing wanted because
        nothing is wanted yet, and reconciles against the state held otherwise.
        """
        async with self._lock:
            return await self._reconcile(sweep=True)

    async def set_layer(
        self,
        name: str,
        ifname: str,
        gateways: Sequence[str] = (),
        sources: Sequence[str] = (),
        metric: int | None = None,
        *,
        metered: bool = False,
    ) -> int:
        """Declare that layer `name` is usable through `ifname`: its table, rules, main route.

        `gateways` holds at most one address per family (none: a device route, right for
        raw-IP interfaces); `sources` are the interface addresses that select the layer's table.
        `metric` is the main-table metric while standby (default STANDBY_METRIC + 10 * index);
        a `metered` layer gets a main-table route only while it is the active layer.
        Returns the number of kernel changes (0 when everything already was as asked).
        """
        index = self._index(name)
        gws = tuple(str(ipaddress.ip_address(g)) for g in gateways)
        if len({_family(g) for g in gws}) != len(gws):
            raise ValueError("at most one gateway per address family")
        srcs = tuple(str(ipaddress.ip_address(s.split("/")[0])) for s in sources)
        if not ifname or ifname == "none":
            raise ValueError("set_layer needs an interface name")
        wanted = _Layer(
            index=index,
            ifname=ifname,
            gateways=gws,
            sources=srcs,
            metric=metric if metric is not None else STANDBY_METRIC + 10 * index,
            metered=metered,
        )
        if wanted.metric <= ACTIVE_METRIC:
            raise ValueError(f"a standby metric must be above {ACTIVE_METRIC}")
        async with self._lock:
            self._wanted[name] = wanted
            return await self._reconcile()

    async def set_active(self, name: str | None) -> int:
        """Give layer `name` the lowest main-table metric (None: no layer is preferred)."""
        if name is not None:
            self._index(name)
        async with self._lock:
            self._active = name
            return await self._reconcile()

    async def remove_layer(self, name: str) -> int:
        """Take layer `name`'s table, rules and main route away (its link went down)."""
        self._index(name)
        async with self._lock:
            self._wanted.pop(name, None)
            return await self._reconcile()

    async def close(self, *, clean: bool = True) -> None:
        """Remove everything (clean) or leave it for the next start (e.g. a restart in place)."""
        try:
            if clean:
                async with self._lock:
                    self._wanted.clear()
                    await self._reconcile()
        finally:
            self._ipr.close()

    def snapshot(self) -> dict[str, dict[str, object]]:
        """Per declared layer: interface, addresses, table, fwmark, main metric, carries default."""
        out: dict[str, dict[str, object]] = {}
        for name, layer in self._wanted.items():
            metric = self._main_metric(name, layer)
            out[name] = LayerRoutes(
                interface=layer.ifname,
                addresses=list(layer.sources),
                table=layer_table(layer.index),
                fwmark=FWMARK_BASE + layer.index,
                metric=metric,
                default=self._carrier() == name,
            ).to_dict()
        return out

    def carrier(self) -> str | None:
        """The layer whose route has the lowest main-table metric (the one traffic follows)."""
        return self._carrier()

    # ----------------------------------------------------------------------- desired state

    def _main_metric(self, name: str, layer: _Layer) -> int | None:
        if name == self._active:
            return ACTIVE_METRIC
        if layer.metered:
            return None
        return layer.metric

    def _carrier(self) -> str | None:
        best: tuple[int, str] | None = None
        for name, layer in self._wanted.items():
            metric = self._main_metric(name, layer)
            if metric is not None and (best is None or metric < best[0]):
                best = (metric, name)
        return best[1] if best else None

    async def _desired(self) -> tuple[set[_Route], set[_Rule]]:
        routes: set[_Route] = set()
        rules: set[_Rule] = set()
        for name, layer in self._wanted.items():
            oif = await self._ifindex(layer.ifname)
            if oif is None:
                log.warning("route.interface_missing", layer=name, interface=layer.ifname)
                continue
            table = layer_table(layer.index)
            mark = FWMARK_BASE + layer.index
            families = {_family(a) for a in layer.sources + layer.gateways} or {socket.AF_INET}
            metric = self._main_metric(name, layer)
            for fam in sorted(families):
                gw = next((g for g in layer.gateways if _family(g) == fam), None)
                routes.add(_Route(fam, table, TABLE_METRIC, oif, gw))
                if metric is not None:
                    routes.add(_Route(fam, _RT_TABLE_MAIN, metric, oif, gw))
                rules.add(_Rule(fam, table, mark, None, 0))
            for src in layer.sources:
                fam = _family(src)
                rules.add(_Rule(fam, table, None, src, 32 if fam == socket.AF_INET else 128))
        return routes, rules

    # ----------------------------------------------------------------------- kernel side

    async def _reconcile(self, *, sweep: bool = False) -> int:
        """Make the kernel's tagged routes and rules equal the desired ones; returns changes."""
        want_routes, want_rules = (set(), set()) if sweep else await self._desired()
        have_routes, have_rules = await self._current()
        changes = 0
        # Rules first on the way out, so no rule ever points at a table being emptied.
        for rule in have_rules.keys() - want_rules:
            for msg in have_rules[rule]:
                await self._request("rule", "del", **msg)
                changes += 1
        for route in have_routes.keys() - want_routes:
            for msg in have_routes[route]:
                await self._request("route", "del", **msg)
                changes += 1
        # Duplicates of a wanted entry (a crashed run added it again) go too.
        for key, msgs in list(have_routes.items()) + list(have_rules.items()):
            if key in want_routes or key in want_rules:
                for msg in msgs[1:]:
                    await self._request("rule" if isinstance(key, _Rule) else "route", "del", **msg)
                    changes += 1
        for route in want_routes - have_routes.keys():
            await self._request("route", "add", **self._route_msg(route))
            changes += 1
        for rule in want_rules - have_rules.keys():
            await self._request("rule", "add", **self._rule_msg(rule))
            changes += 1
        if changes:
            log.info(
                "route.reconciled",
                changes=changes,
                active=self._active,
                layers=sorted(self._wanted),
                sweep=sweep,
            )
        return changes

    @staticmethod
    def _route_msg(route: _Route) -> dict[str, Any]:
        msg: dict[str, Any] = {
            "family": route.family,
            "dst": _default_dst(route.family),
            "table": route.table,
            "oif": route.oif,
            "proto": RT_PROTO,
            "priority": route.metric,
        }
        if route.gateway is not None:
            msg["gateway"] = route.gateway
            # The gateway sits on the interface whatever our tables hold: no nexthop lookup.
            msg["flags"] = _RTNH_F_ONLINK
            msg["scope"] = _RT_SCOPE_UNIVERSE
        else:
            msg["scope"] = _RT_SCOPE_LINK
        return msg

    @staticmethod
    def _rule_msg(rule: _Rule) -> dict[str, Any]:
        msg: dict[str, Any] = {
            "family": rule.family,
            "table": rule.table,
            "priority": RULE_PRIORITY,
            "protocol": RT_PROTO,
        }
        if rule.fwmark is not None:
            msg["fwmark"] = rule.fwmark
            msg["fwmask"] = FWMARK_MASK
        if rule.src is not None:
            msg["src"] = rule.src
            msg["src_len"] = rule.src_len
        return msg

    async def _current(
        self,
    ) -> tuple[dict[_Route, list[dict[str, Any]]], dict[_Rule, list[dict[str, Any]]]]:
        """Our tagged default routes and rules, each with the messages that delete them."""
        routes: dict[_Route, list[dict[str, Any]]] = {}
        rules: dict[_Rule, list[dict[str, Any]]] = {}
        for fam in (socket.AF_INET, socket.AF_INET6):
            async for r in self._dump("route", fam):
                table = r.get("table")
                if r.get("proto") != RT_PROTO:
                    continue
                oif = r.get("oif")
                metric = r.get("priority") or 0
                key = _Route(fam, table, metric, oif, r.get("gateway"))
                msg: dict[str, Any] = {
                    "family": fam,
                    "dst": f"{r.get('dst') or _default_dst(fam).split('/')[0]}/{r['dst_len']}",
                    "table": table,
                    "priority": metric,
                    "proto": RT_PROTO,
                    # pyroute2 fills in scope universe on delete, which misses device routes.
                    "scope": r["scope"],
                }
                if oif is not None:
                    msg["oif"] = oif
                if r["dst_len"] != 0:
                    # Not a default route, yet ours: never wanted, so it goes.
                    key = _Route(fam, table, metric, oif, r.get("gateway"), msg["dst"])
                routes.setdefault(key, []).append(msg)
            async for r in self._dump("rule", fam):
                table = r.get("table")
                if r.get("protocol") != RT_PROTO and not is_agent_table(table):
                    continue
                src = r.get("src")
                fwmark = r.get("fwmark")
                priority = r.get("priority") or 0
                rkey = _Rule(fam, table, fwmark, src, r["src_len"] if src else 0, priority)
                rmsg: dict[str, Any] = {
                    "family": fam,
                    "table": table,
                    "priority": priority,
                }
                if fwmark is not None:
                    rmsg["fwmark"] = fwmark
                    rmsg["fwmask"] = r.get("fwmask") or FWMARK_MASK
                if src is not None:
                    rmsg["src"] = src
                    rmsg["src_len"] = r["src_len"]
                rules.setdefault(rkey, []).append(rmsg)
        return routes, rules

    async def _dump(self, what: str, family: int) -> AsyncIterator[Any]:
        try:
            async with asyncio.timeout(NETLINK_TIMEOUT):
                items = [x async for x in await getattr(self._ipr, what)("dump", family=family)]
        except TimeoutError:
            raise RouteError(f"{what} dump timed out") from None
        except NetlinkError as exc:
            raise RouteError(f"{what} dump: {exc}", exc.code) from exc
        for item in items:
            yield item

    async def _request(self, what: str, command: str, **msg: Any) -> None:
        try:
            async with asyncio.timeout(NETLINK_TIMEOUT):
                await getattr(self._ipr, what)(command, **msg)
        except TimeoutError:
            raise RouteError(f"{what} {command} timed out") from None
        except NetlinkError as exc:
            # ESRCH/ENOENT on delete: already gone (someone else cleaned up), which is what we want.
            if command == "del" and exc.code in (3, 2):
                return
            # EEXIST on add: an equal entry appeared between dump and add; it is ours to keep.
            if command == "add" and exc.code == 17:
                return
            log.warning("route.netlink_error", what=what, command=command, error=str(exc))
            raise RouteError(f"{what} {command}: {exc}", exc.code) from exc

    async def _ifindex(self, ifname: str) -> int | None:
        try:
            async with asyncio.timeout(NETLINK_TIMEOUT):
                found = await self._ipr.link_lookup(ifname=ifname)
        except TimeoutError:
            raise RouteError("link lookup timed out") from None
        return int(found[0]) if found else None
