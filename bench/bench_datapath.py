"""Traffic follows the layer, on real interfaces: upstream cut -> default route moved -> a new
TCP connection succeeds, with mwan3track's defaults as the reference; probe bytes on the wire.

Run (root): `python -m bench.bench_datapath [--rounds 20] [--quick] [--agent daemon|inprocess]`;
writes bench/results/datapath.json.

Every "lab" is an agent network namespace with the emulator in `--net netns` mode behind it: two
generic (NCM) modems, each with a veth pair whose far end is an operator namespace holding
"the internet" (198.19.0.1: ICMP, TCP echo on port 7). The outage is the emulator's `link down`
on the primary's operator: the upstream is blackholed while the modem stays registered with an
active context (the silent failure). For every round, in the lab's agent namespace:

* t0 = the emulator's reply to `link down` (the blackhole is in place then);
* **route**: the main table is read every 20 ms until the lowest-metric default route (of the
  mover under test: protocol 229 for the agent, static for the baseline) leaves by the failover
  modem's interface;
* **connection**: from t0 a new TCP connection to 198.19.0.1:7 is started every 50 ms (2 s
  timeout each); the figure is the first one that connects from the failover modem's address,
  and the failover's operator must have logged that source address.

Each round starts at a random point of the mover's probe cadence (seeded), then the link comes
back and the mover is brought back to the primary before the next round (not measured).

Movers, each in its own lab, run concurrently so the slow baseline fits in the run:

* `mwan3`: bench/mwan3track_baseline.py — mwan3track's defaults (ping every 10 s, timeout 4 s,
  down after 5 failed, up after 5), demoting the primary's default route when it declares it
  down. The links are brought up the way netifd would (AT+CGACT, address and route from the
  grant) before it starts. Spread over several labs (rounds split between them).
* `daemon`: `esim-agent run` in the agent namespace at the shipped detection defaults (one ICMP
  probe per layer: interval 5 s, timeout 1 s; health down after 3, confirmations every 0.5 s;
  modem poll 30 s). Only `failback_stable` and `hold_down` are shortened, so that rounds can
  follow each other (they act on the way back, not on the measured path).
* `inprocess`: the agent's own parts at the same defaults, composed by the bench — `DataPath`
  (data connections over AT, addresses, tagged routes) and a `LayerMonitor` per layer with the
  bound ICMP probe; on the primary's `down` the bench calls `DataPath.set_active(failover)`.
  Used when the daemon does not drive the data path (`--agent inprocess`, or `auto` falls back
  to it when the daemon puts no route in place).

Probe bytes (idle window, no traffic but the probes): the byte and packet counters of each
modem's interface are read before and after the window and extrapolated to a day. veth counts
the 14-byte Ethernet header of every frame (and ARP); a raw-IP wwan interface would not, so the
probes' IPv4 bytes at IP level are counted apart by a packet socket on each interface (frame
length - 14, per ethertype and direction), which also shows the ARP the counters include. IPv6
is switched off on the lab's interfaces (the layers are `pdp_type = "ip"`), so link-local chatter
is not on the wire. With the daemon, its CPU and RSS are
sampled over the same window (bench_daemon's sampler), beside a bare asyncio interpreter.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pyroute2 import AsyncIPRoute  # noqa: E402
from pyroute2.netlink.exceptions import NetlinkError  # noqa: E402

from bench.mwan3track_baseline import (  # noqa: E402
    DOWN,
    INTERVAL_S,
    RTPROT_STATIC,
    TIMEOUT_S,
    UP,
    MetricMover,
    Mwan3Track,
)
from bench.stats import summary_ms  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "datapath.json"
INTERNET = "198.19.0.1"
ECHO_PORT = 7
RT_PROTO_AGENT = 229
ROUNDS = 20
QUICK_ROUNDS = 2
BASELINE_LABS = 4
QUICK_BASELINE_LABS = 1
BYTES_WINDOW_S = 240.0
QUICK_BYTES_WINDOW_S = 15.0
SEED = 20261206
ROUTE_POLL_S = 0.02
CONNECT_EVERY_S = 0.05
CONNECT_TIMEOUT_S = 2.0
ROUND_TIMEOUT_S = 120.0
SETTLE_TIMEOUT_S = 90.0
#: The daemon puts the primary's route in place within seconds of starting, or not at all.
DAEMON_ROUTE_TIMEOUT_S = 45.0
ETHERNET_HEADER = 14
SECONDS_PER_DAY = 86_400
#: Shortened for the daemon so rounds can follow each other; neither acts on the failover.
DAEMON_TIMERS = {"failback_stable": 3.0, "hold_down": 1.0, "hold_down_max": 2.0}

SCENARIO = """
[[modem]]
id = "m0"
vendor = "generic"
[[modem.profiles]]
iccid = "8944500102030405060"
name = "Home"
enabled = true

[[modem]]
id = "m1"
vendor = "generic"
[[modem.profiles]]
iccid = "8944500102030405061"
name = "Travel"
enabled = true
"""
LAYERS = (("primary", "m0", "8944500102030405060"), ("failover", "m1", "8944500102030405061"))


# --------------------------------------------------------------------------- measuring


@dataclass(frozen=True)
class Modem:
    """What the emulator's start-up line says about one modem in netns mode."""

    id: str
    link: str
    interface: str
    address: str
    gateway: str
    prefixlen: int

    @classmethod
    def from_info(cls, info: dict[str, Any]) -> Modem:
        return cls(
            id=str(info["id"]),
            link=str(info["link"]),
            interface=str(info["interface"]),
            address=str(info["address"]),
            gateway=str(info["gateway"]),
            prefixlen=int(info["prefixlen"]),
        )


async def default_routes(ipr: AsyncIPRoute, proto: int | None) -> list[tuple[int, int]]:
    """(metric, oif) of the main table's IPv4 default routes, of protocol `proto` if given."""
    out = []
    async for r in await ipr.route("dump", family=socket.AF_INET, table=254):
        if r.get_attr("RTA_TABLE") != 254 or r["dst_len"] != 0:
            continue
        if proto is not None and r["proto"] != proto:
            continue
        out.append((int(r.get_attr("RTA_PRIORITY") or 0), int(r.get_attr("RTA_OIF") or 0)))
    return sorted(out)


async def route_via(ipr: AsyncIPRoute, proto: int | None, ifname: str) -> bool:
    """Whether the lowest-metric default route (of `proto`) leaves by `ifname`."""
    found = await ipr.link_lookup(ifname=ifname)
    routes = await default_routes(ipr, proto)
    return bool(found) and bool(routes) and routes[0][1] == found[0]


async def wait_route(ipr: AsyncIPRoute, proto: int | None, ifname: str, timeout: float) -> float:
    """Monotonic time at which the lowest default route was first seen leaving by `ifname`."""
    async with asyncio.timeout(timeout):
        # Polled, not watched: the figure must not depend on netlink event delivery.
        while not await route_via(ipr, proto, ifname):  # noqa: ASYNC110
            await asyncio.sleep(ROUTE_POLL_S)
    return time.monotonic()


async def try_connect(source: str) -> float | None:
    """One new TCP connection to the internet's echo port; its monotonic connect time if it
    left from `source`, None when it failed or left from another address."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            await loop.sock_connect(sock, (INTERNET, ECHO_PORT))
        done = time.monotonic()
        return done if sock.getsockname()[0] == source else None
    except (OSError, TimeoutError):
        return None
    finally:
        sock.close()


async def first_connection(source: str, timeout: float) -> float:
    """Start a connection every CONNECT_EVERY_S; the time the first one from `source` connects."""
    tasks: set[asyncio.Task[float | None]] = set()
    found: asyncio.Future[float] = asyncio.get_running_loop().create_future()

    def done(task: asyncio.Task[float | None]) -> None:
        tasks.discard(task)
        if not task.cancelled() and task.exception() is None:
            at = task.result()
            if at is not None and not found.done():
                found.set_result(at)

    try:
        async with asyncio.timeout(timeout):
            while not found.done():
                task = asyncio.create_task(try_connect(source))
                task.add_done_callback(done)
                tasks.add(task)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(found), CONNECT_EVERY_S)
            return found.result()
    finally:
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class Control:
    """The emulator's control socket (async), from inside the agent namespace."""

    def __init__(self, path: str) -> None:
        from hw_fixtures.control_client import AsyncControlClient

        self.path = path
        self.client = AsyncControlClient(path)

    async def call(self, cmd: str, **params: Any) -> dict[str, Any]:
        return await self.client.call(cmd, **params)


async def _cut_and_measure(
    control: str, primary: Modem, failover: Modem, proto: int | None
) -> dict[str, Any]:
    ctl = Control(control)
    ipr = AsyncIPRoute()
    try:
        await ctl.call("requests", modem=failover.id, reset=True)
        sent = time.monotonic()
        await ctl.call("link", modem=primary.id, state="down")
        t0 = time.monotonic()
        route = asyncio.create_task(wait_route(ipr, proto, failover.interface, ROUND_TIMEOUT_S))
        conn_at = await first_connection(failover.address, ROUND_TIMEOUT_S)
        route_at = await route
        seen = (await ctl.call("requests", modem=failover.id))["requests"]["tcp"]
    finally:
        ipr.close()
    if failover.address not in seen:
        raise RuntimeError(f"failover operator did not see {failover.address}: {seen}")
    return {
        "route_ms": round((route_at - t0) * 1000.0, 1),
        "connection_ms": round((conn_at - t0) * 1000.0, 1),
        "cut_reply_ms": round((t0 - sent) * 1000.0, 1),
    }


async def cut_and_measure(
    ctl: Control, primary: Modem, failover: Modem, proto: int | None
) -> dict[str, Any]:
    """Cut the primary's upstream; ms to the route move and to a new connection on failover.

    The measuring runs on an event loop of its own in another thread (same namespace), so a
    mover that shares this process (the baseline, the in-process agent) cannot delay it.
    """
    coro = _cut_and_measure(ctl.path, primary, failover, proto)
    return await asyncio.to_thread(asyncio.run, coro)


async def counters(ipr: AsyncIPRoute, ifname: str) -> dict[str, int]:
    """rx/tx bytes and packets of an interface (64-bit stats)."""
    index = (await ipr.link_lookup(ifname=ifname))[0]
    link = [x async for x in await ipr.get_links(index)][0]  # noqa: RUF015
    stats = link.get_attr("IFLA_STATS64")
    return {k: int(stats[k]) for k in ("rx_bytes", "tx_bytes", "rx_packets", "tx_packets")}


ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
ETHERTYPES = {0x0800: "ipv4", 0x0806: "arp", 0x86DD: "ipv6"}


class WireTally:
    """Every frame on an interface, seen by a packet socket: frames and bytes per ethertype and
    direction, so the probes' IPv4 bytes can be told from ARP (the counters cannot)."""

    def __init__(self, ifname: str) -> None:
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self.sock.bind((ifname, 0))
        self.sock.setblocking(False)
        self.tally: dict[str, list[int]] = {}

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            data, addr = await loop.sock_recvfrom(self.sock, 65536)
            kind = (
                ETHERTYPES.get(int.from_bytes(data[12:14], "big"), "other")
                if len(data) >= 14
                else "other"
            )
            key = f"{kind}_{'tx' if addr[2] == PACKET_OUTGOING else 'rx'}"
            frames_bytes = self.tally.setdefault(key, [0, 0])
            frames_bytes[0] += 1
            frames_bytes[1] += len(data)

    def close(self) -> None:
        self.sock.close()


async def probe_bytes(ipr: AsyncIPRoute, layers: dict[str, Modem], window: float) -> dict[str, Any]:
    """Counters and a packet-socket tally of each layer's interface over an idle window,
    extrapolated to a day."""
    tallies = {name: WireTally(m.interface) for name, m in layers.items()}
    tasks = [asyncio.create_task(t.run()) for t in tallies.values()]
    try:
        before = {name: await counters(ipr, m.interface) for name, m in layers.items()}
        start = time.monotonic()
        await asyncio.sleep(window)
        elapsed = time.monotonic() - start
        after = {name: await counters(ipr, m.interface) for name, m in layers.items()}
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for t in tallies.values():
            t.close()
    scale = SECONDS_PER_DAY / elapsed
    out: dict[str, Any] = {"window_s": round(elapsed, 2)}
    for name, m in layers.items():
        d = {k: after[name][k] - before[name][k] for k in after[name]}
        wire = d["rx_bytes"] + d["tx_bytes"]
        frames = d["rx_packets"] + d["tx_packets"]
        tally = tallies[name].tally
        ipv4 = [tally.get(f"ipv4_{x}", [0, 0]) for x in ("tx", "rx")]
        ipv4_frames = sum(f for f, _ in ipv4)
        ipv4_ip_bytes = sum(b for _, b in ipv4) - ETHERNET_HEADER * ipv4_frames
        out[name] = {
            "interface": m.interface,
            "counters": d,
            "frames_by_kind": {
                k: {"frames": v[0], "bytes": v[1]} for k, v in sorted(tally.items())
            },
            "wire_bytes_per_day": round(wire * scale),
            "frames_per_day": round(frames * scale),
            "ipv4_frames": ipv4_frames,
            "ipv4_ip_bytes": ipv4_ip_bytes,
            "ipv4_ip_bytes_per_day": round(ipv4_ip_bytes * scale),
        }
    return out


# --------------------------------------------------------------------------- the movers


async def bring_up_like_netifd(modems: list[Modem]) -> None:
    """The baseline's links: context up over AT, the grant's address and a default route."""
    from agent.at.channel import AtChannel

    for m in modems:
        ch = await AtChannel.open(m.link)
        try:
            for cmd in ('AT+CGDCONT=1,"IP","internet"', "AT+CGACT=1,1"):
                await ch.command(cmd, timeout=10.0)
        finally:
            await ch.close()
    ipr = AsyncIPRoute()
    try:
        for m in modems:
            index = (await ipr.link_lookup(ifname=m.interface))[0]
            with contextlib.suppress(NetlinkError):  # already there
                await ipr.addr("add", index=index, address=m.address, prefixlen=m.prefixlen)
            await ipr.link("set", index=index, state="up")
    finally:
        ipr.close()


async def mwan3_rounds(
    ctl: Control, primary: Modem, failover: Modem, rounds: int, rng: random.Random
) -> list[dict[str, Any]]:
    """mwan3track on both links, demoting the primary's route when it declares it down."""
    await bring_up_like_netifd([primary, failover])
    mover = MetricMover()
    await mover.place(primary.interface, primary.gateway, 10)
    await mover.place(failover.interface, failover.gateway, 20)

    trackers = {
        m.id: Mwan3Track(m.interface, INTERNET, mover.demote, mover.restore, source=m.address)
        for m in (primary, failover)
    }
    standby = asyncio.create_task(trackers[failover.id].run())
    rows: list[dict[str, Any]] = []
    try:
        for _ in range(rounds):
            tracker = trackers[primary.id]
            tracker.reset_online()
            await mover.restore(primary.interface)
            task = asyncio.create_task(tracker.run())
            # A fresh tracker pings at once: the cut lands uniformly in its cadence.
            offset = rng.uniform(0.0, INTERVAL_S)
            await asyncio.sleep(offset)
            try:
                row = await cut_and_measure(ctl, primary, failover, RTPROT_STATIC)
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                await ctl.call("link", modem=primary.id, state="up")
            row["phase_offset_ms"] = round(offset * 1000.0, 1)
            rows.append(row)
            print(json.dumps({"mover": "mwan3", **row}), file=sys.stderr, flush=True)
    finally:
        standby.cancel()
        await asyncio.gather(standby, return_exceptions=True)
        await mover.remove_all()
        mover.close()
    return rows


def agent_config(state_dir: Path, modems: dict[str, Modem], daemon: bool) -> dict[str, Any]:
    """The agent's config for the lab: shipped defaults but for the interfaces and targets."""
    data: dict[str, Any] = {
        "device_id": "bench-datapath",
        "state_dir": str(state_dir),
        "modems": [
            {"id": m.id, "port": m.link, "interface": m.interface, "vendor": "generic"}
            for m in modems.values()
        ],
        "layers": [
            {
                "name": name,
                "modem": modem,
                "profile": iccid,
                "role": "primary" if name == "primary" else "failover",
                "apn": "internet",
                # The shipped probe (one ICMP echo a layer, interval 5 s, timeout 1 s), aimed at
                # the lab's internet instead of 9.9.9.9.
                "probes": [{"kind": "icmp", "target": INTERNET}],
            }
            for name, modem, iccid in LAYERS
        ],
    }
    if daemon:
        data["mqtt"] = {"enabled": False}
        data["control"] = {"socket": str(state_dir / "control.sock")}
        data["timers"] = dict(DAEMON_TIMERS)
    return data


async def inprocess_rounds(
    ctl: Control,
    modems: dict[str, Modem],
    rounds: int,
    rng: random.Random,
    *,
    window: float,
    workdir: Path,
) -> dict[str, Any]:
    """DataPath + a LayerMonitor per layer at shipped defaults; switch on the primary's down."""
    from agent.at.channel import AtChannel
    from agent.config import parse_config
    from agent.daemon.datapath import DataPath
    from agent.daemon.evidence import EvidenceFeeds
    from agent.health.layer import LayerHealth, Thresholds
    from agent.health.monitor import LayerMonitor
    from agent.health.probes import probe_from_spec
    from agent.modem.vendors import vendor_by_name

    cfg = parse_config(agent_config(workdir, modems, daemon=False))
    primary, failover = modems["m0"], modems["m1"]
    dp = await DataPath.open(cfg)
    channels = {m: await AtChannel.open(modems[m].link) for m in modems}
    health: dict[str, str] = {}
    changed = asyncio.Event()
    switch: asyncio.Queue[str] = asyncio.Queue()

    def on_change(name: str, h: LayerHealth) -> None:
        health[name] = h.state
        changed.set()
        if name == "primary" and h.state == "down":
            switch.put_nowait("failover")

    monitors: dict[str, LayerMonitor] = {}
    feeds = EvidenceFeeds(lambda modem_id: [monitors[n] for n, m, _ in LAYERS if m == modem_id])
    thresholds = Thresholds(
        down_after=cfg.health.down_after,
        up_after=cfg.health.up_after,
        degraded_ratio=cfg.health.degraded_ratio,
    )
    for layer in cfg.layers:
        probes = [
            (
                f"{p.kind}{i}",
                probe_from_spec(p.kind, p.target, p.timeout, dp.binding(layer.name)),
                p.interval,
            )
            for i, p in enumerate(layer.probes)
        ]
        ifname = modems[layer.modem].interface
        monitors[layer.name] = LayerMonitor(
            layer.name,
            probes,
            None,
            thresholds,
            on_change,
            failure_interval=cfg.health.failure_interval,
            traffic_aware=cfg.health.traffic_aware,
            probe_budget=cfg.health.probe_budget,
            counters=feeds.counters_source(ifname),
        )

    async def wait_health(want: Callable[[dict[str, str]], bool]) -> None:
        async with asyncio.timeout(SETTLE_TIMEOUT_S):
            while not want(health):
                changed.clear()
                await changed.wait()

    async def switcher() -> None:
        while True:
            await dp.set_active(await switch.get())

    tasks = [
        asyncio.create_task(dp.run_modem(m, channels[m], vendor_by_name("generic"), name))
        for name, m, _ in LAYERS
    ]
    tasks.append(asyncio.create_task(switcher()))
    tasks += [asyncio.create_task(mon.run()) for mon in monitors.values()]
    interval = min(p.interval for layer in cfg.layers for p in layer.probes)
    rows: list[dict[str, Any]] = []
    ipr = AsyncIPRoute()
    try:
        await wait_health(lambda h: h.get("primary") == h.get("failover") == "up")
        await dp.set_active("primary")
        await wait_route(ipr, RT_PROTO_AGENT, primary.interface, SETTLE_TIMEOUT_S)
        await ctl.call("requests", modem="m0", reset=True)
        idle = await probe_bytes(ipr, {"primary": primary, "failover": failover}, window)
        for _ in range(rounds):
            offset = rng.uniform(0.0, interval)
            await asyncio.sleep(offset)
            row = await cut_and_measure(ctl, primary, failover, RT_PROTO_AGENT)
            row["phase_offset_ms"] = round(offset * 1000.0, 1)
            rows.append(row)
            print(json.dumps({"mover": "inprocess", **row}), file=sys.stderr, flush=True)
            await ctl.call("link", modem=primary.id, state="up")
            await wait_health(lambda h: h.get("primary") == "up")
            await dp.set_active("primary")
            await wait_route(ipr, RT_PROTO_AGENT, primary.interface, SETTLE_TIMEOUT_S)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        feeds.close()
        for ch in channels.values():
            await ch.close()
        await dp.close()
        ipr.close()
    return {"rounds": rows, "probe_bytes": idle, "config": config_facts(cfg)}


def config_facts(cfg: Any) -> dict[str, Any]:
    """The settings the figures rest on."""
    return {
        "probes": [
            {
                "layer": layer.name,
                "kind": p.kind,
                "target": p.target,
                "interval_s": p.interval,
                "timeout_s": p.timeout,
            }
            for layer in cfg.layers
            for p in layer.probes
        ],
        "health": {
            "down_after": cfg.health.down_after,
            "up_after": cfg.health.up_after,
            "failure_interval_s": cfg.health.failure_interval,
            "traffic_aware": cfg.health.traffic_aware,
            "probe_budget": cfg.health.probe_budget,
        },
        "modem_poll_interval_s": [m.poll_interval for m in cfg.modems],
        "timers": {
            "failback_stable_s": cfg.timers.failback_stable,
            "hold_down_s": cfg.timers.hold_down,
        },
    }


async def daemon_rounds(
    ctl: Control,
    modems: dict[str, Modem],
    rounds: int,
    rng: random.Random,
    *,
    window: float,
    workdir: Path,
) -> dict[str, Any]:
    """`esim-agent run` in this namespace; the same cut, the daemon moves the route."""
    from agent.config import parse_config
    from bench.bench_daemon import describe, read_sample

    data = agent_config(workdir, modems, daemon=True)
    cfg = parse_config(data)
    path = workdir / "agent.toml"
    path.write_text(to_toml(data))
    log = (workdir / "daemon.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent", "run", "--config", str(path),
        stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
    )  # fmt: skip
    bare: asyncio.subprocess.Process | None = None
    primary, failover = modems["m0"], modems["m1"]
    interval = min(p.interval for layer in cfg.layers for p in layer.probes)
    rows: list[dict[str, Any]] = []
    ipr = AsyncIPRoute()
    try:
        await wait_route(ipr, RT_PROTO_AGENT, primary.interface, DAEMON_ROUTE_TIMEOUT_S)
        # Both layers' probes running before the idle window: one full cadence.
        await asyncio.sleep(2 * interval)
        bare = await asyncio.create_subprocess_exec(
            sys.executable, "-c",
            f"import asyncio; asyncio.run(asyncio.sleep({window + 60.0}))",
            stdin=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        await asyncio.sleep(1.0)
        samples: dict[str, list[Any]] = {"daemon": [], "bare": []}

        async def sample() -> None:
            assert bare is not None
            while True:
                samples["daemon"].append(read_sample(proc.pid))
                samples["bare"].append(read_sample(bare.pid))
                await asyncio.sleep(0.5)

        sampler = asyncio.create_task(sample())
        try:
            idle = await probe_bytes(ipr, {"primary": primary, "failover": failover}, window)
        finally:
            sampler.cancel()
            await asyncio.gather(sampler, return_exceptions=True)
        idle_cost = {
            "daemon": describe(samples["daemon"]),
            "baseline_bare_asyncio_python": describe(samples["bare"]),
        }
        for _ in range(rounds):
            offset = rng.uniform(0.0, interval)
            await asyncio.sleep(offset)
            row = await cut_and_measure(ctl, primary, failover, RT_PROTO_AGENT)
            row["phase_offset_ms"] = round(offset * 1000.0, 1)
            rows.append(row)
            print(json.dumps({"mover": "daemon", **row}), file=sys.stderr, flush=True)
            await ctl.call("link", modem=primary.id, state="up")
            await wait_route(ipr, RT_PROTO_AGENT, primary.interface, SETTLE_TIMEOUT_S)
    except TimeoutError:
        log.flush()
        sys.stderr.write((workdir / "daemon.log").read_text(errors="replace")[-4000:])
        raise
    finally:
        for p in (proc, bare):
            if p is not None and p.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGTERM)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(p.wait(), 15.0)
                if p.returncode is None:
                    p.kill()
                    await p.wait()
        log.close()
        ipr.close()
    return {
        "rounds": rows,
        "probe_bytes": idle,
        "idle_cost": idle_cost,
        "config": config_facts(cfg),
    }


def to_toml(data: dict[str, Any]) -> str:
    """The small subset of TOML the agent config above needs (tables, arrays of tables)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + " }"
        raise TypeError(type(v))

    lines = [f"{k} = {value(v)}" for k, v in data.items() if not isinstance(v, dict | list)]
    for k, v in data.items():
        if isinstance(v, dict):
            lines += ["", f"[{k}]", *(f"{kk} = {value(vv)}" for kk, vv in v.items())]
    for k, v in data.items():
        if isinstance(v, list):
            for item in v:
                lines += ["", f"[[{k}]]", *(f"{kk} = {value(vv)}" for kk, vv in item.items())]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- orchestration


def ipv4_only(ifname: str) -> None:
    """No IPv6 on a lab interface (this namespace's sysctl): the layers use `pdp_type = "ip"`,
    and link-local chatter (router solicitations, MLD, DAD) would be counted as probe bytes."""
    Path(f"/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6").write_text("1\n")


async def worker(
    kind: str, lab: dict[str, Any], rounds: int, seed: int, window: float
) -> dict[str, Any]:
    """One mover's rounds in the current (agent) namespace."""
    ctl = Control(str(lab["control"]))
    modems = {m["id"]: Modem.from_info(m) for m in lab["modems"]}
    for m in modems.values():
        ipv4_only(m.interface)
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="bench-datapath-") as tmp:
        if kind == "mwan3":
            return {"rounds": await mwan3_rounds(ctl, modems["m0"], modems["m1"], rounds, rng)}
        if kind == "inprocess":
            return await inprocess_rounds(
                ctl, modems, rounds, rng, window=window, workdir=Path(tmp)
            )
        if kind == "daemon":
            return await daemon_rounds(ctl, modems, rounds, rng, window=window, workdir=Path(tmp))
    raise ValueError(kind)


@dataclass
class Lab:
    """An agent namespace and the netns-mode emulator whose modems' interfaces it holds."""

    agent_ns: str
    emulator: Any

    def close(self) -> None:
        from hw_fixtures.netns_testing import cleanup_emulator, remove_netns

        cleanup_emulator(self.emulator)
        remove_netns(self.agent_ns)


def open_lab(tag: str, scenario: Path) -> Lab:
    from hw_fixtures.netns_testing import (
        create_netns,
        inside,
        remove_netns,
        start_netns_emulator,
        unique_name,
    )

    ns = create_netns(unique_name(tag))
    try:
        emu = start_netns_emulator(ns, "--scenario", str(scenario), "--log-level", "warning")
    except Exception:
        remove_netns(ns)
        raise
    # The operators' side too: nothing but the probes and their answers on the wire.
    for modem in emu.modems:
        with inside(str(modem["netns"])):
            ipv4_only("opgw")
    return Lab(ns, emu)


async def run_worker(
    lab: Lab, kind: str, rounds: int, seed: int, *, window: float, tmp: Path
) -> dict[str, Any]:
    """Run `python -m bench.bench_datapath --worker` inside the lab's agent namespace."""
    from hw_fixtures.netns_testing import netns_command

    info = tmp / f"{lab.agent_ns}.json"
    out = tmp / f"{lab.agent_ns}.out.json"
    info.write_text(json.dumps(lab.emulator.info))
    argv = netns_command(
        lab.agent_ns,
        [sys.executable, "-m", "bench.bench_datapath", "--worker", kind, "--lab", str(info),
         "--rounds", str(rounds), "--seed", str(seed), "--window", str(window), "--out", str(out)],
    )  # fmt: skip
    proc = await asyncio.create_subprocess_exec(*argv, cwd=ROOT, stdin=subprocess.DEVNULL)
    rc = await proc.wait()
    if rc != 0 or not out.exists():
        raise RuntimeError(f"{kind} worker in {lab.agent_ns} failed (exit {rc})")
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def code_commit() -> str | None:
    """The commit of the code measured: BENCH_AGENT_COMMIT (a tree without .git), else HEAD."""
    if os.environ.get("BENCH_AGENT_COMMIT"):
        return os.environ["BENCH_AGENT_COMMIT"]
    done = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=False
    )
    return done.stdout.strip() or None


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "route": summary_ms([r["route_ms"] for r in rows]),
        "connection": summary_ms([r["connection_ms"] for r in rows]),
    }


async def orchestrate(rounds: int, baseline_labs: int, window: float, agent: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-datapath-") as tmpdir:
        tmp = Path(tmpdir)
        scenario = tmp / "two.toml"
        scenario.write_text(SCENARIO)
        labs: list[Lab] = []
        try:
            for i in range(baseline_labs + 1):
                labs.append(await asyncio.to_thread(open_lab, f"bdp{i}", scenario))
            agent_lab, base_labs = labs[0], labs[1:]
            split = [
                rounds // baseline_labs + (i < rounds % baseline_labs) for i in range(baseline_labs)
            ]
            jobs: list[Awaitable[dict[str, Any]]] = [
                run_worker(lab, "mwan3", n, SEED + 1 + i, window=window, tmp=tmp)
                for i, (lab, n) in enumerate(zip(base_labs, split, strict=True))
                if n > 0
            ]
            agent_kind = "daemon" if agent in ("daemon", "auto") else "inprocess"
            results = await asyncio.gather(
                run_worker(agent_lab, agent_kind, rounds, SEED, window=window, tmp=tmp),
                *jobs,
                return_exceptions=True,
            )
            agent_result = results[0]
            fallback: str | None = None
            if isinstance(agent_result, BaseException) and agent == "auto":
                fallback = f"the daemon put no route in place ({agent_result})"
                print(
                    f"daemon mover failed ({agent_result}); in-process parts instead",
                    file=sys.stderr,
                )
                agent_lab.close()
                labs[0] = agent_lab = await asyncio.to_thread(open_lab, "bdpx", scenario)
                agent_kind = "inprocess"
                agent_result = await run_worker(
                    agent_lab, agent_kind, rounds, SEED, window=window, tmp=tmp
                )
            for r in results:
                if isinstance(r, BaseException):
                    if r is results[0] and agent == "auto":
                        continue
                    raise r
            assert isinstance(agent_result, dict)
            mwan3_rows = [row for r in results[1:] if isinstance(r, dict) for row in r["rounds"]]
        finally:
            for lab in labs:
                await asyncio.to_thread(lab.close)
    return {
        "benchmark": "datapath_failover",
        "what": "emulator `link down` on the primary's operator (silent failure, modem still "
        "registered) -> lowest-metric default route on the failover interface -> a new TCP "
        "connection to 198.19.0.1:7 from the failover's address, seen by its operator",
        "rounds": rounds,
        "agent_mover": agent_kind,
        "agent_mover_fallback": fallback,
        "agent_commit": code_commit(),
        "agent": {**summarise(agent_result["rounds"]), "config": agent_result.get("config")},
        "baseline_mwan3track": {
            **summarise(mwan3_rows),
            "defaults": {"interval_s": INTERVAL_S, "timeout_s": TIMEOUT_S, "down": DOWN, "up": UP},
            "labs": baseline_labs,
        },
        "probe_bytes": agent_result.get("probe_bytes"),
        "idle_cost": agent_result.get("idle_cost"),
        "phase": f"cut at a uniform offset in the mover's probe interval (seed {SEED})",
        "method": {
            "t0": "reply to the emulator's `link down` (blackhole in place)",
            "route_poll_ms": ROUTE_POLL_S * 1000,
            "connect_every_ms": CONNECT_EVERY_S * 1000,
            "connect_timeout_s": CONNECT_TIMEOUT_S,
            "emulator": "--net netns, two generic (NCM) modems, default delays",
        },
        "rounds_detail": {"agent": agent_result["rounds"], "mwan3": mwan3_rows},
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
    }


def headline(result: dict[str, Any]) -> dict[str, Any]:
    """The few figures the bench runner prints."""
    if result.get("skipped"):
        return {}
    a, b = result["agent"], result["baseline_mwan3track"]
    return {
        "connection_p95_ms": a["connection"].get("p95_ms"),
        "route_p50_ms": a["route"].get("p50_ms"),
        "mwan3_connection_p95_ms": b["connection"].get("p95_ms"),
    }


def run(
    quick: bool = False,
    rounds: int | None = None,
    baseline_labs: int | None = None,
    window: float | None = None,
    agent: str = "auto",
) -> dict[str, Any]:
    """Measure, write bench/results/datapath.json, return the result."""
    if os.geteuid() != 0:
        return {"benchmark": "datapath_failover", "skipped": "network namespaces need root"}
    result = asyncio.run(
        orchestrate(
            rounds if rounds is not None else (QUICK_ROUNDS if quick else ROUNDS),
            baseline_labs
            if baseline_labs is not None
            else (QUICK_BASELINE_LABS if quick else BASELINE_LABS),
            window if window is not None else (QUICK_BYTES_WINDOW_S if quick else BYTES_WINDOW_S),
            agent,
        )
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=None, help=f"rounds per mover ({ROUNDS})")
    parser.add_argument("--baseline-labs", type=int, default=None)
    parser.add_argument("--window", type=float, default=None, help="idle window for probe bytes")
    parser.add_argument("--agent", choices=("auto", "daemon", "inprocess"), default="auto")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--lab", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=SEED, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        with contextlib.suppress(Exception):
            from agent import log as agent_log

            agent_log.configure("warning", json=True)
        lab = json.loads(args.lab.read_text())
        result = asyncio.run(worker(args.worker, lab, args.rounds, args.seed, args.window))
        args.out.write_text(json.dumps(result))
        return 0
    result = run(args.quick, args.rounds, args.baseline_labs, args.window, args.agent)
    print(json.dumps({k: v for k, v in result.items() if k != "rounds_detail"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
