"""Emulator entry point: modems on ptys, a control socket, loopback or real data paths.

`python -m hw_fixtures.emulator [--vendor NAME] [--scenario FILE] ...` prints one JSON line
describing the ports and runs until SIGTERM/SIGINT or a `shutdown` control request.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import pty
import re
import secrets
import shutil
import signal
import sys
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, fields
from typing import Any

import structlog

from agent.errors import ConfigError
from hw_fixtures.addressing import (
    MAX_MODEMS,
    SERVER_ADDRESS,
    ContextAddress,
    gateway_interface,
    netns_context,
)
from hw_fixtures.card_api import CardEvents, EmulatedCard, ProfileSpec
from hw_fixtures.control import ControlRequestError, ControlServer
from hw_fixtures.dataplane import HOST, DataPlane
from hw_fixtures.modem_core import CoreError, ModemCore
from hw_fixtures.personalities import PERSONALITIES, ROUTER_MODES, get_personality
from hw_fixtures.pty_link import PtyLink
from hw_fixtures.scenario import Delays, ModemConfig, default_modem, load_scenario
from hw_fixtures.udev_feed import udev_records

log = structlog.get_logger(__name__)

FAST_DELAYS = Delays(reattach=0.2, cops_scan=0.2, reset=0.2, response=0.0, degraded=0.3)
IFNAMSIZ = 15


@dataclass(frozen=True)
class NetPlacement:
    """Where one modem's real interface goes in netns mode."""

    index: int  # position in the emulator: picks the 198.18.<index>.0/24 subnet
    netns: str  # the operator namespace the emulator creates
    interface: str  # the near end's name
    agent_netns: str | None  # None: the emulator's own namespace


def plan_placements(
    configs: list[ModemConfig], agent_netns: str | None, ifname_prefix: str | None
) -> list[NetPlacement]:
    """Unique esa-<pid>-<tag>-<id> namespaces and short interface names for every modem."""
    if len(configs) > MAX_MODEMS:
        raise ConfigError("--modems", None, f"netns mode has room for {MAX_MODEMS} modems")
    tag = secrets.token_hex(2)
    prefix = ifname_prefix if ifname_prefix is not None else f"esa{tag}m"
    out = []
    for i, cfg in enumerate(configs):
        ident = re.sub(r"[^A-Za-z0-9_]", "_", cfg.id)[:24]
        ifname = f"{prefix}{i}"
        if len(ifname) > IFNAMSIZ:
            raise ConfigError("--ifname-prefix", None, f"{ifname!r} is longer than 15 chars")
        out.append(NetPlacement(i, f"esa-{os.getpid()}-{tag}-{ident}", ifname, agent_netns))
    return out


def make_card(
    eid: str, profiles: list[ProfileSpec], events: CardEvents, download_pki: str | None = None
) -> EmulatedCard:
    """The eUICC engine if it is installed, else a channel-only stand-in; with a test PKI
    directory the eUICC also downloads profiles."""
    try:
        from hw_fixtures.euicc import EmulatedEuicc
    except ImportError:
        from hw_fixtures.basic_card import BasicCard

        return BasicCard(eid, profiles, events)
    card = EmulatedEuicc(eid, profiles, events)
    if download_pki is not None:
        from hw_fixtures.euicc_download import CardKeys, DownloadEngine

        card.download = DownloadEngine(card, CardKeys.from_directory(download_pki))
    return card


class EmulatedModem:
    """One modem: core, pty, card and data-path endpoints wired together."""

    def __init__(
        self,
        cfg: ModemConfig,
        loop: asyncio.AbstractEventLoop,
        link_dir: str,
        net: NetPlacement | None = None,
        index: int = 0,
    ) -> None:
        self.cfg = cfg
        self.net = net
        self.index = index
        self._loop = loop
        #: Called with ("add" | "remove", udev records) when the modem appears or vanishes.
        self.on_plug: Callable[[str, list[dict[str, Any]]], None] = lambda _a, _r: None
        self._started = False
        personality = get_personality(cfg.vendor, refresh=cfg.refresh)
        events = CardEvents()
        self.card = make_card(cfg.eid, cfg.profiles, events, cfg.download_pki)
        self.link = PtyLink(loop, self._on_data, os.path.join(link_dir, cfg.id))
        self.dataplane = DataPlane(
            self._path_state,
            lambda: self.core.delays.degraded,
            self._count_traffic,
        )
        self.core = ModemCore(
            cfg,
            personality,
            self.card,
            write=self.link.write,
            schedule=loop.call_later,
            on_change=self._changed,
        )
        events.on_profile_change = self.core.on_profile_change
        self._replug_timer: asyncio.TimerHandle | None = None
        self._was_resetting = False
        self.opnet: Any = None
        if net is not None:
            from hw_fixtures.opnet import OperatorNetwork

            index = net.index
            self.core.address_plan = lambda cid: netns_context(index, cid)
            self.opnet = OperatorNetwork(
                name=net.netns,
                interface=net.interface,
                index=net.index,
                agent_netns=net.agent_netns,
                state=self._net_state,
                grant=self._grant,
                router=lambda: self.core.usbnet in ROUTER_MODES,
                delay=lambda: self.core.delays.degraded,
                count=self._count_traffic,
                plugged=lambda: self.link.plugged,
            )

    def _net_state(self) -> str:
        """What the real interface passes: up, degraded or down (blackholed)."""
        if not self.link.plugged or self.core.data_cid() is None:
            return "down"
        return self.core.link

    def _grant(self) -> ContextAddress | None:
        cid = self.core.data_cid()
        return None if cid is None else self.core.address_plan(cid)

    def _count_traffic(self, rx: int, tx: int) -> None:
        # the core is built after the data plane, so it is looked up at call time
        self.core.add_traffic(rx, tx)

    def _on_data(self, data: bytes) -> None:
        self.core.feed(data)

    def _path_state(self) -> str:
        return self.core.data_path() if self.link.plugged else "down"

    def _changed(self) -> None:
        core = getattr(self, "core", None)  # the core reports changes while it is being built
        resetting = core is not None and core.resetting
        if (
            resetting
            and not getattr(self, "_was_resetting", False)
            and self.cfg.reenumerate_on_reset
        ):
            # AT+CFUN=1,1 on a USB modem: it drops off the bus and comes back as a new device
            # just before it boots (its boot URCs arrive on the new port)
            self._loop.call_soon(self.unplug, self.cfg.delays.reset * 0.5)
        self._was_resetting = resetting
        if self._started:
            self.dataplane.sync_soon()
            if self.opnet is not None:
                self.opnet.sync_soon()

    async def sync(self) -> None:
        """Bring every data path in line with the modem's state."""
        await self.dataplane.sync()
        if self.opnet is not None:
            await self.opnet.sync()

    async def start(self) -> None:
        """Open the pty and the endpoints (and the operator network in netns mode)."""
        self.link.open()
        await self.dataplane.start()
        if self.opnet is not None:
            await self.opnet.start()
        self._started = True

    async def stop(self) -> None:
        """Close everything this modem opened."""
        self._started = False
        if self._replug_timer is not None:
            self._replug_timer.cancel()
        if self.link.plugged:
            self.link.close()
        await self.dataplane.close()
        if self.opnet is not None:
            await self.opnet.close()

    def udev_devices(self) -> list[dict[str, Any]]:
        """How udev would show this modem now (nothing while unplugged)."""
        if not self.link.plugged or self.link.port is None:
            return []
        ident = self.core.status()
        return udev_records(
            index=self.index,
            port=self.link.port,
            symlink=self.link.symlink,
            vendor_name=self.core.p.name,
            manufacturer=str(self.cfg.manufacturer or self.core.p.manufacturer),
            model=str(self.cfg.model or self.core.p.model),
            imei=str(ident.get("imei") or self.cfg.imei or "0"),
            usb_vendor=self.cfg.usb_vendor,
            usb_product=self.cfg.usb_product,
            usb_serial=self.cfg.usb_serial,
            usb_interface=self.cfg.usb_interface,
            # in --net mode the modem has a real interface: that is what udev would report
            netdev=self.cfg.netdev or (self.net.interface if self.net is not None else None),
        )

    def unplug(self, duration: float | None = None) -> None:
        """Vanish like a USB device; with duration, come back on a new pty afterwards."""
        if self.link.plugged:
            gone = self.udev_devices()
            self.link.close()
            self.on_plug("remove", list(reversed(gone)))
        self._changed()
        if duration is not None:
            self._replug_timer = self._loop.call_later(float(duration), self.replug)

    def replug(self, reboot: bool = False) -> str:
        """Come back on a new pty; the stable symlink follows."""
        if self._replug_timer is not None:
            self._replug_timer.cancel()
            self._replug_timer = None
        if not self.link.plugged:
            # Like a USB modem whose old ttyUSB number is still held by the kernel while its
            # user closes it: the replugged modem comes back under another number.
            spares = _hold_pty_number(self.link.port)
            try:
                self.link.open()
            finally:
                for fd in spares:
                    os.close(fd)
            self.on_plug("add", self.udev_devices())
        if reboot:
            self.core.start_reset()
        self._changed()
        return self.link.port or ""

    def info(self) -> dict[str, Any]:
        """The per-modem entry of the start-up line."""
        facts = self._loopback_info()
        if self.net is not None:
            grant = netns_context(self.net.index, 1)
            facts.update(
                {
                    "interface": self.net.interface,
                    "netns": self.net.netns,
                    "agent_netns": self.net.agent_netns,
                    "gateway": grant.gateway,
                    "address": grant.address,
                    "prefixlen": grant.prefix,
                    "dns": list(grant.dns),
                    "server": SERVER_ADDRESS,
                    "operator_address": gateway_interface(self.net.index),
                    "usbnet": self.core.usbnet,
                    "dhcp": self.core.usbnet in ROUTER_MODES,
                }
            )
        return facts

    def _loopback_info(self) -> dict[str, Any]:
        return {
            "id": self.cfg.id,
            "port": self.link.port,
            "link": self.link.symlink,
            "vendor": self.core.p.name,
            "eid": self.card.eid,
            "http_port": self.dataplane.http_port,
            "tcp_port": self.dataplane.tcp_port,
            "dns_port": self.dataplane.dns_port,
            "http_url": f"http://{HOST}:{self.dataplane.http_port}/generate_204",
        }

    def status(self) -> dict[str, Any]:
        """The core's snapshot plus port facts."""
        info = self.info()
        # "link" in a status is the data-link state; the symlink is reported as link_path
        info["link_path"] = info.pop("link")
        return {
            **self.core.status(),
            **info,
            "plugged": self.link.plugged,
            "data_path": self._path_state(),
            "served": dict(self.dataplane.served),
            **self._net_status(),
        }

    def _net_status(self) -> dict[str, Any]:
        if self.opnet is None:
            return {}
        return {
            "net": {
                "state": self.opnet.applied,
                "netem": self.opnet.netem,
                "carrier": self.opnet.carrier,
                "loss": self.opnet.loss,
                "requests": {k: len(v) for k, v in self.opnet.requests.items()},
            }
        }


def _pts_number(path: str | None) -> int | None:
    tail = (path or "").rsplit("/", 1)[-1]
    return int(tail) if tail.isdigit() else None


def _hold_pty_number(old: str | None, limit: int = 64) -> list[int]:
    """Open ptys (lowest number first, as the kernel hands them out) until the old number is
    held, so the next pty gets another one; returns the fds to close afterwards."""
    want = _pts_number(old)
    fds: list[int] = []
    if want is None:
        return fds
    for _ in range(limit):
        master, slave = pty.openpty()
        fds += [master, slave]
        got = _pts_number(os.ttyname(slave))
        if got is None or got >= want:
            break  # the old number is ours now, or someone else holds it anyway
    return fds


class Emulator:
    """All modems and the control protocol over them."""

    def __init__(self, modems: list[EmulatedModem], control_path: str) -> None:
        self.modems = modems
        self.net = "netns" if any(m.net is not None for m in modems) else "loopback"
        self.by_id = {m.cfg.id: m for m in modems}
        self.control = ControlServer(
            control_path, self.handle, streams={"udev_monitor": self.udev_monitor}
        )
        self.stopped = asyncio.Event()
        self._udev_watchers: list[asyncio.Queue[dict[str, Any]]] = []
        for m in modems:
            m.on_plug = self._udev_event

    def _udev_event(self, action: str, records: list[dict[str, Any]]) -> None:
        for record in records:
            for q in self._udev_watchers:
                q.put_nowait({"action": action, "device": record})

    async def udev_monitor(self, _request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """The devices now, then one line per udev-like event (the fake udev source's feed)."""
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._udev_watchers.append(queue)
        try:
            devices = [d for m in self.modems for d in m.udev_devices()]
            yield {"ok": True, "devices": devices}
            while True:
                yield await queue.get()
        finally:
            self._udev_watchers.remove(queue)

    def ready_line(self) -> dict[str, Any]:
        """The first stdout line."""
        line: dict[str, Any] = {
            "port": self.modems[0].link.port,
            "control": self.control.path,
            "modems": [m.info() for m in self.modems],
        }
        if self.net == "netns":
            line["net"] = "netns"
        return line

    def _modem(self, request: dict[str, Any]) -> EmulatedModem:
        ident = request.get("modem", self.modems[0].cfg.id)
        if ident not in self.by_id:
            raise ControlRequestError(f"no modem {ident!r}; have {sorted(self.by_id)}")
        return self.by_id[ident]

    async def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        """Apply one control request; the reply is merged into {"ok": true}."""
        cmd = request["cmd"]
        params = {k: v for k, v in request.items() if k not in ("cmd", "modem")}
        if cmd == "shutdown":
            asyncio.get_running_loop().call_soon(self.stopped.set)
            return {}
        if cmd == "modems":
            return self.ready_line()
        modem = self._modem(request)
        core = modem.core
        reply: dict[str, Any] = {}
        try:
            if cmd == "status":
                reply = {"modems": [m.status() for m in self.modems]}
            elif cmd == "set_signal":
                core.set_signal(**params)
            elif cmd == "set_registration":
                core.set_registration(**params)
            elif cmd == "set_operator":
                core.set_operator(**params)
            elif cmd == "operators":
                core.set_operators(list(params.get("operators", [])))
            elif cmd == "link":
                if "delay" in params:
                    core.delays.degraded = float(params["delay"])
                if modem.opnet is not None:
                    loss = params.get("loss")
                    if loss is not None and not 0.0 <= float(loss) <= 100.0:
                        raise ControlRequestError("loss is a percentage, 0..100")
                    modem.opnet.set_impairment(
                        "delay" in params, None if loss is None else float(loss)
                    )
                core.set_link(str(params.get("state")))
            elif cmd == "requests":
                if modem.opnet is None:
                    raise ControlRequestError("requests needs --net netns")
                reply = {"requests": modem.opnet.take_requests(bool(params.get("reset", False)))}
            elif cmd == "pdp":
                reply = self._pdp_op(modem, params)
            elif cmd == "sim":
                core.set_sim(str(params.get("state")))
            elif cmd == "set_delays":
                known = {f.name for f in fields(Delays)}
                for key, value in params.items():
                    if key not in known:
                        raise CoreError(f"unknown delay {key!r}; have {sorted(known)}")
                    setattr(core.delays, key, float(value))
            elif cmd == "profile":
                reply = self._profile_op(modem, params)
            elif cmd == "traffic":
                if not modem.link.plugged or not core.add_traffic(
                    _byte_count(params, "rx"), _byte_count(params, "tx")
                ):
                    raise ControlRequestError("data path is down: no traffic can flow")
            elif cmd in ("unplug", "replug") or (
                cmd == "fault" and params.get("kind") in ("unplug", "replug")
            ):
                which = cmd if cmd != "fault" else params["kind"]
                if which == "unplug":
                    modem.unplug(params.get("duration"))
                else:
                    reply = {"port": modem.replug(bool(params.get("reboot", False)))}
            elif cmd == "fault":
                kind = str(params.pop("kind", ""))
                core.fault(kind, **params)
            elif cmd == "clear":
                which_fault = params.get("kind")
                core.clear(None if which_fault is None else str(which_fault))
            else:
                raise ControlRequestError(f"unknown cmd {cmd!r}")
        except CoreError as exc:
            raise ControlRequestError(str(exc)) from exc
        await modem.sync()
        return {**modem.status(), **reply}

    def _pdp_op(self, modem: EmulatedModem, params: dict[str, Any]) -> dict[str, Any]:
        op = params.get("op", "list")
        if op == "drop":
            cid = params.get("cid")
            if cid is not None and (isinstance(cid, bool) or not isinstance(cid, int)):
                raise ControlRequestError("cid must be an integer")
            return {"dropped": modem.core.drop_context(cid)}
        if op != "list":
            raise ControlRequestError(f"unknown pdp op {op!r}; have list, drop")
        return {}

    def _profile_op(self, modem: EmulatedModem, params: dict[str, Any]) -> dict[str, Any]:
        op = params.get("op", "list")
        if op == "broken":
            modem.core.mark_broken(str(params["iccid"]), bool(params.get("broken", True)))
        elif op != "list":
            raise ControlRequestError(f"unknown profile op {op!r}; have list, broken")
        profiles = getattr(modem.card, "profiles", modem.cfg.profiles)
        return {
            "profiles": [
                {
                    "iccid": p.iccid,
                    "name": p.name,
                    "enabled": p.enabled,
                    "operator_name": p.operator_name,
                    "mcc_mnc": p.mcc_mnc,
                    "broken": p.broken or p.iccid in modem.core.broken,
                }
                for p in profiles
            ]
        }


def _byte_count(params: dict[str, Any], key: str) -> int:
    value = params.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ControlRequestError(f"{key} must be a non-negative integer byte count")
    return value


async def run(
    configs: list[ModemConfig],
    control_path: str,
    link_dir: str,
    announce: Any = None,
    placements: list[NetPlacement] | None = None,
) -> None:
    """Run the emulator until a signal or a shutdown request; announce(dict) gets the ready line."""
    loop = asyncio.get_running_loop()
    nets: list[NetPlacement | None] = list(placements) if placements else [None] * len(configs)
    modems = [
        EmulatedModem(cfg, loop, link_dir, net, i)
        for i, (cfg, net) in enumerate(zip(configs, nets, strict=True))
    ]
    emulator = Emulator(modems, control_path)
    try:
        for modem in modems:
            await modem.start()
        await emulator.control.start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, emulator.stopped.set)
        line = emulator.ready_line()
        if announce is not None:
            announce(line)
        log.info("emu_ready", modems=len(modems), control=control_path)
        await emulator.stopped.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await emulator.control.close()
        for modem in modems:
            await modem.stop()
        log.info("emu_stopped")


def _parse_profile(text: str, index: int) -> ProfileSpec:
    parts = text.split(":")
    if len(parts) < 2 or not parts[0].isdigit():
        raise argparse.ArgumentTypeError(f"--profile wants ICCID:NAME[:enabled], got {text!r}")
    return ProfileSpec(
        iccid=parts[0],
        name=parts[1],
        provider=parts[1],
        enabled=len(parts) > 2 and parts[2].lower() in ("enabled", "1", "true", "on"),
        operator_name=parts[1],
        mcc_mnc=f"001{index + 1:02d}",
    )


def build_parser(prog: str = "hw_fixtures.emulator") -> argparse.ArgumentParser:
    """The argument parser (also used by the CLI's `emulator` subcommand)."""
    ap = argparse.ArgumentParser(prog=prog, description=__doc__)
    ap.add_argument(
        "--vendor",
        choices=sorted(PERSONALITIES),
        default=None,
        help="personality of every modem (default: the scenario's, or generic)",
    )
    ap.add_argument("--scenario", help="TOML scenario file")
    ap.add_argument("--modems", type=int, default=1, help="modem count without a scenario")
    ap.add_argument("--control", help="control socket path (default: in a temp dir)")
    ap.add_argument("--link-dir", help="directory for the stable per-modem symlinks")
    ap.add_argument("--eid", help="EID of the first modem's eUICC (32 hex digits)")
    ap.add_argument(
        "--profile", action="append", default=[], help="ICCID:NAME[:enabled], repeatable"
    )
    ap.add_argument("--fast", action="store_true", help="short delays for tests")
    ap.add_argument(
        "--pki",
        help="test PKI directory (hw_fixtures.pki): every eUICC can download profiles with it",
    )
    ap.add_argument(
        "--net",
        choices=("loopback", "netns"),
        default=None,
        help="data path: loopback endpoints, or (root) a veth pair per modem into an "
        "operator network namespace; default netns as root, loopback otherwise",
    )
    ap.add_argument(
        "--agent-netns",
        help="netns mode: namespace (name or path) for the modems' interfaces "
        "(default: the emulator's own)",
    )
    ap.add_argument(
        "--ifname-prefix",
        help="netns mode: interface names are PREFIX<index> (default esa<tag>m<index>)",
    )
    ap.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default="info",
        help="log level (default info)",
    )
    return ap


def configs_from_args(args: argparse.Namespace) -> list[ModemConfig]:
    """Modem configurations from the scenario file and command-line overrides."""
    if args.scenario:
        configs = load_scenario(args.scenario)
        if args.vendor:
            for cfg in configs:
                cfg.vendor = args.vendor
    else:
        configs = [default_modem(i, args.vendor or "generic") for i in range(max(1, args.modems))]
    if args.eid:
        configs[0].eid = args.eid
    if args.profile:
        configs[0].profiles = [_parse_profile(p, i) for i, p in enumerate(args.profile)]
        if not any(p.enabled for p in configs[0].profiles):
            configs[0].profiles[0].enabled = True
    if args.pki:
        for cfg in configs:
            cfg.download_pki = args.pki
    if args.fast:
        for cfg in configs:
            cfg.delays = Delays(**vars(FAST_DELAYS))
    return configs


def main(argv: list[str] | None = None, prog: str = "hw_fixtures.emulator") -> int:
    """Run the emulator from the command line; returns the process exit status."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    from agent import log as agent_log

    agent_log.configure(args.log_level)
    placements: list[NetPlacement] | None = None
    try:
        configs = configs_from_args(args)
        if args.net is None:
            # As the issue has it: real interfaces where we may make them, loopback elsewhere.
            args.net = "netns" if os.geteuid() == 0 else "loopback"
        if args.net == "netns":
            if os.geteuid() != 0:
                raise ConfigError(
                    "--net", None, "netns needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN)"
                )
            placements = plan_placements(configs, args.agent_netns, args.ifname_prefix)
        elif args.agent_netns or args.ifname_prefix:
            raise ConfigError("--agent-netns", None, "only with --net netns")
    except ConfigError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    # Checked before anything starts, so a typo is one line and not a traceback from the pty.
    if args.link_dir and not os.path.isdir(args.link_dir):
        parser.error(f"--link-dir {args.link_dir}: no such directory")
    if args.control and not os.path.isdir(os.path.dirname(os.path.abspath(args.control))):
        parser.error(f"--control {args.control}: its directory does not exist")
    runtime = tempfile.mkdtemp(prefix="esim-emu-")
    control = args.control or os.path.join(runtime, "control.sock")
    link_dir = args.link_dir or runtime

    def announce(line: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(line) + "\n")
        sys.stdout.flush()

    try:
        asyncio.run(run(configs, control, link_dir, announce, placements))
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(runtime)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
